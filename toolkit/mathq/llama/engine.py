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
a generating sequence may add drafts after its last token, with logits for each row. The
step keeps the longest prefix of drafts that equal the greedy choice at the row before,
adds the model's own choice after them, and removes the rejected positions from that
sequence's KV cache (``llama_memory_seq_rm``); :meth:`BatchEngine._check` does all three and
returns a :class:`StepOutcome`. Greedy stays greedy: every kept token is the argmax of
logits computed over exactly the tokens before it. What changes is the batch shape (n + 1
rows of one sequence instead of one), with the same consequence as P > 1 above: where
llama.cpp's kernels round such a batch differently, a near-tie can go the other way. How
many drafts a step checks, if any, is chosen from each sequence's kept rate so far (the
share of its drafts kept) and the step-cost curve (:func:`mathq.llama.drafts.plan_step`):
calibrated on first use with a few batches in a scratch sequence before any prompt is read
(cached in :data:`~mathq.llama.drafts.STEP_COSTS_FILE` beside the model), then corrected by
the timed steps, whose own work outside ``llama_decode`` counts too.
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
    STEP_COSTS_FILE,
    CostIdentity,
    Drafter,
    KeptRates,
    Proposal,
    StepCost,
    calibrated_cost,
    draft_off_reason,
    micro_batch_rows,
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
    #: Another model's completion of the same prompt, to draft from (BF16's, for a variant),
    #: and the token ids it was generated as, where known (see
    #: :meth:`BatchEngine._draft_reference_tokens`).
    draft_reference: str = ""
    draft_reference_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenResult:
    """A finished completion: its text (stop string cut off) and what it took.

    ``finish_reason`` is ``stop`` (end-of-generation token or stop string) or ``length``.
    ``seconds`` runs from the step the prompt entered the batch to the step it finished.
    ``steps`` counts the decode steps that produced its tokens; ``drafted`` the drafts
    they reached (see :class:`StepOutcome`) and ``kept`` how many of those were kept.
    """

    id: str
    text: str
    tokens: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str
    seconds: float
    steps: int = 0
    drafted: int = 0
    kept: int = 0

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
    kept: int = 0


@dataclass(frozen=True)
class StepOutcome:
    """What one step did for one sequence: the tokens it ``emitted`` into the output (its
    kept drafts and the model's own next token), the drafts it reached (``drafted``) and
    how many of them were ``kept``, where its KV cache was cut (``trim``: the first position
    removed, the rejected drafts; 0 when the sequence ended and left the cache; None when
    the cache keeps everything), and the ``result`` when the sequence ended.

    A draft is *reached* when every one before it was kept: the first rejected one is the
    last reached, and those after it were checked after a token the model did not write,
    so they say nothing of how well the variant follows its drafts (on a CPU the planner
    may check the whole rest of an answer, and one divergence then rejects dozens). Rows
    that only pad a sequence to the step's shape are not drafts."""

    emitted: tuple[int, ...]
    drafted: int
    kept: int
    trim: int | None
    result: GenResult | None


@dataclass(frozen=True)
class _Rows:
    """One sequence's rows in a step's batch whose logits are read: the batch index and the
    position of its last known token, and the drafts after it, of which the first
    ``proposed`` came from its drafter (the rest pad it to the step's shape)."""

    slot: int
    index: int
    pos: int
    drafts: tuple[int, ...] = ()
    proposed: int = 0


@dataclass(frozen=True)
class _Batch:
    """What a step's batch holds: ``read`` prompt tokens, the ``rows`` to check, and the
    rows of each micro-batch llama.cpp will make of a generation step (for the cost curve)."""

    read: int
    rows: tuple[_Rows, ...]
    micro_batch_rows: tuple[int, ...] = ()


