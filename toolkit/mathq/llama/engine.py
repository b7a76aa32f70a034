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

Drafted steps (speculative decoding without a second model, :mod:`mathq.llama.drafts`):
a generating sequence may add up to k guessed tokens after its last one, with logits for
each row. The step keeps the longest prefix of guesses that equal the greedy choice at the
row before, adds the model's own choice after them, and removes the rejected positions from
that sequence's KV cache (``llama_memory_seq_rm``). Greedy stays greedy: every kept token
is the argmax of logits computed over exactly the tokens before it. What changes is the
batch shape (k + 1 rows of one sequence instead of one), with the same consequence as P > 1
above: where llama.cpp's kernels round such a batch differently, a near-tie can go the
other way. How many guesses a step checks, if any, is chosen from each sequence's
acceptance so far and a cost model of rows fitted to the step times
(:func:`mathq.llama.drafts.plan_step`).
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
from mathq.llama.drafts import (
    MAX_DRAFT,
    Candidate,
    Drafter,
    RowCost,
    draft_off_reason,
    micro_batches,
    plan_step,
)
from mathq.llama.runtime import PARALLEL_AUTO, Context, EngineOptions, LlamaModel, pad_context


@dataclass(frozen=True)
class GenRequest:
    """One prompt to complete. ``prompt`` is text without BOS (the tokenizer adds it)."""

    id: str
    prompt: str
    max_tokens: int
    stop: tuple[str, ...] = ()
    #: Another model's completion of the same prompt, to draft from (BF16's, for a variant).
    reference: str = ""


@dataclass(frozen=True)
class GenResult:
    """A finished completion: its text (stop string cut off) and what it took.

    ``finish_reason`` is ``stop`` (end-of-generation token or stop string) or ``length``.
    ``seconds`` runs from the step the prompt entered the batch to the step it finished.
    ``steps`` counts the decode steps that produced its tokens; ``drafted`` the guessed
    tokens they checked and ``accepted`` those kept.
    """

    id: str
    text: str
    tokens: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str
    seconds: float
    steps: int = 0
    drafted: int = 0
    accepted: int = 0

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
    drafted: int = 0
    accepted: int = 0


