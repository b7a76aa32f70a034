"""Answer comparisons in worker processes: hard time limits, any calling thread, parallel.

math-verify and SymPy can only be interrupted by a signal, and signals reach only the main
thread. A worker process runs each comparison in *its* main thread under the usual
SIGALRM deadline, and the caller waits a little longer than that; a worker stuck in C code
(a huge integer power, say) is killed and replaced. Workers are started with ``spawn``, so
a caller that runs llama.cpp threads is never forked mid-flight.
"""

from __future__ import annotations

import atexit
import multiprocessing
import queue
import threading
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from mathq.errors import interrupts_ignored_by_children
from mathq.evaluate.grading.equivalence import (
    DEFAULT_TIMEOUT_S,
    Judgement,
    judge_here,
    signals_usable,
    unjudged,
)

#: Extra seconds the caller waits beyond the worker's own deadline before killing it.
GRACE_S = 2.0
#: Seconds a new worker may take to import SymPy and math-verify and report ready.
STARTUP_S = 120.0


def _serve(conn: Connection) -> None:
    """Worker main loop: answer (gold, pred, timeout) requests until told to stop."""
    from mathq.errors import leave_interrupts_to_parent
    from mathq.evaluate.grading.equivalence import compare

    leave_interrupts_to_parent()
    compare("\\frac{1}{2}", "0.5")  # import and warm math-verify before saying ready
    conn.send("ready")
    while True:
        try:
            request = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if request is None:
            return
        gold, pred, timeout_s = request
        conn.send(judge_here(gold, pred, timeout_s))


class _Worker:
    """One worker process, started on first use and restarted after a kill."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._proc: Any = None
        self._conn: Connection | None = None

    def _start(self) -> Connection:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(child,), daemon=True,
                                 name="mathq-judge")
        with interrupts_ignored_by_children():
            proc.start()
        child.close()
        if not parent.poll(STARTUP_S) or parent.recv() != "ready":
            proc.kill()
            raise RuntimeError("a mathq grading worker did not start")
        self._proc, self._conn = proc, parent
        return parent

    def start(self) -> None:
        """Start the process unless it runs."""
        if self._proc is None or not self._proc.is_alive():
            self._start()

    def ask(self, gold: str, pred: str, timeout_s: float) -> Judgement:
        conn = self._conn if self._proc is not None and self._proc.is_alive() else None
        conn = conn or self._start()
        try:
            conn.send((gold, pred, timeout_s))
            if conn.poll(timeout_s + GRACE_S):
                return conn.recv()
            method = "timeout"
        except (EOFError, OSError):
            method = "error"
        self.stop(kill=True)
        return unjudged(method, gold, pred)

    @property
    def pid(self) -> int | None:
        """The worker's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def stop(self, kill: bool = False) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is None:
            return
        if not kill and conn is not None:
            try:
                conn.send(None)
                proc.join(5)
            except (OSError, EOFError):
                pass
        if proc.is_alive():
            proc.kill()
        proc.join()
        if conn is not None:
            conn.close()


class JudgePool:
    """``workers`` processes that judge answers; :meth:`judge` is safe from any thread.

    Use as a context manager (or call :meth:`close`): entering it starts the processes;
    outside one they start on first use.
    """

    def __init__(self, workers: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if workers < 1:
            raise ValueError("a JudgePool needs at least one worker")
        ctx = multiprocessing.get_context("spawn")
        self.timeout_s = timeout_s
        self.workers = workers
        self._all = [_Worker(ctx) for _ in range(workers)]
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for w in self._all:
            self._idle.put(w)

    def judge(self, gold: str, pred: str, timeout_s: float | None = None) -> Judgement:
        """Like :func:`mathq.evaluate.grading.equivalence.judge`, in whichever worker is free."""
        worker = self._idle.get()
        try:
            return worker.ask(gold, pred, self.timeout_s if timeout_s is None else timeout_s)
        finally:
            self._idle.put(worker)

    def pids(self) -> list[int]:
        """Process ids of the workers running now (for monitoring)."""
        return [w.pid for w in self._all if w.pid is not None]

    def close(self) -> None:
        """Stop every worker process."""
        for w in self._all:
            w.stop()

    def __enter__(self) -> JudgePool:
        """Start every worker now, in this thread: started from the threads that judge,
        a worker could not be shielded from a Ctrl-C while it starts up."""
        for w in self._all:
            w.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


_shared: JudgePool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> JudgePool:
    """The one-worker pool behind ``judge()`` calls from non-main threads (stopped at exit)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = JudgePool(1)
            atexit.register(_shared.close)
        return _shared


def judge(gold: str, pred: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Judgement:
    """Is ``pred`` the same answer as ``gold``? Works from any thread, within ``timeout_s``.

    In the main thread the comparison runs here under a SIGALRM timer; elsewhere it is
    sent to a shared worker process (started on first need) that is killed on overrun.
    """
    if signals_usable():
        return judge_here(gold, pred, timeout_s)
    return shared_pool().judge(gold, pred, timeout_s)
