"""Requests in flight on worker threads, results handed to the caller's thread.

Server backends keep ``parallel`` requests open per server. Workers take the next request
from one shared queue as soon as they are free, so a faster server simply answers more of
them. Completions come back to the thread that iterates (the smoke stage's main thread),
where grading runs with its signal-based time limits; a worker's error stops the others
from starting new requests and is raised there.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

from mathq.evaluate.backends.base import Completion, Request

Worker = Callable[[Request], Completion]

#: Seconds between progress polls while waiting for a completion.
POLL_S = 0.25


def run_concurrently(requests: Sequence[Request], workers: Sequence[Worker],
                     poll: Callable[[], None] | None = None) -> Iterator[Completion]:
    """Run ``requests`` through ``workers`` (one thread each); yield results as they end."""
    todo: queue.SimpleQueue[Request] = queue.SimpleQueue()
    for r in requests:
        todo.put(r)
    done: queue.SimpleQueue[Completion | BaseException] = queue.SimpleQueue()
    stop = threading.Event()

    def loop(work: Worker) -> None:
        while not stop.is_set():
            try:
                request = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put(work(request))
            except BaseException as e:  # handed to the caller's thread, raised there
                stop.set()
                done.put(e)
                return

    threads = [threading.Thread(target=loop, args=(w,), daemon=True, name=f"mathq-request-{i}")
               for i, w in enumerate(workers[:max(1, len(requests))])]
    for t in threads:
        t.start()
    try:
        for _ in range(len(requests)):
            while True:
                try:
                    item = done.get(timeout=POLL_S)
                    break
                except queue.Empty:
                    if poll is not None:
                        poll()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
