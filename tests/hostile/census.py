"""The command line's own description of itself, for the generated hostile classes.

Every case of the class tests is generated from these walks over ``mathq.cli.cli``: each
command (subcommands of ``mathq recipes`` and ``mathq problems`` included), each of its
numeric options (those whose type is a :class:`mathq.cli.types.NumberType`) and each of its
file arguments. A new option is covered the day it is added; a numeric option added with a
plain Click type fails :func:`test_class_numbers.test_every_numeric_option_uses_mathqs_types`.

:func:`check_error_lines` is the class-6 check every generated case runs: no traceback,
exactly one ``Error:`` line, of bounded length, naming only options the command has.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import click

from mathq.cli import cli, options_named

Path_ = tuple[str, ...]


def commands(group: click.Group = cli, prefix: Path_ = ()) -> Iterator[tuple[Path_, click.Command]]:
    """``(("recipes", "show"), command)`` for every leaf command, in --help order."""
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def long_name(param: click.Parameter) -> str:
    """``--timeout`` for an option, the metavar (or upper-cased name) for an argument."""
    if isinstance(param, click.Option):
        return max(param.opts, key=len)
    return param.metavar or (param.name or "").upper()


def command_options(command: click.Command) -> set[str]:
    """Every long option the command takes, ``--help`` included."""
    return {o for p in command.params if isinstance(p, click.Option)
            for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} | {"--help"}


#: Longest Error line a case may print: input is shortened (mathq.errors.shorten), a path of
#: the test's temporary folder is not.
MAX_ERROR_LINE = 600


def check_error_lines(output: str, command: click.Command, exit_code: int) -> str:
    """Class 6 on one output: no traceback; for a failure exactly one ``Error:`` line, not
    overlong, naming only options ``command`` has (outside `quoted commands`). Returns the
    Error line (empty on success)."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    if exit_code == 0:
        assert not errors, output
        return ""
    assert len(errors) == 1, output
    line = errors[0]
    assert len(line) <= MAX_ERROR_LINE, f"{len(line)} characters: {line[:300]}..."
    foreign = options_named(line) - command_options(command)
    assert not foreign, f"names options {sorted(foreign)} that the command lacks: {line}"
    return line


def quoted_option(line: str) -> set[str]:
    """The options Click's usage errors quote (``Invalid value for '--timeout'``)."""
    return set(re.findall(r"'(--[a-z][a-z0-9-]*)'", line))
