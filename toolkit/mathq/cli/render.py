"""Turn library progress events into one redrawn line on a TTY, and nothing elsewhere.

Library code reports :class:`mathq.progress.Progress` events; this module alone decides
how they look. Bars are drawn only on an interactive stderr and never with ``--quiet`` or
``MATHQ_NO_PROGRESS=1``; a terminal that fails mid-write degrades to no bar, not a crash.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from mathq.fsutil import format_bytes
from mathq.progress import Progress, ProgressSink, no_progress

NO_PROGRESS_ENV = "MATHQ_NO_PROGRESS"


def _amount(value: float, unit: str) -> str:
    return format_bytes(value) if unit == "B" else f"{value:,.0f}"


def _timing(e: Progress, elapsed: float) -> str:
    """tqdm's elapsed time, rate and remaining time: ``00:12<00:40, 3.1 problems/s``."""
    from tqdm import tqdm

    shown = tqdm.format_interval(elapsed)
    if elapsed <= 0.5 or e.done <= 0:
        return shown
    rate = e.done / elapsed
    unit = "B" if e.unit == "B" else (e.unit or "it")
    speed = (f"{format_bytes(rate)}/s" if unit == "B"
             else f"{tqdm.format_sizeof(rate)} {unit}/s")
    if e.total and e.done < e.total:
        shown += "<" + tqdm.format_interval((e.total - e.done) / rate)
    return f"{shown}, {speed}"


class LineRenderer:
    """Redraws one status line per stage, at most ten times a second."""

    def __init__(self, stream: TextIO, width: int = 28) -> None:
        self.stream, self.width = stream, width
        self.last_draw = 0.0
        self.current: str | None = None
        self.started = time.monotonic()

    def __call__(self, event: Progress) -> None:
        now = time.monotonic()
        finished = event.total is not None and event.done >= event.total
        if event.stage != self.current:
            self._end_line()
            self.current, self.started = event.stage, now
        elif not finished and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        self._write("\r\x1b[2K" + self.format(event, now - self.started))
        if finished:
            self._end_line()

    def format(self, e: Progress, elapsed: float) -> str:
        parts = [f"{e.stage:<10}"]
        unit = "" if e.unit == "B" else e.unit  # byte amounts carry their own unit (MiB)
        if e.total:
            frac = min(max(e.done / e.total, 0.0), 1.0)
            filled = int(frac * self.width)
            parts.append("[" + "#" * filled + "-" * (self.width - filled) + f"] {frac:4.0%}")
            parts.append(f"{_amount(e.done, e.unit)}/{_amount(e.total, e.unit)} {unit}".rstrip())
        else:
            parts.append(f"{_amount(e.done, e.unit)} {unit}".rstrip())
        parts.append(_timing(e, elapsed))
        if e.info:
            parts.append(e.info)
        if e.item:
            parts.append(e.item[-40:])
        return "  ".join(parts)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            self.stream = open(os.devnull, "w")  # noqa: SIM115 - the terminal went away

    def _end_line(self) -> None:
        if self.current is not None:
            self._write("\n")
            self.current = None

    def close(self) -> None:
        """End the line in progress, if any."""
        self._end_line()


def progress_for(quiet: bool, stream: TextIO | None = None) -> ProgressSink:
    """A renderer for an interactive stderr, or a callback that ignores events.

    Inside a Click command the renderer is closed when the command ends, however it ends,
    so an error message never lands on the end of a half-drawn bar.
    """
    import click

    stream = stream or sys.stderr
    if quiet or os.environ.get(NO_PROGRESS_ENV) or not stream.isatty():
        return no_progress
    renderer = LineRenderer(stream)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(renderer.close)
    return renderer
