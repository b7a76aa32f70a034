"""Continuous batching in one llama.cpp context: many greedy completions at once, in process.

One context holds up to ``parallel`` sequences (``n_seq_max``), each in its own slot of the
KV cache. A new prompt is read (prefilled) in ``llama_decode`` calls of its own; otherwise
each step decodes one batch holding the last token of every generating sequence. A
sequence ends at an end-of-generation token, at a stop string in its detokenized tail or at
its token limit; its cache is freed at once and the next prompt takes the slot in the very
next step (continuous batching, as llama-server's slots).

Why in process and not llama-server: no HTTP, no JSON per token, the exact prompt tokens
mathq chose, and results straight into the grader between steps.

Decoding is greedy: the first highest logit, exactly the choice llama.cpp's greedy sampler
makes, read from a NumPy view of ``llama_get_logits_ith`` (no copy). With one sequence the
engine makes the same ``llama_decode`` calls as llama-cpp-python's ``Llama.eval`` (prompt
in ``n_batch`` chunks, then one token per call), so its output is the output of
``Llama.create_completion(temperature=0)``. With more sequences each prompt is still read
exactly as alone; only the decode steps batch several sequences. Whether those give
bit-identical logits depends on llama.cpp's kernels: with flash attention (its default on
CPU) Q8_0 does; BF16 and the repacked k-quants (Q4_K, ...) round a batch of P rows
differently from one row (up to ~1e-2 in a logit), so a near-tie can go the other way and
a completion diverge from there; without flash attention attention itself does too.

The KV cache is per sequence by default (``kv_unified`` false, llama-server's default too):
attention then runs over each sequence's own tokens only. llama.cpp splits such a batch
into micro-batches of consecutive sequence ids, so the batch lists sequences in id order
and a new prompt takes the lowest free slot.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mathq.errors import InferenceError
from mathq.llama.devices import (
    ParallelChoice,
    choose_parallel,
    describe_devices,
    gpu_devices,
    gpu_free_bytes,
    kv_bytes_per_element,
    kv_bytes_per_sequence,
)
from mathq.llama.runtime import PARALLEL_AUTO, Context, EngineOptions, LlamaModel, pad_context


@dataclass(frozen=True)
class GenRequest:
    """One prompt to complete. ``prompt`` is text without BOS (the tokenizer adds it)."""

    id: str
    prompt: str
    max_tokens: int
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenResult:
    """A finished completion: its text (stop string cut off) and what it took.

    ``finish_reason`` is ``stop`` (end-of-generation token or stop string) or ``length``.
    ``seconds`` runs from the step the prompt entered the batch to the step it finished.
    """

    id: str
    text: str
    tokens: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str
    seconds: float

    @property
    def completion_tokens(self) -> int:
        """Generated tokens, the one that completed a stop string included."""
        return len(self.tokens)


@dataclass(frozen=True)
class StepStats:
    """Running totals after one decode step, for progress displays: ``active`` sequences
    were in the step's batch, ``waiting`` requests had no slot yet."""

    steps: int
    active: int
    waiting: int
    prompt_tokens: int
    generated_tokens: int
    seconds: float


@dataclass
class _Seq:
    """A sequence in a slot: its prompt, where it stands, and what it has generated."""

    request: GenRequest
    prompt: list[int]
    max_tokens: int
    started: float
    n_past: int = 0
    out_index: int = -1
    tokens: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    stops: tuple[bytes, ...] = ()

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)


