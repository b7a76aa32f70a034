"""Class 6, the words of the error, and class 7, judgement.

The words: an error line names only options of the command that printed it (library hints
are fitted to the running command in one place, ``mathq.cli``), a full disk points at the
command's own output options, llama.cpp's own reason reaches the line instead of "no reason
given", input of any length is shortened, and a summary holding a string or a NaN where a
number belongs is named instead of crashing the report. Every generated case of the other
classes runs the same line check (:func:`tests.hostile.census.check_error_lines`).

Judgement: a results file that repeats an id is refused (it would be counted twice), and a
recipe value a Modelfile cannot hold is bad input (exit 2) like any other bad recipe value.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mathq.cli import _fit_hint, cli
from mathq.errors import InferenceError
from tests.hostile.census import check_error_lines, command_options, commands
from tests.hostile.conftest import World


def _invoke(argv: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(cli, argv, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.mark.parametrize(("hint", "fitted"), [
    ("lower --parallel or --max-tokens (the KV cache may not fit in memory)",
     "lower --parallel"),
    ("pass --restart to discard them, or --out-dir to keep both", "--out-dir to keep both"),
    ("raise --timeout, or lower --parallel", "lower --parallel"),
    ("check --pre-tokenizer", "see `mathq bench --help`"),
    ("run `mathq quantize x --quant Q8_0` first", "run `mathq quantize x --quant Q8_0` first"),
])
def test_a_hint_keeps_only_the_alternatives_the_command_can_take(hint: str, fitted: str):
    options = command_options(cli.commands["bench"]) - {"--restart", "--timeout"}
    assert _fit_hint(hint, options, "bench") == fitted


def test_a_library_hint_is_fitted_to_the_running_command(world: World,
                                                         monkeypatch: pytest.MonkeyPatch):
    """`bench` meets the context error smoke meets too; its hint must not offer
    --max-tokens, which bench lacks."""
    def fail(*_args: object, **_kwargs: object) -> None:
        raise InferenceError("llama.cpp could not make a context of 8 x 512 tokens: x",
                             "lower --parallel or --max-tokens (the KV cache may not fit in "
                             "memory)")

    monkeypatch.setattr("mathq.evaluate.stage.run_bench", fail)
    code, output = _invoke(["bench", "tiny-demo", "-Q", "Q8_0"])
    line = check_error_lines(output, cli.commands["bench"], code)
    assert line.endswith("(lower --parallel)"), line


@pytest.mark.parametrize("argv", [
    ["convert", "tiny-demo", "--out", "{w}/o.gguf"],
    ["quantize", "{bf16}", "-Q", "Q8_0", "--out-dir", "{w}/out"],
])
def test_a_full_disk_names_the_commands_own_output_options(argv: list[str], world: World,
                                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("mathq.fsutil.free_bytes", lambda _path: 1000)
    values = world.values()
    argv = [a.format(**values) for a in argv]
    code, output = _invoke(argv)
    line = check_error_lines(output, cli.commands[argv[0]], code)
    assert code == 1 and "not enough disk space" in line and "free some space" in line, line
    assert "--out" in line and "--build-dir" in line, line


LONG = "a" * 50_000


@pytest.mark.parametrize(("path", "command"), [
    (p, c) for p, c in commands() if any(isinstance(a, click.Argument) for a in c.params)],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_fifty_thousand_characters_are_not_echoed_back(path: tuple[str, ...],
                                                       command: click.Command, world: World):
    """Each command's first argument, 50,000 characters long: refused in one short line."""
    code, output = _invoke([*path, LONG])
    line = check_error_lines(output, command, code)
    assert code in (1, 2) and LONG not in output
    assert len(output) < 2000, output[:500]
    assert line


@pytest.mark.parametrize("value", [LONG, LONG + "/x", "ns/" + LONG])
def test_a_long_namespace_is_shortened(value: str, world: World):
    code, output = _invoke(["publish", "tiny-demo", "--namespace", value, "--tag", "latest"])
    line = check_error_lines(output, cli.commands["publish"], code)
    assert code == 2 and "characters)" in line and len(line) < 400, line


