"""The one way mathq reads a file the user named, and the one reader of numbers in JSON/TOML.

Every input file (a command's argument, a file a recipe names, a file inside a checkpoint)
is opened by :func:`read_bytes` / :func:`read_text`: a named pipe would block the command
forever, ``/dev/zero`` would be read until memory runs out, a folder or a symbolic-link loop
would surface as an OS error traceback. Here each is refused in words before one byte is read,
and a regular file larger than the caller's limit is refused by its size. Files streamed
rather than read whole (GGUF, safetensors, importance matrices) are checked with
:func:`file_problem` before they are opened, and the command line checks every path it is
given the same way when it parses it (:mod:`mathq.cli.types`).

Every JSON or TOML document goes through :func:`parse_json` / :func:`parse_toml`, which
refuse what Python cannot hold as a plain number (NaN and infinities where the format is
lax, integers longer than the int-string limit, floats that overflow to infinity) and
nesting deep enough to exhaust the stack, each as one :class:`UnreadableInput`.

The callers wrap :class:`UnreadableInput` into their own area's error (recipe, problem set,
checkpoint, ...), which names the file and the fix.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from mathq.fsutil import format_bytes, os_reason, special_file_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: The default limit on one input file: text inputs (recipes, suites, corpora, results)
#: are megabytes; a gigabyte is a wrong file, not a large one.
DEFAULT_LIMIT = 1 << 30


class UnreadableInput(ValueError):
    """An input that cannot be used; ``str()`` is the words for the problem, without the
    file's name: the caller writes ``f"{path} {problem}"`` for a problem of the file itself
    (:attr:`of_file`: "is a directory") and ``f"{path}: {problem}"`` for one of its content
    ("not valid JSON (...)"); :func:`describe` does that."""

    def __init__(self, problem: str, of_file: bool = False) -> None:
        super().__init__(problem)
        self.of_file = of_file

    def describe(self, path: Path | str) -> str:
        """``path`` and the problem, in one phrase."""
        return f"{path} {self}" if self.of_file else f"{path}: {self}"


def file_problem(path: Path | str) -> str | None:
    """What keeps ``path`` from being read as a regular file, in words, or None.

    ``stat`` follows symbolic links (a link to a regular file is one); a loop of links is
    named as such rather than as a missing file.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        return _stat_problem(e)
    return special_file_problem(st.st_mode)


def _stat_problem(err: OSError) -> str:
    if err.errno == errno.ENOENT:
        return "does not exist"
    if err.errno == errno.ELOOP:
        return "is a loop of symbolic links"
    return f"cannot be read: {os_reason(err)}"


def read_bytes(path: Path | str, limit: int = DEFAULT_LIMIT) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, or :class:`UnreadableInput`.

    The file is opened non-blocking and checked on the open descriptor, so a named pipe put
    in the file's place after a check is refused too instead of blocking.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UnreadableInput(_stat_problem(e) if e.errno != errno.EISDIR
                              else "is a directory", of_file=True) from None
    try:
        st = os.fstat(fd)
        if (problem := special_file_problem(st.st_mode)) is not None:
            raise UnreadableInput(problem, of_file=True)
        if st.st_size > limit:
            raise UnreadableInput(f"is too large: {format_bytes(st.st_size)} (at most "
                                  f"{format_bytes(limit)} expected)", of_file=True)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UnreadableInput(f"cannot be read: {os_reason(e)}", of_file=True) from None
    finally:
        os.close(fd)
    if len(data) > limit:  # grew while being read
        raise UnreadableInput(f"is too large (more than {format_bytes(limit)})", of_file=True)
    return data


def read_text(path: Path | str, limit: int = DEFAULT_LIMIT) -> str:
    """:func:`read_bytes` decoded as UTF-8; bytes that are not UTF-8 are named by offset."""
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnreadableInput(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                              f"{e.start})") from None


def _int_digits_limit() -> int:
    return sys.get_int_max_str_digits() or 4300


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("+-"))
    if digits > _int_digits_limit():
        raise UnreadableInput(f"an integer of {digits:,} digits (Python reads at most "
                              f"{_int_digits_limit():,})")
    return int(text.replace("_", ""))


def _parse_float(text: str) -> float:
    value = float(text.replace("_", ""))
    if not math.isfinite(value):
        raise UnreadableInput(f"{text[:40]!r}, which is not a finite number")
    return value


def _refuse_constant(name: str) -> float:
    raise UnreadableInput(f"{name}, which is not a finite number")


def parse_json(text: str | bytes) -> Any:
    """A JSON document with only finite, representable numbers, or :class:`UnreadableInput`
    (syntax, with line and column; NaN/Infinity; an overlong integer; a float that
    overflows; nesting that would exhaust the stack)."""
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise UnreadableInput(f"not valid JSON ({e.msg} at {where})") from None
    except RecursionError:
        raise UnreadableInput("not valid JSON: nested too deeply") from None
    except UnicodeDecodeError as e:
        raise UnreadableInput(f"not UTF-8 text (at offset {e.start})") from None


def parse_toml(text: str) -> dict[str, Any]:
    """A TOML document with only finite, representable numbers, or :class:`UnreadableInput`
    (syntax, with tomllib's position; nan/inf; an overlong integer; deep nesting)."""
    try:
        return tomllib.loads(text, parse_float=_parse_float)
    except tomllib.TOMLDecodeError as e:
        raise UnreadableInput(f"not valid TOML: {e}") from None
    except RecursionError:
        raise UnreadableInput("not valid TOML: nested too deeply") from None
    except UnreadableInput:
        raise
    except ValueError as e:  # int(): Python's limit on the digits of an integer
        raise UnreadableInput(f"an integer longer than Python reads ({str(e)[:60]})") from None


def finite(value: object) -> bool:
    """Whether ``value`` is a real number (not a bool) that is neither NaN nor infinite."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
