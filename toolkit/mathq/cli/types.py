"""The Click parameter types of every numeric option and every input-file option.

One place decides what a number on the command line may be: :class:`Int` and :class:`Float`
refuse NaN and infinities (Click's ``FloatRange`` lets them through, since every comparison
with NaN is false), take a lower *and an upper* bound (a 5,000-digit count would reach C code
as an overflow, or Python's int-string limit as a traceback), and name a refused value
shortened, so a megabyte of digits is not echoed back. :class:`InputFile` refuses, at parse
time and before any work, what :func:`mathq.inputs.file_problem` refuses: a named pipe, a
device, a folder, a loop of links, a missing file.

``NumberType`` is what the hostile-input suite walks: every option whose type is one is fed
NaN, infinities, negative, zero and huge values, so a new numeric option is covered the day
it is added (and one added with a plain ``int`` fails that suite's census).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import click

from mathq.errors import shorten
from mathq.inputs import file_problem


class NumberType(click.ParamType):
    """A numeric option: finite, between :attr:`low` and :attr:`high`."""

    low: float
    high: float


def _number_text(value: Any) -> str:
    return shorten(str(value).strip(), 40)


class Int(NumberType):
    """An integer from ``low`` to ``high`` inclusive."""

    name = "integer"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            text = str(value).strip().replace("_", "")
            digits = text[1:] if text[:1] in ("+", "-") else text  # one sign at most
            try:
                if not digits.isdecimal() or len(digits) > 30:
                    raise ValueError(text)
                number = int(text)
            except ValueError:
                self.fail(f"{_number_text(value)!r} is not a whole number from {self.low} "
                          f"to {self.high}", param, ctx)
        if not self.low <= number <= self.high:
            self.fail(f"{_number_text(value)} is not in the range {self.low} to {self.high}",
                      param, ctx)
        return number

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        return "INTEGER"

    def __repr__(self) -> str:
        return f"Int({self.low}, {self.high})"


class Float(NumberType):
    """A finite number from ``low`` to ``high``; ``low_open`` excludes ``low`` itself."""

    name = "float"

    def __init__(self, low: float, high: float, low_open: bool = False) -> None:
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            number = float(value) if len(str(value)) <= 100 else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            self.fail(f"{_number_text(value)!r} is not a finite number", param, ctx)
        below = number <= self.low if self.low_open else number < self.low
        if below or number > self.high:
            bound = f"above {self.low}" if self.low_open else f"from {self.low}"
            self.fail(f"{_number_text(value)} is not a number {bound} to {self.high}", param,
                      ctx)
        return number

    def __repr__(self) -> str:
        return f"Float({self.low}, {self.high})"


class Parallel(Int):
    """``--parallel``: a number of sequences from 1 to :data:`MAX_PARALLEL`, or ``auto``
    (:data:`mathq.llama.runtime.PARALLEL_AUTO`: sized to the free GPU memory)."""

    def __init__(self) -> None:
        super().__init__(1, MAX_PARALLEL)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        from mathq.llama.runtime import PARALLEL_AUTO

        if str(value).strip().lower() == "auto" or value == PARALLEL_AUTO:
            return PARALLEL_AUTO
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as e:
            self.fail(f"{e.message} (or 'auto')", param, ctx)

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        return "N|auto"


class IntList(Int):
    """Comma-separated integers, each from ``low`` to ``high``; an empty list is allowed."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[int, ...]:  # type: ignore[override]
        if isinstance(value, tuple):
            return value
        return tuple(super(IntList, self).convert(v, param, ctx)
                     for v in str(value).split(",") if v.strip())

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        return "LIST"


class ByteSize(NumberType):
    """A size in bytes (``4.2GiB``, ``4200MB``, ``1879136``), as
    :func:`mathq.tune.plan.parse_size` reads it, from 1 byte to a petabyte."""

    name = "size"
    low, high = 1, 10**15

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        from mathq.errors import MathqError
        from mathq.tune.plan import parse_size

        if isinstance(value, int):
            return value
        try:
            if len(str(value)) > 100:
                raise MathqError("too long", "write it as a number with a unit, e.g. 4.2GiB")
            size = parse_size(str(value))
        except MathqError as e:
            self.fail(f"{_number_text(value)!r} is not a size ({e.hint})", param, ctx)
        if size > self.high:
            self.fail(f"{_number_text(value)} is larger than any model file", param, ctx)
        return size

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        return "SIZE"


