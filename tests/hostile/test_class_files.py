"""Class 2, files that are not files: every file argument of every command, generated.

A parameter takes a file when its type is mathq's :class:`~mathq.cli.types.InputFile` or
:class:`~mathq.cli.types.OutputPath`, or when its metavar names one (FILE, GGUF, RECIPE,
HF_DIR, SUITE): a new file option is covered the day it is added. Inputs get a named pipe,
a link to ``/dev/zero``, ``/dev/zero`` itself, a folder, a loop of symbolic links and a
missing file; outputs get a named pipe, a link to ``/dev/zero``, a loop, and a file where a
folder belongs (a folder where a file belongs); every one gets an empty value (as a path,
the working folder). Each case runs the real command in a world
holding a built demo model, and asserts: no traceback and no hang (a pipe opened for reading
would block forever, ``/dev/zero`` read to the end would never end), exit 1 or 2 with one
``Error:`` line that names the problem and only options the command has, and nothing left
behind or changed.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from mathq.cli import cli
from mathq.cli.types import FileOrName, InputFile, OutputPath
from tests.hostile.census import check_error_lines, commands, long_name
from tests.hostile.conftest import REPO, World
from tests.hostile.harness import snapshot

FILE_WORDS = ("FILE", "GGUF", "RECIPE", "HF_DIR", "SUITE")

#: A command line per command that reaches its file parameters: everything else valid.
BASE: dict[str, list[str]] = {
    "build": ["tiny-demo", "--files-only", "-Q", "Q8_0"],
    "download": ["deepseek-math-7b-rl"],
    "convert": ["tiny-demo", "--out", "{w}/o.gguf"],
    "imatrix": ["{bf16}", "-c", "{repo}/models/tiny-demo/problems.jsonl", "--smoke-suite",
                "{repo}/models/tiny-demo/problems-distractor.jsonl", "--out", "{w}/m.gguf"],
    "quantize": ["{bf16}", "-Q", "Q8_0", "--out-dir", "{w}/out"],
    "tune": ["tiny-demo", "--match", "Q8_0", "-c", "{repo}/models/tiny-demo/problems.jsonl"],
    "modelfile": ["tiny-demo", "--out", "{w}/mf"],
    "smoke": ["tiny-demo", "-Q", "Q8_0", "--n", "1"],
    "bench": ["tiny-demo", "-Q", "Q8_0", "-p", "8", "-n", "4", "-r", "1", "--parallel", "1"],
    "kld": ["tiny-demo", "-Q", "Q8_0"],
    "report": ["tiny-demo"],
    "publish": ["tiny-demo", "--no-push", "--tag", "latest", "--dry-run"],
    "recipes show": ["tiny-demo"],
    "problems show": ["{repo}/models/tiny-demo/problems.jsonl"],
    "grade": ["{w}/r.jsonl"],
    "quants": [],
}
#: Where one parameter needs another base: a GGUF --reference goes with a GGUF source.
BASE_FOR = {("kld", "--reference"): ["{q8}", "--out-dir", "{w}/k"],
            ("kld", "RECIPE|GGUF"): ["{q8}", "--reference", "{bf16}", "--out-dir", "{w}/k"],
            ("smoke", "--recipe"): ["{q8}", "--n", "1", "--out-dir", "{w}/s"],
            ("smoke", "RECIPE|GGUF"): ["{q8}", "--recipe", "tiny-demo", "--n", "1",
                                      "--out-dir", "{w}/s"],
            ("bench", "RECIPE|GGUF"): ["{q8}", "-p", "8", "-n", "4", "-r", "1",
                                      "--parallel", "1"],
            ("build", "--calibration"): ["tiny-demo", "--files-only", "-Q", "Q8_0", "--imatrix"]}


def _metavar(param: click.Parameter) -> str:
    return param.metavar or (param.name or "").upper()


def _role(param: click.Parameter) -> str | None:
    """``input``, ``folder`` (an output folder), ``output`` (an output file) or None."""
    if isinstance(param, click.Option) and param.is_flag:
        return None
    if isinstance(param.type, OutputPath):
        return "folder" if param.type.folder else "output"
    if isinstance(param.type, InputFile) or any(w in _metavar(param) for w in FILE_WORDS):
        return "input"
    return None


def _suffix(param: click.Parameter) -> str:
    """The name ending that sends a value down the file route (``.gguf`` for RECIPE|GGUF)."""
    meta = _metavar(param)
    if "HF_DIR" in meta:
        return ""
    if "GGUF" in meta:
        return ".gguf"
    if "RECIPE" in meta:
        return ".toml"
    if "SUITE" in meta:
        return ".jsonl"
    return ".txt"


#: What each hostile kind is, and the words its error must hold.
KINDS: dict[str, tuple[str, ...]] = {
    "input": ("fifo", "zero-link", "dev-zero", "folder", "loop", "missing", "empty"),
    "folder": ("fifo", "zero-link", "loop", "file", "empty"),
    "output": ("fifo", "zero-link", "loop", "folder", "empty"),
}
WORDS = {"fifo": r"named pipe", "zero-link": r"device", "dev-zero": r"device",
         "folder": r"directory|folder|no config\.json", "loop": r"loop of symbolic links",
         "missing": r"does not exist|not found", "file": r"not a folder",
         "empty": r"is empty|got ''"}  # "" is the working folder as a path


def _make(kind: str, w: World, suffix: str) -> str:
    """The hostile path of ``kind`` under the world (``/dev/zero`` itself for dev-zero)."""
    if kind == "dev-zero":
        return "/dev/zero"
    if kind == "empty":
        return ""
    path = w.root / f"hostile-{kind}{suffix}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero-link":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    elif kind == "loop":
        path.symlink_to(path.name)
    elif kind == "file":
        path.write_text("a file\n")
    return str(path)


def _cases() -> Iterator[tuple[str, click.Command, click.Parameter, str, str]]:
    for path, command in commands():
        for param in command.params:
            role = _role(param)
            if role is not None:
                for kind in KINDS[role]:
                    yield " ".join(path), command, param, role, kind


CASES = list(_cases())


def _argv(name: str, param: click.Parameter, hostile: str) -> list[str]:
    """BASE with ``param`` set to ``hostile`` (an argument replaces the first one; an
    option replaces the base's own value of it)."""
    base = BASE_FOR.get((name, long_name(param)), BASE[name])
    argv = list(base)
    if isinstance(param, click.Argument):
        argv[0] = hostile
        return [*name.split(), *argv]
    for opt in param.opts:
        if opt in argv:
            i = argv.index(opt)
            del argv[i:i + 2]
    return [*name.split(), *argv, long_name(param), hostile]


class Hung(Exception):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise Hung("the command did not finish in 30 s (blocked on a pipe or reading forever?)")


def _invoke_within_30s(argv: list[str]) -> Result:
    """The command run in process, raising Hung after 30 s (a read blocked on a pipe) and
    re-raising anything but its exit."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(30)
    try:
        result = CliRunner().invoke(cli, argv, catch_exceptions=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.mark.parametrize(("name", "command", "param", "role", "kind"), CASES,
                         ids=[f"{n} {long_name(p)} {k}" for n, _c, p, _r, k in CASES])
def test_file_that_is_not_a_file(name: str, command: click.Command, param: click.Parameter,
                                 role: str, kind: str, world: World):
    (world.root / "r.jsonl").write_text(
        '{"id": "1", "answer": "5", "completion": "\\\\boxed{5}"}\n')
    hostile = _make(kind, world, _suffix(param) if role == "input" else "")
    values = {**world.values(), "repo": str(REPO)}
    argv = [a.format(**values) if "{" in a else a for a in _argv(name, param, hostile)]
    before = snapshot(world.root)
    started = time.monotonic()
    result = _invoke_within_30s(argv)
    line = check_error_lines(result.output, command, result.exit_code)
    assert result.exit_code in (1, 2), result.output
    assert re.search(WORDS[kind], line), line
    assert time.monotonic() - started < 30
    after = snapshot(world.root)
    assert after == before, "left behind / removed / changed: " + str(
        sorted(set(after) ^ set(before)))


def test_every_path_parameter_uses_mathqs_types():
    """A plain click.Path passes named pipes, devices and loops; a plain string that names a
    file is never checked before the command runs: new ones must use mathq.cli.types."""
    plain = [f"mathq {' '.join(path)} {long_name(p)}" for path, command in commands()
             for p in command.params
             if type(p.type) is click.Path or (
                 _role(p) == "input" and not isinstance(p.type, (InputFile, FileOrName))
                 and long_name(p) != "--reference")]  # kld's BF16|Q8_0|GGUF: own callback
    assert plain == []


def test_every_command_has_a_base_command_line():
    """A new command needs a BASE line here (its file arguments are then covered)."""
    assert {" ".join(path) for path, _c in commands()} == set(BASE)
    assert len(CASES) >= 100


# --- files a recipe names ------------------------------------------------------------------

RECIPE_TEXT = (REPO / "recipes" / "tiny-demo.toml").read_text()
#: Each path field of a recipe: the line that sets it, and a command that reads the file.
RECIPE_PATHS = {
    "model.local_dir": ('local_dir = "../models/tiny-demo"', ["convert", "{recipe}", "--out",
                                                              "{w}/o.gguf"]),
    "smoke.suite": ('suite = "../models/tiny-demo/problems-distractor.jsonl"',
                    ["smoke", "{recipe}", "-Q", "Q8_0", "--n", "1", "--out-dir", "{w}/s"]),
    "kld.corpus": ('corpus = "../models/tiny-demo/kld-text.txt"',
                   ["kld", "{recipe}", "-Q", "Q8_0", "--chunks", "1"]),
}
RECIPE_CASES = [(f, k) for f in RECIPE_PATHS
                for k in ("fifo", "zero-link", "folder", "loop", "missing")
                if not (f == "model.local_dir" and k == "folder")]


@pytest.mark.parametrize(("field", "kind"), RECIPE_CASES, ids=[f"{f} {k}" for f, k in
                                                               RECIPE_CASES])
def test_a_file_a_recipe_names_that_is_not_a_file(field: str, kind: str, world: World):
    line_in_recipe, argv = RECIPE_PATHS[field]
    suffix = Path(line_in_recipe.split('"')[1]).suffix
    hostile = _make(kind, world, suffix)
    text = RECIPE_TEXT.replace('"../models/', f'"{REPO}/models/')
    key = line_in_recipe.split(" = ")[0]
    recipe = world.root / "tiny-demo.toml"
    recipe.write_text(text.replace(line_in_recipe.replace('"../models/', f'"{REPO}/models/'),
                                   f'{key} = "{hostile}"', 1))
    values = {**world.values(), "recipe": str(recipe)}
    argv = [a.format(**values) for a in argv]
    before = snapshot(world.root)
    result = _invoke_within_30s(argv)
    line = check_error_lines(result.output, cli.commands[argv[0]], result.exit_code)
    assert result.exit_code in (1, 2), result.output
    assert re.search(WORDS[kind] + "|not a folder", line), line
    assert snapshot(world.root) == before


def test_a_recipe_nested_100000_deep(tmp_path: Path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    result = CliRunner().invoke(cli, ["build", str(recipe)], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    line = check_error_lines(result.output, cli.commands["build"], result.exit_code)
    assert result.exit_code == 2 and "nested too deeply" in line, line
