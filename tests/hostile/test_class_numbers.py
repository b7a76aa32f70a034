"""Class 1, numbers that are not numbers: every numeric option of every command, generated.

Each option whose type is a :class:`mathq.cli.types.NumberType` gets NaN, infinities,
negative, zero, huge (a 5,000-digit integer, 1e999) and malformed values. The command's
body is replaced by a recorder for these cases: what is tested is the one place that
decides what a number may be, and a refused value must never reach a command's body (no
llama.cpp work is started to reach a bad option). Each case asserts:

- no traceback; a refusal exits 2 with one ``Error:`` line that names the option, of
  bounded length (the 5,000 digits are not echoed back), and names no option the command
  lacks;
- an accepted value reaches the command finite and within the type's bounds.

Hypothesis then drives the types and the JSON/TOML number readers with arbitrary text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from mathq.cli import cli
from mathq.cli.types import Float, InputFile, Int, IntList, NumberType
from mathq.inputs import UnreadableInput, parse_json, parse_toml
from tests.hostile.census import check_error_lines, commands, long_name, quoted_option

HOSTILE_NUMBERS = ("nan", "NaN", "inf", "-inf", "Infinity", "-1", "0", "1e308", "1e999",
                   "9" * 5000, "-" + "9" * 5000, "0x10", "", " ", "1,5", "4.5.6", "١٢", "²", "½",
                   "--5", "-+1")

NUMERIC = [(path, command, param) for path, command in commands()
           for param in command.params if isinstance(param.type, NumberType)]


def _argv(path: tuple[str, ...], command: click.Command, param: click.Parameter, value: str,
          a_file: Path) -> list[str]:
    """The command line with ``param`` set to ``value`` and every argument filled."""
    argv = list(path)
    for p in command.params:
        if isinstance(p, click.Argument) and p.required:
            argv.append(str(a_file) if isinstance(p.type, InputFile) else "tiny-demo")
    return [*argv, long_name(param), value]


def _in_bounds(kind: NumberType, value: Any) -> bool:
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if isinstance(kind, Int) and not isinstance(v, int) and v is not None:
            return False
        if not (math.isfinite(v) and kind.low <= v <= kind.high):
            from mathq.llama.runtime import PARALLEL_AUTO

            if v != PARALLEL_AUTO:
                return False
    return True


@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=lambda v: v[:12] or "empty")
@pytest.mark.parametrize(("path", "command", "param"), NUMERIC,
                         ids=[f"{' '.join(p)} {long_name(o)}" for p, _c, o in NUMERIC])
def test_hostile_number(path: tuple[str, ...], command: click.Command, param: click.Parameter,
                        value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    a_file = tmp_path / "results.jsonl"
    a_file.write_text('{"id": "1", "answer": "5", "completion": "\\\\boxed{5}"}\n')
    seen: dict[str, Any] = {}
    monkeypatch.setattr(command, "callback", lambda **kwargs: seen.update(kwargs))
    result = CliRunner().invoke(cli, _argv(path, command, param, value, a_file),
                                catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    line = check_error_lines(result.output, command, result.exit_code)
    if result.exit_code:
        assert result.exit_code == 2, result.output
        assert long_name(param) in quoted_option(line), line
        assert not seen, "a refused value reached the command's body"
    else:
        assert _in_bounds(param.type, seen[param.name]), (value, seen[param.name])


def test_every_numeric_option_uses_mathqs_types():
    """No option parses a number with Click's own types (FloatRange lets NaN through, and
    neither bounds a count from above): a new one must use mathq.cli.types."""
    plain = [f"mathq {' '.join(path)} {long_name(p)}" for path, command in commands()
             for p in command.params
             if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))]
    assert plain == []
    assert len(NUMERIC) >= 30  # the census finds the options it is meant to


# --- the types and readers, driven by Hypothesis -----------------------------------------

TYPES = [Int(-5, 10**6), Int(1, 256), Float(0.1, 3600.0), Float(0, 32, low_open=True),
         IntList(1, 256)]


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(TYPES), text=st.one_of(
    st.text(max_size=40), st.from_regex(r"-?[0-9_]{1,40}(\.[0-9]+)?(e-?[0-9]{1,4})?"),
    st.text(st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=6),
    st.floats().map(repr), st.integers().map(str)))
def test_number_types_accept_in_range_finite_values_or_refuse_in_words(kind, text):
    try:
        value = kind.convert(text, None, None)
    except click.BadParameter as e:
        assert len(e.message) < 300
        return
    assert _in_bounds(kind, value), (text, value)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.integers(), st.floats(), st.booleans(), st.none(),
                       st.text(max_size=20)))
def test_parse_json_reads_back_finite_numbers_and_refuses_the_rest(value):
    text = json.dumps({"v": value})  # Python writes NaN and Infinity, which JSON lacks
    if isinstance(value, float) and not math.isfinite(value):
        with pytest.raises(UnreadableInput, match="not a finite number"):
            parse_json(text)
    else:
        assert parse_json(text) == {"v": value}


@settings(max_examples=200, deadline=None)
@given(digits=st.integers(1, 6000), where=st.sampled_from(["{v}", "[1, {v}]", '{{"a": {v}}}']))
def test_parse_json_refuses_integers_longer_than_python_reads(digits, where):
    text = where.format(v="7" * digits)
    if digits > 4300:
        with pytest.raises(UnreadableInput, match="an integer of"):
            parse_json(text)
    else:
        parse_json(text)


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_parse_json_never_raises_anything_else(text):
    try:
        parse_json(text)
    except UnreadableInput as e:
        assert str(e)


def test_parse_json_refuses_deep_nesting():
    with pytest.raises(UnreadableInput, match="nested too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000)


@settings(max_examples=300, deadline=None)
@given(number=st.one_of(st.sampled_from(["nan", "+nan", "-nan", "inf", "+inf", "-inf",
                                         "1e999", "-1e999", "9" * 5000, "1_000", "0x1f"]),
                        st.floats(allow_nan=False, allow_infinity=False).map(repr),
                        st.integers().map(str)))
def test_parse_toml_reads_finite_numbers_or_refuses_in_words(number):
    try:
        value = parse_toml(f"v = {number}\n")["v"]
    except UnreadableInput as e:
        assert str(e)
        return
    assert isinstance(value, (int, float)) and math.isfinite(value)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_parse_toml_never_raises_anything_else(text):
    try:
        parse_toml(text)
    except UnreadableInput as e:
        assert str(e)


@pytest.mark.parametrize("text", ["v = " + "[" * 100_000 + "]" * 100_000,
                                  "v = " + "{a=" * 100_000 + "1" + "}" * 100_000])
def test_parse_toml_refuses_deep_nesting(text):
    with pytest.raises(UnreadableInput, match="nested too deeply"):
        parse_toml(text)


#: Commands cheap enough to run for real with every numeric option at its bounds.
CHEAP = {("grade",): "{results}", ("problems", "show"): "{suite}"}
BOUNDS = [(path, command, param, which) for path, command, param in NUMERIC if path in CHEAP
          for which in ("low", "high")]


@pytest.mark.parametrize(("path", "command", "param", "which"), BOUNDS,
                         ids=[f"{' '.join(p)} {long_name(o)} {w}" for p, _c, o, w in BOUNDS])
def test_numbers_at_their_bounds_run_for_real(path: tuple[str, ...], command: click.Command,
                                             param: click.Parameter, which: str,
                                             tmp_path: Path):
    """An accepted extreme is handled by the command itself, not only by its type."""
    results = tmp_path / "r.jsonl"
    results.write_text('{"id": "1", "answer": "5", "completion": "\\\\boxed{5}"}\n')
    suite = Path(__file__).resolve().parents[2] / "models" / "tiny-demo" / "problems.jsonl"
    value = getattr(param.type, which)
    argv = [*path, CHEAP[path].format(results=results, suite=suite), long_name(param),
            str(value), "--out", str(tmp_path / "out.jsonl")]
    result = CliRunner().invoke(cli, argv, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    check_error_lines(result.output, command, result.exit_code)
    assert result.exit_code in (0, 2), result.output
