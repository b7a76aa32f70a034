"""The ``mathq`` command line: a thin layer that parses options and calls the library.

Every user-caused failure is a :class:`mathq.errors.MathqError`; the group below prints it
as one ``Error: ...`` line with its exit code and no traceback. An ``OSError`` that can only
come from writing (read-only file system, disk full), or a refused permission on a named
path, is turned into the same kind of line by :func:`mathq.fsutil.output_error`, and the
hint of an unwritable output names the command's own option for choosing another place.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from mathq import __version__
from mathq.cli.bench import bench
from mathq.cli.build import build
from mathq.cli.convert import convert
from mathq.cli.download import download
from mathq.cli.grade import grade
from mathq.cli.imatrix import imatrix
from mathq.cli.kld import kld
from mathq.cli.modelfile import modelfile
from mathq.cli.problems import problems
from mathq.cli.publish import publish
from mathq.cli.quantize import quantize
from mathq.cli.recipes import quants, recipes
from mathq.cli.report import report
from mathq.cli.smoke import smoke
from mathq.cli.tune import tune
from mathq.errors import (
    SHORTEN_LIMIT,
    DiskSpaceError,
    MathqError,
    OutputError,
    Terminated,
    handle_stop_signals,
    ignore_stop_signals,
    shorten,
)


class _UserError(click.ClickException):
    def __init__(self, text: str, exit_code: int) -> None:
        super().__init__(text)
        self.exit_code = exit_code


class MathqGroup(click.Group):
    """A group that lists commands in pipeline order and turns MathqError into a one-line
    message instead of a traceback: the one place every command's errors pass through, so
    the one place their words are fitted to the command (:func:`_for_command`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # the order of PIPELINE below, not alphabetical

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MathqError as e:
            raise _UserError(_for_command(e, ctx), e.exit_code) from None
        except Terminated as e:
            raise _stopped(e) from None
        except click.ClickException as e:  # Click's own usage errors repeat input too
            e.message = _shorten_words(e.message)
            raise
        except OSError as e:
            from mathq.fsutil import WRITE_ERRNOS, WRITE_ONLY_ERRNOS, output_error

            if e.errno in WRITE_ONLY_ERRNOS or (e.errno in WRITE_ERRNOS and e.filename):
                raise _UserError(_for_command(output_error(e), ctx), 1) from None
            raise


def _stopped(stop: Terminated) -> _UserError:
    """The one line a stop signal ends a command with, and its exit code (130, 143)."""
    err = MathqError(f"stopped by {stop.signal_name}; unfinished files were removed",
                     "run the same command again: finished work is kept")
    return _UserError(str(err), stop.exit_code)


#: Options that choose where a command writes, in the order a hint names them.
_OUTPUT_OPTIONS = ("--out-dir", "--out", "--dir", "--build-dir")
#: A long option named in a message (not inside a `quoted command`, whose options are its own).
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_QUOTED = re.compile(r"`[^`]*`")


def _command_options(ctx: click.Context) -> set[str] | None:
    """The long options of the running command (of a group's subcommands together), or
    None where no subcommand runs."""
    if ctx.invoked_subcommand is None:
        return None
    command = cli.get_command(ctx, ctx.invoked_subcommand)
    commands = [command] if command is not None else []
    if isinstance(command, click.Group):
        commands += list(command.commands.values())
    return {o for c in commands for p in c.params if isinstance(p, click.Option)
            for o in (*p.opts, *p.secondary_opts)} | {"--help"}


def options_named(text: str) -> set[str]:
    """The long options a message names, outside `quoted commands`."""
    return set(_OPTION.findall(_QUOTED.sub("", text)))


def _fit_hint(hint: str, options: set[str], command: str) -> str:
    """``hint`` without the alternatives that name options the command lacks (library
    hints are written for every command that can meet the error: "lower --parallel or
    --max-tokens" is half wrong for `mathq bench`), or, when none is left, its --help."""
    if options_named(hint) <= options:
        return hint
    parts = [p for p in re.split(r",? or |; ", hint) if options_named(p) <= options]
    return " or ".join(parts) if parts else f"see `mathq {command} --help`"


def _for_command(err: MathqError, ctx: click.Context) -> str:
    """The error line's text, fitted to the running command: a hint names only the
    command's own options (an unwritable output or a full disk names those that choose
    another place), and no piece of user input is repeated longer than
    :data:`mathq.errors.SHORTEN_LIMIT`."""
    options = _command_options(ctx)
    hint = err.hint
    if options is not None:
        hint = _fit_hint(hint, options, str(ctx.invoked_subcommand)) if hint else hint
        flags = [o for o in _OUTPUT_OPTIONS if o in options]
        if flags and isinstance(err, (OutputError, DiskSpaceError)):
            hint = _output_hint(err, " or ".join(flags))
    text = f"{err.message} ({hint})" if hint else err.message
    return _shorten_words(text)


def _output_hint(err: OutputError | DiskSpaceError, where: str) -> str:
    """``choose a writable --out-dir or --build-dir, or free some space``."""
    reason = err.reason if isinstance(err, OutputError) else "space"
    path = err.path if isinstance(err, OutputError) else None
    folder = Path(path).parent if path else None
    if "space" in reason or "quota" in reason or "too large" in reason:
        return f"choose another {where}, or free some space"
    if any(w in reason for w in ("read-only", "permission", "not permitted")):
        fix = f"make {folder} writable" if folder else "make it writable"
    else:
        fix = "fix the path"
    return f"choose a writable {where}, or {fix}"


def _shorten_words(text: str) -> str:
    """Every overlong word of ``text`` shortened (see :func:`mathq.errors.shorten`), and its
    line breaks and other control characters written as escapes (a path may hold them),
    so the error stays one line."""
    text = re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group(0))[1:-1], text)
    return re.sub(rf"[^\s'\"]{{{SHORTEN_LIMIT + 1},}}", lambda m: shorten(m.group(0)), text)


