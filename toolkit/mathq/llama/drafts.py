"""Drafts for speculative decoding that need no second model, and how many to check.

A drafted step (see :mod:`mathq.llama.engine`) puts each sequence's last token and up to
k guessed next tokens into one ``llama_decode`` batch and keeps the guesses the model
itself would have chosen. The guesses cost rows of that batch, never correctness. They come
from two places, in order:

1. The *reference* completion of the same problem (BF16's, from the build's smoke results):
   a quantized variant mostly writes the same text, so while its output follows the
   reference the next reference tokens are the draft. After a divergence the reference is
   re-aligned where the texts meet again: where the output's last few tokens occur in it.
2. *Prompt lookup*: the most recent earlier occurrence, in the prompt and the completion so
   far, of the completion's last n tokens (n = 3, then 2), and what followed it there.
   Solutions repeat the problem's numbers and their own expressions.

Whether checking k guesses pays depends on the hardware: a decode step costs a fixed part
(reading every weight once, per micro-batch) plus a part per row (compute, and the
102400-wide output layer). :class:`RowCost` fits that split from the engine's own step
times, and :func:`plan_step` picks the k that maximises expected tokens per second given
each sequence's measured acceptance. On a GPU, or on a CPU with few sequences left, rows
are nearly free and k grows; on a CPU already busy with 8 sequences they are not, and k
shrinks to 0 (plain decoding) when guesses would cost more than they save.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Most tokens drafted for one sequence in one step.
MAX_DRAFT = 8
#: Tokens of the output that must occur in the reference to re-align with it.
REALIGN_TOKENS = 3
#: N-gram lengths prompt lookup tries, longest first.
LOOKUP_NGRAMS = (3, 2)
#: Prior acceptance (successes, trials) per source, before a sequence has any of its own:
#: a variant follows its reference closely; lookup guesses are right less often.
PRIORS = {"reference": (4.0, 5.0), "lookup": (1.0, 2.0)}



def draft_off_reason(draft: bool, ignore_eos: bool) -> str | None:
    """Why an in-process run does not draft (None: it does); the engine and the smoke
    summary both say it with these words."""
    if not draft:
        return "--no-draft"
    if ignore_eos:
        return "--ignore-eos (its ban on EOS would have to hold at every drafted position)"
    return None

def _find_last(history: np.ndarray, tail: np.ndarray, end: int) -> int:
    """Start of the last occurrence of ``tail`` in ``history[:end]``, or -1."""
    n = len(tail)
    if end < n or n == 0:
        return -1
    window = history[:end]
    starts = np.flatnonzero(window[:end - n + 1] == tail[0])
    for s in starts[::-1]:
        if np.array_equal(window[s:s + n], tail):
            return int(s)
    return -1


class Drafter:
    """One sequence's draft sources: its reference, its prompt and what it has generated.

    Call :meth:`propose` before a step and :meth:`accepted` after it. :meth:`acceptance`
    is a Beta estimate, per source, of the chance that a drafted token is the greedy one;
    ``cap`` is the sequence's own k, grown while its guesses are all right.
    """

    def __init__(self, prompt: Sequence[int], reference: Sequence[int] = ()) -> None:
        self._history = list(prompt)
        self._n_prompt = len(self._history)
        self._ref = np.asarray(reference, dtype=np.int64)
        #: Index of the next reference token while the output follows the reference.
        self.ref_pos: int | None = 0 if len(self._ref) else None
        self.cap = 4
        self._counts = {k: list(v) for k, v in PRIORS.items()}
        self._source = "lookup"

    def acceptance(self, source: str | None = None) -> float:
        """Estimated chance that a token drafted from ``source`` (default: the last
        proposal's) is accepted."""
        ok, n = self._counts[source or self._source]
        return ok / n

    def propose(self, limit: int) -> list[int]:
        """Up to ``min(limit, cap)`` drafted tokens to follow the output so far."""
        limit = min(limit, self.cap)
        if limit <= 0:
            return []
        if self.ref_pos is not None and self.ref_pos < len(self._ref):
            self._source = "reference"
            return [int(t) for t in self._ref[self.ref_pos:self.ref_pos + limit]]
        self._source = "lookup"
        history = np.asarray(self._history, dtype=np.int64)
        for n in LOOKUP_NGRAMS:
            if len(history) - self._n_prompt < 1 or len(history) <= n:
                continue
            start = _find_last(history, history[-n:], len(history) - 1)
            if start >= 0:
                follow = history[start + n:start + n + limit]
                return [int(t) for t in follow]
        return []

    def accepted(self, drafted: int, accepted: int, emitted: Sequence[int]) -> None:
        """Record a step: ``drafted`` tokens checked, the first ``accepted`` kept, and the
        tokens ``emitted`` into the output (the accepted ones and the model's own next)."""
        if drafted:
            counts = self._counts[self._source]
            counts[0] += accepted
            counts[1] += accepted + (1 if accepted < drafted else 0)
            # Grow while every guess is right, fall back to what was right otherwise.
            self.cap = min(MAX_DRAFT, self.cap + 2) if accepted == drafted \
                else max(1, accepted + 1)
        for t in emitted:
            self._history.append(t)
            if self.ref_pos is not None and self.ref_pos < len(self._ref) \
                    and self._ref[self.ref_pos] == t:
                self.ref_pos += 1
            else:
                self.ref_pos = None
        if self.ref_pos is None and len(self._ref):
            self._realign()

    def _realign(self) -> None:
        """Find where the output meets the reference again: the last occurrence there of
        the output's last :data:`REALIGN_TOKENS` tokens."""
        generated = len(self._history) - self._n_prompt
        if generated < REALIGN_TOKENS:
            return
        tail = np.asarray(self._history[-REALIGN_TOKENS:], dtype=np.int64)
        start = _find_last(self._ref, tail, len(self._ref))
        if start >= 0:
            self.ref_pos = start + REALIGN_TOKENS


class RowCost:
    """A decode step's time as ``fixed * micro_batches + per_row * rows``, fitted online.

    Least squares over the engine's generation steps (older ones weigh less), shrunk
    towards a prior: the fixed part is ``prior_rows`` rows' worth until about
    ``prior_steps`` steps that vary enough to tell the two parts apart say otherwise (a
    few noisy steps on a shared machine must not swing the plan). Only the ratio matters
    to :func:`plan_step`.
    """

    def __init__(self, prior_rows: float, decay: float = 0.98, prior_steps: float = 20.0) -> None:
        self.prior_rows = prior_rows
        self.decay = decay
        self.prior_steps = prior_steps
        self._s = np.zeros(5)  # sum uu, ur, rr, ut, rt
        self._n = 0.0  # steps seen, decayed like the sums

    def observe(self, micro_batches: int, rows: int, seconds: float) -> None:
        """Add one timed step."""
        u, r, t = float(micro_batches), float(rows), float(seconds)
        self._s = self.decay * self._s + np.array([u * u, u * r, r * r, u * t, r * t])
        self._n = self.decay * self._n + 1.0

    @property
    def fixed_rows(self) -> float:
        """How many rows the fixed part of a micro-batch costs as much as."""
        uu, ur, rr, ut, rt = self._s
        det = uu * rr - ur * ur
        if uu == 0 or det <= 1e-6 * uu * rr:
            return self.prior_rows
        fixed = (rr * ut - ur * rt) / det
        per_row = (uu * rt - ur * ut) / det
        if per_row <= 0 or fixed <= 0:
            return self.prior_rows
        fitted = min(512.0, max(0.25, fixed / per_row))
        # How much the steps tell the parts apart: the share of row variance not explained
        # by the micro-batch count, times the steps seen.
        weight = self._n * det / (uu * rr)
        return float((self.prior_steps * self.prior_rows + weight * fitted)
                     / (self.prior_steps + weight))


@dataclass(frozen=True)
class Candidate:
    """One sequence's part in a step's plan: its slot, proposed drafts, their estimated
    acceptance, how many cells its cache has left after its last token, and that token
    (the filler when there is nothing to pad with)."""

    seq: int
    drafts: tuple[int, ...]
    acceptance: float
    room: int
    last: int


def micro_batches(lengths: Sequence[tuple[int, int]]) -> int:
    """How many micro-batches llama.cpp makes of a batch of ``(seq, tokens)`` in sequence
    order, with per-sequence caches: each takes the same number of tokens from a run of
    consecutive sequence ids (the fewest any of them has left), until none are left."""
    left = {s: n for s, n in lengths if n > 0}
    count = 0
    while left:
        run: list[int] = []
        for s in left:
            if run and s != run[-1] + 1:
                break
            run.append(s)
        take = min(left[s] for s in run)
        for s in run:
            left[s] -= take
            if not left[s]:
                del left[s]
        count += 1
    return count


@dataclass(frozen=True)
class StepPlan:
    """Tokens each sequence checks this step (drafts, padded where that saves a
    micro-batch), and the micro-batches llama.cpp will make of it."""

    drafts: dict[int, tuple[int, ...]]
    micro_batches: int

    @property
    def rows(self) -> int:
        """Rows of the batch: each sequence's last token and its drafts."""
        return sum(1 + len(d) for d in self.drafts.values())


def plan_step(candidates: Sequence[Candidate], fixed_rows: float, max_rows: int) -> StepPlan:
    """The drafts to check in one step: what maximises expected tokens per unit of cost.

    Expected tokens of a sequence with acceptance a and n real drafts: 1 + a + ... + a^n.
    Cost in rows: every row, plus ``fixed_rows`` per micro-batch (a pass over the weights).
    Each k from 0 up is tried two ways: every sequence checks up to k of its own drafts
    (lengths differ, so llama.cpp may split the batch), or every sequence checks exactly k,
    padded with repeats of its last draft (one shape, fewer micro-batches; a repeat that
    happens to be the greedy token is kept like any other draft).
    """
    best: StepPlan | None = None
    best_value = -1.0
    longest = max((min(len(c.drafts), c.room) for c in candidates), default=0)
    for k in range(longest + 1):
        for padded in (False, True):
            if padded and (k == 0 or any(c.room < k for c in candidates)):
                continue
            drafts: dict[int, tuple[int, ...]] = {}
            tokens = 0.0
            for c in candidates:
                real = c.drafts[:min(k, c.room)]
                tokens += sum(c.acceptance ** j for j in range(len(real) + 1))
                if padded and len(real) < k:
                    real = real + (real[-1] if real else c.last,) * (k - len(real))
                drafts[c.seq] = real
            plan = StepPlan(drafts, micro_batches([(s, 1 + len(d)) for s, d in drafts.items()]))
            if plan.rows > max_rows:
                continue
            value = tokens / (plan.rows + fixed_rows * plan.micro_batches)
            if value > best_value * 1.0001:
                best, best_value = plan, value
    assert best is not None  # k = 0 always fits
    return best
