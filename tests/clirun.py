"""Run the real ``mathq`` command line in a test, as the house style asks.

One helper for every test file that drives the CLI: the same invocation everywhere
(``CliRunner``, exceptions not caught, since a traceback is a bug to see, not an exit code)
and the same check of the exit code, which shows the output when it differs.
"""

from __future__ import annotations

from click.testing import CliRunner, Result

from mathq.cli import cli


def run(*args: str, code: int = 0) -> Result:
    """Invoke ``mathq ARGS`` and check its exit code."""
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result
