"""Errors a user can cause, each naming the thing and the fix.

Every stage raises a subclass of :class:`MathqError`; the CLI prints it as one line
(``Error: message (hint)``) with the class's exit code and no traceback. Anything else
that escapes is a bug and keeps its traceback. Subclasses also derive from the matching
builtin so library callers can catch ``FileNotFoundError`` or ``ConnectionError`` as usual.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class MathqError(Exception):
    """Base class: a problem the user can fix, with a hint that says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


#: The longest piece of user input an error message repeats whole.
SHORTEN_LIMIT = 120


def shorten(text: str, limit: int = SHORTEN_LIMIT) -> str:
    """``text``, or, when longer than ``limit``, its start and end around an ellipsis and
    its length: an error line repeats the user's input so they can find it, and a
    50,000-character name buries the message instead."""
    if len(text) <= limit:
        return text
    keep = max(limit - 30, 8)
    return f"{text[:keep // 2]}…{text[-(keep - keep // 2):]} ({len(text):,} characters)"


class RecipeError(MathqError, ValueError):
    """A recipe is missing, unreadable or invalid; the message names file and field."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, *, path: str | None = None,
                 field: str | None = None) -> None:
        super().__init__(message, hint)
        self.path = path
        self.field = field


class InputFileError(MathqError, FileNotFoundError):
    """A file or folder the user named is missing or is not what the command needs."""


class CheckpointError(MathqError, ValueError):
    """A Hugging Face checkpoint is incomplete, corrupt, unsafe or of an unsupported kind."""


class DownloadError(MathqError, ConnectionError):
    """The Hub (or the endpoint in HF_ENDPOINT) could not provide the files."""


class UploadError(MathqError, ConnectionError):
    """The Hub (or the endpoint in HF_ENDPOINT) refused or failed an upload."""


class IntegrityError(MathqError, ValueError):
    """Bytes on disk do not match the hash their source published."""


class DiskSpaceError(MathqError, OSError):
    """Not enough free space for the planned output."""


class OutputError(MathqError, OSError):
    """An output file or folder cannot be written: read-only file system, no permission,
    disk full. Raised by :func:`mathq.fsutil.output_error`, the one place OS errors on output
    paths become messages; ``path`` is what could not be written."""

    def __init__(self, message: str, hint: str | None = None, *,
                 path: str | None = None, reason: str = "") -> None:
        super().__init__(message, hint)
        self.path = path
        self.reason = reason


class OutputBusyError(MathqError):
    """Another mathq run is writing the same output now (two runs into one folder): refused
    at once, so neither reads nor renames the other's half-written file."""


class GGUFError(MathqError, ValueError):
    """A GGUF file is malformed, or not the kind of GGUF the command needs."""


class QuantizeError(MathqError, RuntimeError):
    """llama.cpp refused or failed a quantization."""


class MissingImatrixError(QuantizeError):
    """A type that llama.cpp quantizes only with an importance matrix, asked for without one:
    the user's choice to fix (exit 2), not a failure of the quantizer."""

    exit_code = 2


class TensorTypeFileError(QuantizeError, ValueError):
    """A ``--tensor-type-file`` that cannot be read or holds a malformed line: bad input."""

    exit_code = 2


class TuneError(MathqError, ValueError):
    """A tuning request no file can meet (a budget below the smallest mix or above BF16, a
    size that is not one, a type the tuner cannot choose): the user's to fix."""

    exit_code = 2


class ServerError(MathqError, ConnectionError):
    """A server (Ollama, an OpenAI-compatible endpoint) is unreachable or refused a request."""


class InvalidNameError(MathqError, ValueError):
    """A namespace, model, tag or repo name breaks its registry's naming rules."""

    exit_code = 2


class InferenceError(MathqError, RuntimeError):
    """A model could not be run (context too small, decode failed) or a server broke off."""


class SmokeError(MathqError, RuntimeError):
    """A smoke run cannot go on: results made with other settings, a second writer, ..."""


class ModelfileError(MathqError, ValueError):
    """A Modelfile breaks Ollama's rules, or recipe text cannot be written into one safely."""


class RecipeModelfileError(ModelfileError, RecipeError):
    """A recipe value a Modelfile cannot hold (three quotes in a row, a control character):
    a bad recipe value like any other (exit 2), and a Modelfile problem to those who catch
    that."""


