"""The ``mathq`` console script: stop signals caught from its first line.

Importing the command line (Click, every command, their libraries) takes a few tenths of a
second. A Ctrl-C in that time used to end in Python's own KeyboardInterrupt traceback. So the
script starts here, in a module that imports nothing of mathq's: SIGINT and SIGTERM are only
noted until :func:`mathq.cli.main` installs the real handler, which then stops the command
at once, with the same one line as later.

Worker processes (grading, bench) are spawned: each runs this module again as its
``__main__`` before anything else of mathq's. Ctrl-C reaches the terminal's whole process
group, and a worker's parent stops it, so a worker ignores SIGINT from here on.
"""

from __future__ import annotations

import signal
import sys

#: Stop signals that arrived before the command line was imported.
_early: list[int] = []


def _note(signum: int, _frame: object) -> None:
    _early.append(signum)


def _in_spawned_worker() -> bool:
    """Whether this is a worker multiprocessing spawned, importing its parent's script: its
    process has been named (``mathq-judge``, ``mathq-bench``) before the script is imported."""
    process = sys.modules.get("multiprocessing.process")
    return process is not None and process.current_process().name != "MainProcess"


if _in_spawned_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main() -> None:
    """Note stop signals, import the command line, run it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _note)
    from mathq.cli import main as run

    run(early_signals=_early)