class BatchEngine:
    """Greedy completions of many prompts, up to ``options.parallel`` at a time.

    Use as a context manager. :meth:`generate` yields each completion as soon as it ends;
    the caller can do its own work (grading) between yields, while no decode runs.
    With ``options.parallel`` :data:`~mathq.llama.runtime.PARALLEL_AUTO` each
    :meth:`generate` chooses the number from the free GPU memory (the CPU default without
    a GPU); :attr:`parallel_choice` says what the last call chose and why.
    """

    def __init__(self, model_path: Path, options: EngineOptions | None = None) -> None:
        self.options = options or EngineOptions()
        if self.options.parallel < 0:
            raise ValueError("parallel must be at least 1 (or 0 for auto)")
        self.model = LlamaModel(Path(model_path), self.options.gpu_layers)
        self._ctx: Context | None = None
        self.parallel_choice: ParallelChoice | None = None
        self._banned = self.model.eog_tokens() if self.options.ignore_eos else None

    def __enter__(self) -> BatchEngine:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the context and the model."""
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        self.model.close()

    def _context_for(self, n_seq: int, n_ctx_seq: int) -> Context:
        """A context for ``n_seq`` sequences of ``n_ctx_seq`` tokens: the last one if it is
        big enough, else a new one (the KV cache is allocated for all of it up front)."""
        ctx = self._ctx
        if ctx is None or ctx.n_ctx_seq < n_ctx_seq or ctx.n_seq < n_seq:
            if ctx is not None:
                ctx.close()
                self._ctx = None
            self._ctx = ctx = Context(self.model, n_seq, n_ctx_seq, self.options)
        ctx.clear()
        return ctx

    def _open(self, n_requests: int, n_ctx_seq: int) -> tuple[Context, int]:
        """The context for one :meth:`generate` call and how many sequences share it.

        With ``--parallel auto`` a context llama.cpp cannot allocate (the estimate of the
        compute buffers was short) is retried with half the sequences, down to one.
        """
        model = self.model
        on_gpu = model.gpu_layers_repeating > 0
        device = describe_devices(gpu_devices()) if on_gpu else "CPU"
        if self.options.parallel != PARALLEL_AUTO:
            n_seq = min(self.options.parallel, n_requests)
            self.parallel_choice = ParallelChoice(
                n_seq, f"--parallel {self.options.parallel}"
                + (f", {n_requests} problems" if n_seq < self.options.parallel else ""),
                requested=str(self.options.parallel), device=device)
            return self._context_for(n_seq, n_ctx_seq), n_seq
        layers = model.gpu_layers_repeating if on_gpu else model.n_layer
        kv = kv_bytes_per_sequence(n_ctx_seq, layers, model.n_embd_k, model.n_embd_v,
                                   kv_bytes_per_element(self.options.kv_type))
        choice = choose_parallel(n_requests, gpu=on_gpu,
                                 free_bytes=gpu_free_bytes() if on_gpu else None,
                                 kv_bytes_per_seq=kv, device=device)
        n_seq = choice.parallel
        while True:
            try:
                ctx = self._context_for(n_seq, n_ctx_seq)
                break
            except InferenceError:
                if n_seq == 1:
                    raise
                n_seq //= 2
        if n_seq != choice.parallel:
            choice = dataclasses.replace(
                choice, parallel=n_seq,
                reason=f"{choice.reason}; llama.cpp could not allocate that many, so {n_seq}")
        self.parallel_choice = choice
        return ctx, n_seq

    def generate(self, requests: Iterable[GenRequest],
                 on_step: Callable[[StepStats], None] | None = None) -> Iterator[GenResult]:
        """Complete every request; yield results in the order they finish.

        Prompts are tokenized first, so the cache can be sized for the longest one. A
        request whose prompt leaves no room in the model's context raises InferenceError;
        one that leaves less room than ``max_tokens`` gets what fits (as in llama-cpp-python).
        """
        todo = [(r, self.model.tokenize(r.prompt)) for r in requests]
        if not todo:
            return
        limit = self.options.n_ctx_seq or pad_context(min(self.model.n_ctx_train or 1 << 30,
                                                   max(len(p) + r.max_tokens for r, p in todo)))
        for r, p in todo:
            if len(p) >= limit:
                raise InferenceError(
                    f"the prompt of {r.id} has {len(p)} tokens; the context holds {limit}",
                    "use a model with a longer context, or fewer few-shot examples")
        ctx, n_seq = self._open(len(todo), limit)
        pending = deque(todo)
        slots: list[_Seq | None] = [None] * n_seq
        steps = prompt_total = generated_total = 0
        started = time.perf_counter()
        try:
            while pending or any(s is not None for s in slots):
                now = time.perf_counter()
                for i, slot in enumerate(slots):
                    if slot is None and pending:
                        r, p = pending.popleft()
                        slots[i] = _Seq(r, p, min(r.max_tokens, limit - len(p)), now,
                                        stops=tuple(s.encode() for s in r.stop if s))
                prompt_total += self._fill_batch(ctx, slots)
                ctx.decode()
                steps += 1
                active = sum(s is not None for s in slots)
                finished: list[GenResult] = []
                for i, seq in enumerate(slots):
                    if seq is None or seq.out_index < 0:
                        continue
                    logits = ctx.logits(seq.out_index)
                    if self._banned is not None:  # --ignore-eos: as a logit bias of -inf
                        logits[self._banned] = -np.inf
                    token = int(np.argmax(logits))
                    generated_total += 1
                    result = self._advance(seq, token)
                    if result is not None:
                        ctx.free_seq(i)
                        slots[i] = None
                        finished.append(result)
                if on_step is not None:
                    on_step(StepStats(steps, active, len(pending), prompt_total,
                                      generated_total, time.perf_counter() - started))
                yield from finished
        finally:
            ctx.free_seq(-1)

    def _fill_batch(self, ctx: Context, slots: list[_Seq | None]) -> int:
        """Put one step's tokens into the batch; return how many were prompt tokens.

        A prompt is read in calls of its own, ``n_batch`` tokens at a time, exactly as a
        lone sequence reads it: llama.cpp would split a batch mixing sequences into
        micro-batches of equal length per sequence, whose rounding differs, while read
        alone a prompt leaves the very cache and first logits that P = 1 (and
        llama-cpp-python) get. It costs no throughput: the generating sequences wait one
        call, which is as long as their token would have taken in a mixed batch.
        Otherwise every generating sequence advances by one token, in sequence order.
        """
        ctx.clear_batch()
        for seq in slots:
            if seq is not None:
                seq.out_index = -1
        reading = next((i for i, s in enumerate(slots) if s is not None and s.prefilling), None)
        if reading is not None:
            seq = slots[reading]
            assert seq is not None
            chunk = seq.prompt[seq.n_past:seq.n_past + ctx.n_batch]
            last = seq.n_past + len(chunk) == len(seq.prompt)
            index = ctx.add(chunk, seq.n_past, reading, last)
            if last:
                seq.out_index = index
            seq.n_past += len(chunk)
            return len(chunk)
        for i, seq in enumerate(slots):
            if seq is not None:
                seq.out_index = ctx.add([seq.tokens[-1]], seq.n_past, i, True)
                seq.n_past += 1
        return 0

    def _advance(self, seq: _Seq, token: int) -> GenResult | None:
        """Take the greedy token; return the result when the sequence has ended."""
        if self.model.is_eog(token):
            return self._result(seq, bytes(seq.text), "stop")
        seq.tokens.append(token)
        before = len(seq.text)
        seq.text += self.model.piece(token)
        stops = seq.stops
        if stops:
            # Only a stop string that ends in the new bytes can be new.
            start = max(0, before - max(len(s) for s in stops) + 1)
            hits = [i for s in stops if (i := seq.text.find(s, start)) >= 0]
            if hits:
                return self._result(seq, bytes(seq.text[:min(hits)]), "stop")
        if len(seq.tokens) >= seq.max_tokens:
            return self._result(seq, bytes(seq.text), "length")
        return None

    @staticmethod
    def _result(seq: _Seq, text: bytes, reason: str) -> GenResult:
        return GenResult(id=seq.request.id, text=text.decode("utf-8", errors="ignore"),
                         tokens=tuple(seq.tokens), prompt_tokens=len(seq.prompt),
                         finish_reason=reason, seconds=time.perf_counter() - seq.started)
