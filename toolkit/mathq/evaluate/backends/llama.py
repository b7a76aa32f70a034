"""The in-process backend: mathq's continuous-batching engine on llama-cpp-python.

The engine runs on a thread of its own and hands finished completions to the caller's
thread through a queue, so grading (SymPy, in the caller's thread where its time limits
work) overlaps with decoding instead of stalling it: ``llama_decode`` releases the GIL.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from mathq.evaluate.backends.base import Backend, Completion, Request, TokenCallback
from mathq.llama.devices import ParallelChoice
from mathq.llama.engine import BatchEngine, EngineOptions, GenRequest, GenResult, StepStats

#: Seconds between progress updates while waiting for the next completion.
POLL_S = 0.25


class _Cancelled(Exception):
    """Raised inside the engine's step callback to stop it when the caller has gone."""


class LlamaBackend(Backend):
    """Completions from a GGUF loaded here; ``parallel`` sequences share one context."""

    def __init__(self, gguf: Path, options: EngineOptions) -> None:
        self.engine = BatchEngine(gguf, options)
        self.parallel = options.parallel
        self.description = "llama.cpp"

    @property
    def parallel_choice(self) -> ParallelChoice | None:
        """How many sequences the last :meth:`complete` decoded together, and why."""
        return self.engine.parallel_choice

    def complete(self, requests: Sequence[Request],
                 on_tokens: TokenCallback | None = None) -> Iterator[Completion]:
        """Answer every request with greedy decoding; yield each as it finishes."""
        gen = [GenRequest(r.id, r.prompt, r.max_tokens, r.stop, r.draft_reference,
                          r.draft_reference_ids) for r in requests]
        results: queue.SimpleQueue[GenResult | BaseException | None] = queue.SimpleQueue()
        stop = threading.Event()
        generated = [0]

        def on_step(stats: StepStats) -> None:
            generated[0] = stats.generated_tokens
            self.draft_totals = (stats.drafted, stats.kept)
            if stop.is_set():
                raise _Cancelled

        def run() -> None:
            try:
                for res in self.engine.generate(gen, on_step):
                    results.put(res)
                results.put(None)
            except _Cancelled:
                results.put(None)
            except BaseException as e:  # raised in the caller's thread
                results.put(e)

        worker = threading.Thread(target=run, name="mathq-engine", daemon=True)
        worker.start()
        try:
            while True:
                try:
                    item = results.get(timeout=POLL_S)
                except queue.Empty:
                    if on_tokens is not None:
                        on_tokens(generated[0])
                    continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                if on_tokens is not None:
                    on_tokens(generated[0])
                yield Completion(id=item.id, text=item.text, prompt_tokens=item.prompt_tokens,
                                 completion_tokens=item.completion_tokens,
                                 finish_reason=item.finish_reason, seconds=item.seconds,
                                 steps=item.steps, drafted=item.drafted,
                                 kept=item.kept, token_ids=item.tokens)
        finally:
            stop.set()
            worker.join()

    def close(self) -> None:
        """Free the model and its context."""
        self.engine.close()