@dataclass
class _Seq:
    """A sequence in a slot: its prompt, where it stands, and what it has generated."""

    request: GenRequest
    prompt: list[int]
    max_tokens: int
    started: float
    n_past: int = 0
    out_index: int = -1
    #: Position of the token whose logits are at ``out_index``.
    out_index_pos: int = -1
    tokens: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    stops: tuple[bytes, ...] = ()
    drafter: Drafter | None = None
    #: Guessed tokens in this step's batch after the last token, each with logits.
    drafts: tuple[int, ...] = ()
    steps: int = 0
    drafted: int = 0
    accepted: int = 0

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
        #: Why drafted steps are off, or None when they are on.
        self.draft_off = draft_off_reason(self.options.draft, self.options.ignore_eos)

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
        steps = prompt_total = generated_total = drafted_total = accepted_total = 0
        # Rows are nearly free next to a pass over the weights on a GPU, not on a CPU.
        cost = RowCost(prior_rows=64.0 if self.model.gpu_layers_repeating > 0 else 4.0)
        started = time.perf_counter()
        try:
            while pending or any(s is not None for s in slots):
                now = time.perf_counter()
                for i, slot in enumerate(slots):
                    if slot is None and pending:
                        r, p = pending.popleft()
                        slots[i] = self._new_seq(r, p, limit, now)
                read, micro = self._fill_batch(ctx, slots, cost)
                prompt_total += read
                rows = ctx.batch_size
                tick = time.perf_counter()
                ctx.decode()
                if not read:  # a generation step: time it for the cost model
                    ctx.synchronize()
                    cost.observe(micro, rows, time.perf_counter() - tick)
                steps += 1
                active = sum(s is not None for s in slots)
                finished: list[GenResult] = []
                for i, seq in enumerate(slots):
                    if seq is None or seq.out_index < 0:
                        continue
                    accepted_before = seq.accepted
                    result, emitted = self._take(ctx, seq)
                    generated_total += emitted
                    drafted_total += len(seq.drafts)
                    accepted_total += seq.accepted - accepted_before
                    if result is not None:
                        ctx.free_seq(i)
                        slots[i] = None
                        finished.append(result)
                    elif seq.n_past < seq.out_index_pos + 1 + len(seq.drafts):
                        ctx.free_seq(i, seq.n_past)  # the rejected guesses
                if on_step is not None:
                    on_step(StepStats(steps, active, len(pending), prompt_total,
                                      generated_total, time.perf_counter() - started,
                                      drafted_total, accepted_total))
                yield from finished
        finally:
            ctx.free_seq(-1)

    def _new_seq(self, request: GenRequest, prompt: list[int], limit: int,
                 now: float) -> _Seq:
        """A sequence for ``request``, with its drafter unless drafting is off."""
        drafter = None
        if self.draft_off is None:
            reference: list[int] = []
            if request.reference:
                reference = self.model.tokenize(request.reference)
                if self.model.add_bos and reference[:1] == [self.model.bos]:
                    reference = reference[1:]
            drafter = Drafter(prompt, reference)
        return _Seq(request, prompt, min(request.max_tokens, limit - len(prompt)), now,
                    stops=tuple(s.encode() for s in request.stop if s), drafter=drafter)

    def _take(self, ctx: Context, seq: _Seq) -> tuple[GenResult | None, int]:
        """Read a step's logits for ``seq``: its greedy token after the last one, then,
        while each guess equals the greedy token before it, after each guess. Returns the
        result if the sequence ended, and how many tokens it took.

        Kept guesses and the model's own next token go into the output; the cache keeps
        the last token and the kept guesses (``n_past`` says where the next one goes).
        """
        seq.steps += 1
        emitted: list[int] = []
        result = None
        for j in range(1 + len(seq.drafts)):
            logits = ctx.logits(seq.out_index + j)
            if self._banned is not None:  # --ignore-eos: as a logit bias of -inf
                logits[self._banned] = -np.inf
            token = int(np.argmax(logits))
            emitted.append(token)
            result = self._advance(seq, token)
            if result is not None or j == len(seq.drafts) or seq.drafts[j] != token:
                break
        # Guesses kept: those the tokens before the last matched, and the last one too when
        # the sequence ended on a token that was also guessed right (a stop string's end).
        last = len(emitted) - 1
        kept = last + (result is not None and last < len(seq.drafts)
                       and seq.drafts[last] == emitted[last])
        seq.drafted += len(seq.drafts)
        seq.accepted += kept
        if result is not None:
            return dataclasses.replace(result, steps=seq.steps, drafted=seq.drafted,
                                       accepted=seq.accepted), len(emitted)
        seq.n_past = seq.out_index_pos + len(emitted)
        if seq.drafter is not None:
            seq.drafter.accepted(len(seq.drafts), kept, emitted)
        return None, len(emitted)

    def _fill_batch(self, ctx: Context, slots: list[_Seq | None],
                    cost: RowCost) -> tuple[int, int]:
        """Put one step's tokens into the batch; return how many were prompt tokens and
        how many micro-batches llama.cpp will make of a generation step.

        A prompt is read in calls of its own, ``n_batch`` tokens at a time, exactly as a
        lone sequence reads it: llama.cpp would split a batch mixing sequences into
        micro-batches of equal length per sequence, whose rounding differs, while read
        alone a prompt leaves the very cache and first logits that P = 1 (and
        llama-cpp-python) get. It costs no throughput: the generating sequences wait one
        call, which is as long as their token would have taken in a mixed batch.
        Otherwise every generating sequence advances by its last token and the guesses
        :func:`mathq.llama.drafts.plan_step` chose for it, in sequence order.
        """
        ctx.clear_batch()
        for seq in slots:
            if seq is not None:
                seq.out_index = -1
                seq.drafts = ()
        reading = next((i for i, s in enumerate(slots) if s is not None and s.prefilling), None)
        if reading is not None:
            seq = slots[reading]
            assert seq is not None
            chunk = seq.prompt[seq.n_past:seq.n_past + ctx.n_batch]
            last = seq.n_past + len(chunk) == len(seq.prompt)
            index = ctx.add(chunk, seq.n_past, reading, last)
            if last:
                seq.out_index = index
                seq.out_index_pos = seq.n_past + len(chunk) - 1
            seq.n_past += len(chunk)
            return len(chunk), 1
        live = [(i, s) for i, s in enumerate(slots) if s is not None]
        plan = None
        if self.draft_off is None:
            candidates = []
            for i, seq in live:
                assert seq.drafter is not None
                left = seq.max_tokens - len(seq.tokens) - 1  # tokens after this step's first
                drafts = tuple(seq.drafter.propose(min(MAX_DRAFT, left)))
                candidates.append(Candidate(i, drafts, seq.drafter.acceptance(),
                                            room=ctx.n_ctx_seq - 1 - seq.n_past,
                                            last=seq.tokens[-1]))
            plan = plan_step(candidates, cost.fixed_rows, ctx.n_batch)
        for i, seq in live:
            seq.drafts = plan.drafts[i] if plan is not None else ()
            seq.out_index = ctx.add([seq.tokens[-1], *seq.drafts], seq.n_past, i, True,
                                    all_logits=True) - len(seq.drafts)
            seq.out_index_pos = seq.n_past
            seq.n_past += 1 + len(seq.drafts)
        return 0, (plan.micro_batches if plan is not None
                   else micro_batches([(i, 1) for i, _ in live]))

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
                         finish_reason=reason, seconds=time.perf_counter() - seq.started,
                         steps=seq.steps, drafted=seq.drafted, accepted=seq.accepted)
