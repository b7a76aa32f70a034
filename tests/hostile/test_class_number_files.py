"""Class 1 continued, numbers in files: every number mathq reads from a checkpoint's
config.json, a recipe and a results line gets NaN, infinities, negative, zero, huge values
and values of the wrong type.

A checkpoint's config is checked against its own tensors before any work (layers,
vocabulary, width from the shapes; positive finite hyper-parameters; counts GGUF can
store), so each case ends in one named error within seconds: never a traceback, a loop over
10^12 layers, a vocabulary of 2^40 tokens in memory, or a "verified" model that computes
NaN. A recipe's numbers go through the one TOML reader and the recipe's bounds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mathq.cli import cli
from mathq.modelfile.options import OLLAMA_OPTIONS
from tests.hostile.census import check_error_lines

DEMO = Path(__file__).resolve().parents[2] / "models" / "tiny-demo"
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny-demo.toml"

CONFIG_KEYS = ("hidden_size", "intermediate_size", "max_position_embeddings",
               "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
               "rms_norm_eps", "rope_theta", "vocab_size")
# JSON text of each value (NaN and Infinity as Python writes them).
CONFIG_VALUES = ("-1", "0", "NaN", "Infinity", "-Infinity", "-1e-06", "1e999", "1e12",
                 str(10**9), str(2**31), str(10**12), str(2**40), "9" * 5000, '"12"', "true", "[4]")


def _checkpoint(root: Path, key: str, value_text: str) -> Path:
    """The demo checkpoint with one config.json value replaced (the weights linked)."""
    ck = root / "ck"
    ck.mkdir()
    for f in DEMO.iterdir():
        if f.name != "config.json":
            os.symlink(f, ck / f.name)
    text = (DEMO / "config.json").read_text()
    config = json.loads(text)
    assert key in config
    marker = "__HOSTILE__"
    config[key] = marker
    (ck / "config.json").write_text(json.dumps(config, indent=2).replace(f'"{marker}"',
                                                                        value_text))
    return ck


@pytest.mark.parametrize("value", CONFIG_VALUES, ids=lambda v: v[:14])
@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_hostile_config_number(key: str, value: str, tmp_path: Path):
    ck = _checkpoint(tmp_path, key, value)
    out = tmp_path / "o.gguf"
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["convert", str(ck), "--out", str(out)],
                                catch_exceptions=True)
    took = time.monotonic() - started
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    line = check_error_lines(result.output, cli.commands["convert"], result.exit_code)
    assert result.exit_code == 1, result.output
    assert "config.json" in line, line
    assert took < 20, f"took {took:.1f} s"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"], "left something behind"


RECIPE_FIELDS = {  # field -> (the line in the demo recipe, the TOML table it sits in)
    "smoke.n": "n = 400",
    "smoke.max_tokens": "max_tokens = 64",
    "ollama.parameters.num_ctx": "num_ctx = 512",
    "ollama.parameters.temperature": "temperature = 0.0",
    "ollama.parameters.num_predict": "num_predict = 64",
    "ollama.parameters.repeat_penalty": "repeat_penalty = 1.0",
    "prompt.few_shot": "few_shot = 0",
}
#: Values no field may hold: refused (exit 2) naming the recipe.
NEVER = ("nan", "+nan", "-nan", "inf", "-inf", "1e999", "9" * 5000, "-" + "9" * 5000)
#: Values a field may or may not allow: refused by name, or accepted (no traceback).
MAYBE = ("-1", "0", "1e30", str(10**30), "-0.0", '"12"', "true")


@pytest.mark.parametrize("value", NEVER + MAYBE, ids=lambda v: v[:14])
@pytest.mark.parametrize("field", RECIPE_FIELDS)
def test_hostile_recipe_number(field: str, value: str, tmp_path: Path):
    line_in_recipe = RECIPE_FIELDS[field]
    name = line_in_recipe.split(" = ")[0]
    text = RECIPE.read_text().replace('"../models/', f'"{DEMO.parent}/')
    assert line_in_recipe in text
    recipe = tmp_path / "r.toml"
    recipe.write_text(text.replace(line_in_recipe, f"{name} = {value}", 1))
    result = CliRunner().invoke(cli, ["modelfile", str(recipe), "--out", str(tmp_path / "mf")],
                                catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    line = check_error_lines(result.output, cli.commands["modelfile"], result.exit_code)
    if value in NEVER:
        assert result.exit_code == 2, result.output
    assert result.exit_code in (0, 2), result.output
    if result.exit_code:
        assert "r.toml" in line, line
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"], "left debris"


@pytest.mark.parametrize("line", [
    '{"id": %s, "answer": "5", "completion": "x"}' % ("9" * 5000),
    '{"id": "1", "answer": "5", "completion": "x", "tokens": %s}' % ("9" * 5000),
    '{"id": "1", "answer": "5", "completion": "x", "seconds": NaN}',
    '{"id": "1", "answer": "5", "completion": "x", "seconds": 1e999}',
])
def test_hostile_number_in_a_results_line(line: str, tmp_path: Path):
    results = tmp_path / "r.jsonl"
    results.write_text(line + "\n")
    result = CliRunner().invoke(cli, ["grade", str(results)], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    error = check_error_lines(result.output, cli.commands["grade"], result.exit_code)
    assert result.exit_code == 2, result.output
    assert "r.jsonl:1:" in error and ("finite number" in error or "an integer of" in error)


MODELFILE_NUMBERS = ("nan", "NaN", "inf", "-Infinity", "0x1p99999", "1e999", "9" * 5000,
                     "-" + "9" * 5000, "0" * 30 + "1", "-1", "0", "1_0", "0x10")


@pytest.mark.parametrize("value", MODELFILE_NUMBERS, ids=lambda v: v[:14])
@pytest.mark.parametrize("option", [o.name for o in OLLAMA_OPTIONS if o.kind in ("int", "float")])
def test_hostile_modelfile_parameter(option: str, value: str, tmp_path: Path):
    """Every numeric Ollama parameter of a Modelfile given to `modelfile --check`: a problem
    line or a pass, never a traceback, and no line repeats 5,000 digits."""
    (tmp_path / "m.gguf").write_bytes(b"")
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM ./m.gguf\nPARAMETER {option} {value}\n")
    result = CliRunner().invoke(cli, ["modelfile", "--check", str(modelfile)],
                                catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    check_error_lines(result.output, cli.commands["modelfile"], result.exit_code)
    assert result.exit_code in (0, 1), result.output
    assert all(len(line) < 600 for line in result.output.splitlines()), result.output[:300]


@pytest.mark.parametrize("level", ["0", "-1", "6", str(10**30), '"Level %s"' % ("9" * 5000),
                                   "NaN", "1e999", "2.5", '"Level 0"', "true", "[3]"],
                         ids=lambda v: v[:14])
def test_hostile_level_in_a_problem_file(level: str, tmp_path: Path):
    suite = tmp_path / "s.jsonl"
    suite.write_text('{"problem": "1+1?", "answer": "2", "level": ' + level + "}\n")
    result = CliRunner().invoke(cli, ["problems", "show", str(suite)], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    line = check_error_lines(result.output, cli.commands["problems"].commands["show"],
                             result.exit_code)
    assert result.exit_code == 2 and "s.jsonl:1:" in line, result.output