def _damaged_gguf(src: Path, dest: Path, keep: float | None = None,
                  arch: bytes | None = None) -> Path:
    data = src.read_bytes()
    if arch is not None:
        at = data.index(b"llama", data.index(b"general.architecture"))
        data = data[:at] + arch + data[at + len(arch):]
    if keep is not None:
        data = data[:int(len(data) * keep)]
    dest.write_bytes(data)
    return dest


def test_llama_cpp_s_own_reason_reaches_the_error_line(world: World):
    """An architecture llama.cpp does not know: its words, not "no reason given"."""
    bad = _damaged_gguf(world.bf16, world.root / "zz.gguf", arch=b"zzzzz")
    code, output = _invoke(["kld", str(world.q8), "--reference", str(bad), "--out-dir",
                            str(world.root / "k")])
    line = check_error_lines(output, cli.commands["kld"], code)
    assert code == 1 and "unknown model architecture: 'zzzzz'" in line, line
    assert "no reason" not in line


def test_a_cut_file_is_named_with_where_it_is_cut(world: World):
    """kld reads every header before its reference pass, so a cut reference is named by
    mathq's own reader (which tensor runs past the end), before llama.cpp loads anything."""
    cut = _damaged_gguf(world.bf16, world.root / "cut.gguf", keep=0.6)
    code, output = _invoke(["kld", str(world.q8), "--reference", str(cut), "--out-dir",
                            str(world.root / "k")])
    line = check_error_lines(output, cli.commands["kld"], code)
    assert code == 1 and "runs past the end of the file" in line, line
    assert "no reason" not in line


@pytest.mark.parametrize(("field", "value", "words"), [
    ("mean_kld", float("nan"), "NaN, which is not a finite number"),
    ("mean_kld", "0.01", "mean_kld must be a number, got a string"),
    ("n_tokens", 1.5, "n_tokens must be an integer, got a number"),
    ("same_top", [1], "same_top must be an object, got an array"),
])
def test_a_damaged_summary_is_named_by_the_report(field: str, value: object, words: str,
                                                  world: World):
    code, output = _invoke(["kld", "tiny-demo", "-Q", "Q8_0", "--chunks", "1"])
    assert code == 0, output
    summary = world.build / "tiny-demo" / "kld" / "Q8_0.json"
    data = json.loads(summary.read_text())
    data[field] = value
    summary.write_text(json.dumps(data))
    code, output = _invoke(["report", "tiny-demo"])
    line = check_error_lines(output, cli.commands["report"], code)
    assert code == 1 and "Q8_0.json" in line and words in line, line


# --- class 7: judgement ------------------------------------------------------------------

def test_a_repeated_id_is_refused_not_counted_twice(tmp_path: Path):
    line = '{"id": "%s", "answer": "5", "completion": "\\\\boxed{5}"}\n'
    results = tmp_path / "r.jsonl"
    results.write_text(line % "a" + line % "b" + line % "a")
    code, output = _invoke(["grade", str(results)])
    error = check_error_lines(output, cli.commands["grade"], code)
    assert code == 2 and "r.jsonl:3: id 'a' repeats line 1" in error, error


@pytest.mark.parametrize(("old", "new"), [
    ('license_name = "MIT"', 'license_name = "The \\"\\"\\"Quoted\\"\\"\\" License"'),
    ('license_name = "MIT"', 'license_name = "MIT\\u0007"'),
])
def test_a_recipe_value_a_modelfile_cannot_hold_is_bad_input(old: str, new: str,
                                                              tmp_path: Path):
    repo = Path(__file__).resolve().parents[2]
    text = (repo / "recipes" / "tiny-demo.toml").read_text().replace(
        '"../models/', f'"{repo}/models/')
    assert old in text
    recipe = tmp_path / "r.toml"
    recipe.write_text(text.replace(old, new, 1))
    code, output = _invoke(["modelfile", str(recipe), "--out", str(tmp_path / "mf")])
    line = check_error_lines(output, cli.commands["modelfile"], code)
    assert code == 2 and "r.toml" in line, line
    assert not (tmp_path / "mf").exists()