@click.group(cls=MathqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mathq")
def cli() -> None:
    """Turn DeepSeek-Math 7B into local, quantized, measured releases.

    mathq downloads the Hugging Face checkpoints, converts them to GGUF, quantizes them
    with llama.cpp, writes Ollama Modelfiles with DeepSeek's prompt template, smoke-tests
    each variant on MATH and reports quality against size.

    \b
    Start here:
      mathq build tiny-demo                      the whole pipeline on the bundled
                                                 tiny model, offline, in seconds
      mathq build deepseek-math-7b-rl -Q Q5_K_M  download, convert, quantize, test
                                                 and report one 7B variant
      mathq recipes                              the models mathq knows
    """


# Commands in the order a release is made, each with the line `mathq --help` shows for it
# (kept short enough that Click never cuts it off on an 80-column terminal).
PIPELINE: tuple[tuple[click.Command, str], ...] = (
    (build, "The whole pipeline for a recipe, redoing only what changed"),
    (download, "1. Fetch a recipe's checkpoint from the Hugging Face Hub"),
    (convert, "2. Convert a Hugging Face checkpoint to a BF16 GGUF"),
    (imatrix, "3. Compute a math-calibrated importance matrix"),
    (quantize, "3. Quantize a BF16 GGUF into llama.cpp's types"),
    (tune, "3. The lowest-KLD mix of types for a size budget"),
    (modelfile, "4. Write (or --check) Ollama Modelfiles"),
    (smoke, "5. MATH accuracy of each variant, graded"),
    (bench, "5. Speed: prompt, generation, parallel throughput"),
    (kld, "5. KL divergence of each variant from BF16"),
    (report, "6. The quality-versus-size report"),
    (publish, "7. Push Ollama tags and/or a Hugging Face repo"),
    (recipes, "The bundled recipes (one TOML file per model)"),
    (quants, "The quantization types llama.cpp can make"),
    (problems, "The MATH / GSM8K problem sets"),
    (grade, "Re-grade stored model outputs"),
)
for command, short_help in PIPELINE:
    command.short_help = short_help
    cli.add_command(command)


def main(early_signals: Sequence[int] = ()) -> None:
    """Run the command line (:mod:`mathq.launch` calls this): SIGINT and SIGTERM unwind the
    command (temporary files removed, locks released) and end it with one line, wherever
    they arrive; one that arrived while the command line was imported
    (``early_signals``) stops it before it starts."""
    handle_stop_signals()
    try:
        if early_signals:
            raise Terminated(early_signals[0])
        cli(prog_name="mathq")
    except Terminated as e:  # while Click parsed the options, before any command ran
        stopped = _stopped(e)
        stopped.show()
        sys.exit(stopped.exit_code)
    finally:
        ignore_stop_signals()
