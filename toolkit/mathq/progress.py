"""Progress reporting that library code can emit without knowing who listens.

Long-running library functions take ``progress: ProgressCallback``; they call it with
:class:`Progress` events and never print. The CLI turns events into a bar on a TTY and
drops them otherwise (see :mod:`mathq.cli.render`), and tests can collect them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Progress:
    """One update of one unit of long work.

    ``done`` and ``total`` count ``unit`` (bytes, tensors, problems, tokens); ``total`` is
    None when unknown. ``item`` names what is being worked on now, ``info`` carries a short
    live figure such as a running accuracy or tokens per second.
    """

    stage: str
    done: float
    total: float | None = None
    unit: str = ""
    item: str = ""
    info: str = ""


ProgressCallback = Callable[[Progress], None]


class ProgressSink(Protocol):
    """What the CLI hands to library code: a callback that can also be closed, which ends
    any line it is drawing (before a result is printed, or when the command fails)."""

    def __call__(self, event: Progress) -> None: ...

    def close(self) -> None: ...


class _NoProgress:
    """Ignores every event; closing it does nothing."""

    def __call__(self, _event: Progress) -> None:
        return None

    def close(self) -> None:
        return None


no_progress: ProgressSink = _NoProgress()
"""The default callback: ignore every event."""