@dataclass
class _Seq:
    """A sequence in a slot: its prompt, where it stands, and what it has generated."""

    request: GenRequest
    prompt: list[int]
    max_tokens: int
    started: float
    #: Cells of its KV cache in use: where the next token goes.
    n_past: int = 0
    tokens: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    stops: tuple[bytes, ...] = ()
    drafter: Drafter | None = None
    steps: int = 0
    drafted: int = 0
    kept: int = 0

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

    ``cost_cache`` is the file that keeps the step-cost calibration (default:
    :data:`~mathq.llama.drafts.STEP_COSTS_FILE` beside the model, a build folder's own for
    its variants). The curve (:attr:`step_cost`) and the rates at which drafts were kept
    outlive a :meth:`generate` call: the next one starts where the last left off.
    """

    def __init__(self, model_path: Path, options: EngineOptions | None = None, *,
                 cost_cache: Path | None = None) -> None:
        self.options = options or EngineOptions()
        if self.options.parallel < 0:
            raise ValueError("parallel must be at least 1 (or 0 for auto)")
        self.model = LlamaModel(Path(model_path), self.options.gpu_layers)
        self._ctx: Context | None = None
        self.parallel_choice: ParallelChoice | None = None
        self._banned = self.model.eog_tokens() if self.options.ignore_eos else None
        #: Why drafted steps are off, or None when they are on.
        self.draft_off = draft_off_reason(self.options.draft, self.options.ignore_eos)
        self.cost_cache = Path(cost_cache) if cost_cache is not None \
            else self.model.path.parent / STEP_COSTS_FILE
        #: The step-cost curve, made at the first drafted :meth:`generate`.
        self.step_cost: StepCost | None = None
        self._rates = KeptRates()

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
        steps = prompt_total = generated_total = drafted_total = kept_total = 0
        try:
            cost = self._step_cost(ctx) if self.draft_off is None else None
            started = time.perf_counter()
            while pending or any(s is not None for s in slots):
                now = time.perf_counter()
                for i, slot in enumerate(slots):
                    if slot is None and pending:
                        r, p = pending.popleft()
                        slots[i] = self._new_seq(r, p, limit, now)
                filling = time.perf_counter()
                batch = self._fill_batch(ctx, slots, cost)
                prompt_total += batch.read
                decoding = time.perf_counter()
                ctx.decode()
                if cost is not None:
                    ctx.synchronize()
                decoded = time.perf_counter()
                steps += 1
                active = sum(s is not None for s in slots)
                finished: list[GenResult] = []
                for rows in batch.rows:
                    seq = slots[rows.slot]
                    assert seq is not None
                    outcome = self._check(ctx, seq, rows)
                    generated_total += len(outcome.emitted)
                    drafted_total += outcome.drafted
                    kept_total += outcome.kept
                    if outcome.result is not None:
                        slots[rows.slot] = None
                        finished.append(outcome.result)
                if cost is not None and not batch.read:  # a generation step: learn its cost
                    host = (decoding - filling) + (time.perf_counter() - decoded)
                    cost.observe(batch.micro_batch_rows, decoded - decoding, host_seconds=host)
                if on_step is not None:
                    on_step(StepStats(steps, active, len(pending), prompt_total,
                                      generated_total, time.perf_counter() - started,
                                      drafted_total, kept_total))
                yield from finished
        finally:
            ctx.free_seq(-1)

    def _step_cost(self, ctx: Context) -> StepCost:
        """The step-cost curve, calibrated at the first call with decodes of a few sizes
        in sequence 0 before any prompt is there; each one's cells are removed at once."""
        if self.step_cost is None:
            filler = max(self.model.bos, 0)

            def time_rows(rows: int) -> float:
                ctx.clear_batch()
                ctx.add([filler] * rows, 0, 0, True, all_logits=True)
                tick = time.perf_counter()
                ctx.decode()
                ctx.synchronize()
                seconds = time.perf_counter() - tick
                ctx.free_seq(0)
                return seconds

            identity = CostIdentity.of(self.model.path,
                                       threads=self.options.n_threads(self.model),
                                       gpu_layers=self.model.offloaded)
            self.step_cost = calibrated_cost(
                cache=self.cost_cache, identity=identity,
                gpu=self.model.gpu_layers_repeating > 0,
                max_rows=min(ctx.n_ubatch, ctx.n_ctx_seq), time_rows=time_rows)
        return self.step_cost

    def _new_seq(self, request: GenRequest, prompt: list[int], limit: int,
                 now: float) -> _Seq:
        """A sequence for ``request``, with its drafter unless drafting is off."""
        drafter = None
        if self.draft_off is None:
            drafter = Drafter(prompt, self._draft_reference_tokens(request), self._rates,
                              self.model.piece)
        return _Seq(request, prompt, min(request.max_tokens, limit - len(prompt)), now,
                    stops=tuple(s.encode() for s in request.stop if s), drafter=drafter)

    def _draft_reference_tokens(self, request: GenRequest) -> list[int]:
        """The draft reference as this model's tokens: the ids it was generated as, where
        they spell its text in this vocabulary, else its text tokenized.

        The ids matter: a model does not always write text in the tokens the tokenizer
        would cut it into ("1" "2" for "12"), and a draft in other tokens is rejected at
        the first such cut even where the variant writes the very same text. They spell
        the text when every one of them is a token of this vocabulary that writes
        something (not a control token) and their bytes are the text's, followed by
        nothing or by one of the request's stop strings (which the text was cut at).
        """
        ids = request.draft_reference_ids
        if ids and all(0 <= t < self.model.n_vocab for t in ids):
            pieces = [self.model.piece(t) for t in ids]
            text = request.draft_reference.encode()
            written = b"".join(pieces)
            rest = written[len(text):]
            if all(pieces) and written.startswith(text) and (
                    not rest or any(rest.startswith(s.encode()) for s in request.stop if s)):
                return list(ids)
        if not request.draft_reference:
            return []
        tokens = self.model.tokenize(request.draft_reference)
        if self.model.add_bos and tokens[:1] == [self.model.bos]:
            tokens = tokens[1:]
        return tokens

    def _check(self, ctx: Context, seq: _Seq, rows: _Rows) -> StepOutcome:
        """One sequence's part of a decoded step: its greedy token after its last one,
        then, while each draft equals the greedy token before it, after each draft; then
        its KV cache cut to what it keeps.

        Kept drafts and the model's own next token go into the output; the cache keeps
        the last token and the kept drafts (``n_past`` says where the next one goes), or
        nothing once the sequence has ended.
        """
        drafts = rows.drafts
        seq.steps += 1
        emitted: list[int] = []
        result = None
        for j in range(1 + len(drafts)):
            logits = ctx.logits(rows.index + j)
            if self._banned is not None:  # --ignore-eos: as a logit bias of -inf
                logits[self._banned] = -np.inf
            token = int(np.argmax(logits))
            emitted.append(token)
            result = self._advance(seq, token)
            if result is not None or j == len(drafts) or drafts[j] != token:
                break
        # Drafts kept: those the tokens before the last matched, and the last one too when
        # the sequence ended on a token that was also drafted right (a stop string's end).
        last = len(emitted) - 1
        kept = last + (result is not None and last < len(drafts) and drafts[last] == emitted[last])
        reached, kept_drafts = min(len(emitted), rows.proposed), min(kept, rows.proposed)
        seq.drafted += reached
        seq.kept += kept_drafts
        trim: int | None = None
        if result is not None:
            result = dataclasses.replace(result, steps=seq.steps, drafted=seq.drafted,
                                         kept=seq.kept)
            trim = 0
        else:
            seq.n_past = rows.pos + len(emitted)
            if seq.n_past < rows.pos + 1 + len(drafts):
                trim = seq.n_past  # the rejected drafts
            if seq.drafter is not None:
                seq.drafter.record(rows.proposed, kept_drafts, emitted)
        if trim is not None:
            ctx.free_seq(rows.slot, trim)
        return StepOutcome(tuple(emitted), reached, kept_drafts, trim, result)

    def _fill_batch(self, ctx: Context, slots: list[_Seq | None],
                    cost: StepCost | None) -> _Batch:
        """Put one step's tokens into the batch and say what it holds.

        A prompt is read in calls of its own, ``n_batch`` tokens at a time, exactly as a
        lone sequence reads it: llama.cpp would split a batch mixing sequences into
        micro-batches of equal length per sequence, whose rounding differs, while read
        alone a prompt leaves the very cache and first logits that P = 1 (and
        llama-cpp-python) get. It costs no throughput: the generating sequences wait one
        call, which is as long as their token would have taken in a mixed batch.
        Otherwise every generating sequence advances by its last token and the drafts
        :func:`mathq.llama.drafts.plan_step` chose for it under the curve ``cost``
        (None: drafting is off), in sequence order.
        """
        ctx.clear_batch()
        reading = next((i for i, s in enumerate(slots) if s is not None and s.prefilling), None)
        if reading is not None:
            seq = slots[reading]
            assert seq is not None
            chunk = seq.prompt[seq.n_past:seq.n_past + ctx.n_batch]
            last = seq.n_past + len(chunk) == len(seq.prompt)
            index = ctx.add(chunk, seq.n_past, reading, last)
            seq.n_past += len(chunk)
            return _Batch(len(chunk), (_Rows(reading, index, seq.n_past - 1),) if last else ())
        live = [(i, s) for i, s in enumerate(slots) if s is not None]
        drafts: dict[int, tuple[int, ...]] = {i: () for i, _ in live}
        proposed: dict[int, int] = dict.fromkeys(drafts, 0)
        if cost is not None:
            proposals = []
            for i, seq in live:
                assert seq.drafter is not None
                room = ctx.n_ctx_seq - 1 - seq.n_past
                left = seq.max_tokens - len(seq.tokens) - 1  # tokens after this step's first
                offered = tuple(seq.drafter.propose(min(left, room, ctx.n_ubatch - len(live))))
                proposed[i] = len(offered)
                proposals.append(Proposal(i, offered, seq.drafter.kept_rate(), room=room,
                                          last=seq.tokens[-1]))
            drafts = plan_step(proposals, cost.step_seconds, ctx.n_ubatch,
                               overhead=cost.host_seconds).drafts
        rows = []
        for i, seq in live:
            d = drafts[i]
            index = ctx.add([seq.tokens[-1], *d], seq.n_past, i, True, all_logits=True)
            rows.append(_Rows(i, index - len(d), seq.n_past, d, min(len(d), proposed[i])))
        return _Batch(0, tuple(rows),
                      micro_batch_rows([(i, 1 + len(drafts[i])) for i, _ in live]))

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
                         steps=seq.steps, drafted=seq.drafted, kept=seq.kept)