class ProblemSetError(MathqError, ValueError):
    """A problem set or results file is unknown, malformed or filtered to nothing.

    ``path`` and ``line`` name the offending file and 1-based line when there is one.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, *, path: str | None = None,
                 line: int | None = None) -> None:
        super().__init__(message, hint)
        self.path = path
        self.line = line


class CalibrationError(MathqError, ValueError):
    """Calibration text that cannot be used: unknown, empty, or holding graded problems."""

    exit_code = 2


class ImatrixComputeError(MathqError, RuntimeError):
    """An importance matrix could not be computed (model, text or llama.cpp failed)."""


class Terminated(BaseException):
    """A stop signal arrived: SIGINT (Ctrl-C) or SIGTERM (``kill``, a service manager, a CI
    timeout). A BaseException, like KeyboardInterrupt, so ``except Exception`` blocks let it
    through and every cleanup (temporary files deleted, locks released) runs on the way out;
    the command line then says so in one line and exits with 128 + the signal's number
    (130 for SIGINT, 143 for SIGTERM), as shells do."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum

    @property
    def signal_name(self) -> str:
        """``SIGINT`` or ``SIGTERM``, for the message."""
        return signal.Signals(self.signum).name


#: The signals that stop a command cleanly; both are handled the same way.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# A stop signal's exception, held while C code that calls back into Python runs (see
# hold_termination), and how deep such blocks are nested.
_held: list[Terminated] = []
_holding = [0]


@contextlib.contextmanager
def hold_termination() -> Iterator[None]:
    """Hold a stop signal that arrives inside the block until the block ends.

    For blocks in which C code calls back into Python (llama.cpp's log, evaluation and abort
    callbacks): Python runs a signal handler in whatever Python code runs next, there often
    the callback, and ctypes prints ("Exception ignored on calling ctypes callback
    function") and drops an exception raised in a callback, so the command would carry on.
    C code that can stop early asks :func:`termination_pending` from its callbacks. Only the
    main thread runs signal handlers, so in any other thread the block holds nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _holding[0] += 1
    try:
        yield
    finally:
        _holding[0] -= 1
    if not _holding[0] and _held:
        raise _held.pop()


def termination_pending() -> bool:
    """Whether a stop signal is held: callbacks answer llama.cpp "abort" with it."""
    return bool(_held)


def terminate(signum: int = signal.SIGTERM) -> None:
    """What a stop signal does in the command line: raise :class:`Terminated` now, or at the
    end of the :func:`hold_termination` block that is running."""
    if _holding[0]:
        _held.append(Terminated(signum))
        return
    raise Terminated(signum)


def _on_stop_signal(signum: int, _frame: object) -> None:
    for sig in STOP_SIGNALS:  # a second Ctrl-C or SIGTERM kills at once
        signal.signal(sig, signal.SIG_DFL)
    terminate(signum)


def handle_stop_signals() -> None:
    """Make SIGINT and SIGTERM unwind the command (temporary files removed, locks released)
    instead of killing it mid-write (SIGTERM's default) or raising KeyboardInterrupt
    wherever Python happens to be, a ctypes callback included (SIGINT's default)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)


def ignore_stop_signals() -> None:
    """Ignore SIGINT and SIGTERM once the command is over (its files renamed into place or
    removed, its one line printed): one arriving while the interpreter exits would raise in
    an atexit handler (a traceback), or, with the default action, turn a finished command
    into a killed one; now the process ends with the command's own exit code."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def interrupts_ignored_by_children() -> Iterator[None]:
    """Start worker processes inside this block. Ctrl-C reaches the terminal's whole process
    group, and a spawned interpreter hit while it starts up prints KeyboardInterrupt's
    traceback before any of mathq's code runs in it. An ignored signal stays ignored across
    exec, so SIGINT is ignored while the children start; it is blocked meanwhile too, and
    Linux keeps a blocked signal pending even while it is ignored, so this process still
    gets a Ctrl-C that arrived in between once the block ends. Only the main thread can
    change a handler: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def leave_interrupts_to_parent() -> None:
    """For a worker process's first line: Ctrl-C reaches the terminal's whole process group,
    and a worker would print KeyboardInterrupt's traceback; its parent stops it instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