#: Bounds shared by several commands' options.
MAX_TOKENS = 1 << 20        # a context (or prompt, or answer) of a million tokens
MAX_CHUNKS = 1_000_000      # chunks of text a KLD or imatrix pass reads
MAX_PROBLEMS = 10_000_000   # problems a run may take
MAX_THREADS = 4096
MAX_PARALLEL = 256          # sequences decoded together in one context
MAX_SECONDS = 7 * 24 * 3600  # a week, for any timeout
SEED = Int(-(2**63), 2**63 - 1)


class OutputPath(click.Path):
    """Where a command writes: a folder (``folder=True``) or a file, which need not exist.

    Refused when the command line is parsed, before any work: a name held by something
    that is neither (a named pipe, a device, a loop of links, a folder given for a file or
    a file for a folder), as :func:`mathq.inputs.file_problem` names it. A name that does
    not exist is fine: the command makes it.
    """

    def __init__(self, folder: bool) -> None:
        super().__init__(file_okay=not folder, dir_okay=folder, path_type=Path)
        self.folder = folder

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        refuse_empty(self, value, "a path", param, ctx)
        path = Path(value)
        problem = file_problem(path)
        if ((problem == "is a directory" and self.folder) or problem == "does not exist"
                or (problem is not None and problem.startswith("cannot be read"))):
            problem = None  # to be made, or a problem the write names in its own words
        elif problem is None and self.folder:
            problem = "is a file, not a folder"
        elif problem is not None and self.folder:
            problem = problem.replace("not a regular file", "not a folder")
        if problem is not None:
            self.fail(f"{shorten(str(path))} {problem}", param, ctx)
        return super().convert(value, param, ctx)


#: Endings that make a value a path, not a name (a recipe, suite or calibration set).
FILE_SUFFIXES = (".gguf", ".toml", ".jsonl", ".json", ".txt", ".md", ".dat", ".text")


def refuse_empty(kind: click.ParamType, value: Any, wanted: str, param: click.Parameter | None,
                 ctx: click.Context | None) -> None:
    """Fail on an empty or blank value: as a path it would be the working folder
    (``Path("")`` is ``.``), and a command would take an empty name as "not given"."""
    if isinstance(value, str) and not value.strip():
        kind.fail(f"is empty: give {wanted}", param, ctx)


class FileOrName(click.ParamType):
    """A name (a recipe, a suite, a calibration set) or the path of a file (a folder too
    with ``folder_ok``). A value that looks like a path (it holds a ``/``, ends in a
    file's suffix, or names something other than a folder that exists) is checked when the
    command line is parsed, as :class:`InputFile` checks one; a name passes as it is, for
    the command to look up."""

    name = "text"

    def __init__(self, folder_ok: bool = False) -> None:
        self.folder_ok = folder_ok

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        text = str(value)
        refuse_empty(self, text, "a name or a file's path", param, ctx)
        # A folder that happens to share a name (build/tiny-demo/ under the working folder)
        # does not turn the name into a path; anything else that exists does.
        if "/" in text or os.sep in text or Path(text).suffix.lower() in FILE_SUFFIXES \
                or (os.path.lexists(text) and not os.path.isdir(text)):
            problem = file_problem(text)
            if problem is not None and not (problem == "is a directory" and self.folder_ok):
                self.fail(f"{shorten(text)} {problem}", param, ctx)
        return text


class InputFile(click.ParamType):
    """A regular file that exists and can be opened, checked when the command line is
    parsed (before the command loads a model), as :func:`mathq.inputs.file_problem` sees
    it. Converts to a :class:`~pathlib.Path`."""

    name = "file"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Path:
        refuse_empty(self, value, "a file's path", param, ctx)
        path = Path(value)
        if (problem := file_problem(path)) is not None:
            self.fail(f"{shorten(str(path))} {problem}", param, ctx)
        return path

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        return "FILE"
