"""Drafts for speculative decoding that need no second model, and how many to check.

A drafted step (see :mod:`mathq.llama.engine`) puts each sequence's last token and the
drafts after it into one ``llama_decode`` batch and keeps the drafts the model itself would
have chosen. Drafts cost rows of that batch, never correctness. They come from two places,
in order:

1. The *draft reference*: another model's completion of the same problem (BF16's, from the
   build's smoke results). A quantized variant mostly writes the same text, so while its
   output follows the draft reference the rest of it is the draft, up to its end. After a
   divergence the draft reference is re-aligned where the texts meet again: where the
   output's last few tokens occur in it.
2. *Prompt lookup*: the most recent earlier occurrence, in the prompt and the completion so
   far, of the completion's last n tokens (n = 3, then 2), and what followed it there.
   Solutions repeat the problem's numbers and their own expressions.

Whether checking n drafts pays depends on what rows cost, and that is not linear: on a CPU
llama.cpp runs a micro-batch of a few rows with vector kernels and one of many rows with
tiled matrix kernels, so the time *per row* falls steeply with the rows (Q8_0: a batch of
72 rows decodes 1.65x more tokens per second than one of 8). :class:`StepCost` is that
curve, calibrated once per model file and machine settings (:func:`calibrated_cost`, cached
in :data:`STEP_COSTS_FILE`) and corrected by the engine's own timed steps, which also say
what its own work around each decode costs. :func:`plan_step`
then picks, across all sequences together, the drafts that maximise expected kept tokens
per second given each sequence's measured kept rate. No fixed cap: drafts run as long as
they are likely to be kept and their rows pay, up to the whole rest of the draft reference,
the sequence's context room and the context's micro-batch.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mathq.errors import MathqError
from mathq.fsutil import TEXT_WAIT_S, atomic_outputs
from mathq.inputs import UnreadableInput, parse_json, read_text

#: Tokens of the output that must occur in the draft reference to re-align with it.
REALIGN_TOKENS = 3
#: Bytes of output text that re-align it with the draft reference where their token ids
#: differ (the same text cut into other tokens, "12" against "1" "2").
REALIGN_BYTES = 12
#: N-gram lengths prompt lookup tries, longest first.
LOOKUP_NGRAMS = (3, 2)
#: Prior kept rate per source as (kept, checked), before any draft is measured. A draft
#: from the draft reference is kept where the variant's top token is BF16's, which
#: llama.cpp's perplexity tool puts at 94.7-98.8 % for LLaMA-2-7B's Q4_K_M to Q8_0; so
#: 0.95. Lower, a curve on which drafts pay only a little at that rate (Q8_0 on a CPU)
#: never checks one, so never learns a variant keeps all of them. Lookup drafts are kept
#: less often.
PRIORS = {"draft_reference": (19.0, 20.0), "lookup": (1.0, 2.0)}
#: How many checked drafts a new sequence's prior weighs: the engine's rate so far
#: (:class:`KeptRates`), until the sequence's own drafts outweigh it.
SEQUENCE_PRIOR = 8.0
#: Drafts whose chance of being reached and kept is below this are never worth a row.
MIN_GAIN = 1e-3
#: Growth in rows between the long plans :func:`plan_step` compares.
LADDER = 1.05

#: Rows of the micro-batches the cost curve learns at, 1, 2, 4, ..., 512 (llama.cpp's
#: largest micro-batch); row counts between them are interpolated.
BUCKETS = tuple(1 << b for b in range(10))
#: Rows of the batches a new curve is calibrated with, as far as the context allows: one
#: row, the 8 of a plain CPU step, and two where the matrix kernels have taken over.
CALIBRATION_ROWS = (1, 8, 32, 128)
#: The most a calibration's time per row may rise from one batch size to the next larger
#: (on a quiet 2-core CPU it fell or rose 1.2x at most; a batch slowed by other work rose 2.3x).
MAX_ROW_COST_RISE = 1.5
#: Timed decodes per calibration size (their median counts), after one untimed warm-up.
CALIBRATION_REPEATS = 3
#: A calibration decode at least this long is timed once: the noise of a few milliseconds
#: is small next to it, and at 7B on a CPU a batch of 128 rows takes seconds.
LONG_DECODE_S = 0.25
#: The fixed part of a micro-batch (a pass over the weights) in rows' worth, where nothing is
#: measured: next to it rows are nearly free on a GPU, not on a CPU.
PRIOR_FIXED_ROWS = {"gpu": 64.0, "cpu": 4.0}
#: The calibration cache beside the model file: small, and valid while the file is unchanged.
STEP_COSTS_FILE = "step-costs.json"
#: Format of :data:`STEP_COSTS_FILE`; another version is recalibrated.
STEP_COSTS_VERSION = 1


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


class KeptRates:
    """Drafts kept per source across all of an engine's sequences so far, as (kept, checked)
    counts started at :data:`PRIORS`: the prior of every new sequence's own estimate. A
    variant that kept 99 % of its draft reference in the answers so far will most likely
    keep it in the next one too, so a new sequence can check long drafts from its first
    step instead of relearning that from the generic prior."""

    def __init__(self) -> None:
        self._counts = {source: list(prior) for source, prior in PRIORS.items()}

    def rate(self, source: str) -> float:
        """The share of ``source``'s checked drafts that were kept (prior included)."""
        kept, checked = self._counts[source]
        return kept / checked

    def add(self, source: str, kept: int, checked: int) -> None:
        """Count one step's drafts from ``source``."""
        counts = self._counts[source]
        counts[0] += kept
        counts[1] += checked


class Drafter:
    """One sequence's draft sources: its draft reference, its prompt and what it has
    generated.

    Call :meth:`propose` before a step and :meth:`record` after it. :meth:`kept_rate` is a
    Beta estimate, per source, of the chance that a draft is kept, given the draft before it
    was: the sequence's own counts on top of the engine's (``rates``).
    """

    def __init__(self, prompt: Sequence[int], draft_reference: Sequence[int] = (),
                 rates: KeptRates | None = None,
                 piece: Callable[[int], bytes] | None = None) -> None:
        self._history = list(prompt)
        self._n_prompt = len(self._history)
        self._draft_ref = np.asarray(draft_reference, dtype=np.int64)
        # With ``piece`` (a token's bytes): the draft reference's text and where each of its
        # tokens starts in it, and the output's text, for re-aligning by text.
        self._piece = piece
        self._output = bytearray()
        self._ref_text = b""
        self._ref_starts = np.zeros(0, dtype=np.int64)
        if piece is not None and len(self._draft_ref):
            pieces = [piece(int(t)) for t in self._draft_ref]
            self._ref_text = b"".join(pieces)
            self._ref_starts = np.cumsum([0, *map(len, pieces[:-1])], dtype=np.int64)
        #: Index of the next draft-reference token while the output follows it.
        self.draft_ref_pos: int | None = 0 if len(self._draft_ref) else None
        self._rates = rates or KeptRates()
        self._counts = {source: [SEQUENCE_PRIOR * self._rates.rate(source), SEQUENCE_PRIOR]
                        for source in PRIORS}
        self._source = "lookup"

    def kept_rate(self, source: str | None = None) -> float:
        """Estimated chance that a draft from ``source`` (default: the last proposal's) is
        kept."""
        kept, checked = self._counts[source or self._source]
        return kept / checked

    def propose(self, limit: int) -> list[int]:
        """Up to ``limit`` drafts to follow the output so far: the rest of the draft
        reference while the output follows it, else a prompt lookup."""
        if limit <= 0:
            return []
        pos = self.draft_ref_pos
        if pos is not None and pos < len(self._draft_ref):
            self._source = "draft_reference"
            return [int(t) for t in self._draft_ref[pos:pos + limit]]
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

    def record(self, drafted: int, kept: int, emitted: Sequence[int]) -> None:
        """Record a step: ``drafted`` tokens checked, the first ``kept`` of them kept, and
        the tokens ``emitted`` into the output (the kept ones and the model's own next)."""
        if drafted:
            # A rejected draft is one more trial; those after it were never reached.
            checked = kept + (1 if kept < drafted else 0)
            counts = self._counts[self._source]
            counts[0] += kept
            counts[1] += checked
            self._rates.add(self._source, kept, checked)
        for t in emitted:
            self._history.append(t)
            if self._piece is not None:
                self._output += self._piece(t)
            pos = self.draft_ref_pos
            if pos is not None and pos < len(self._draft_ref) and self._draft_ref[pos] == t:
                self.draft_ref_pos = pos + 1
            else:
                self.draft_ref_pos = None
        if self.draft_ref_pos is None and len(self._draft_ref):
            self._realign()

    def _realign(self) -> None:
        """Find where the output meets the draft reference again: the last occurrence there
        of the output's last :data:`REALIGN_TOKENS` tokens, else of its last
        :data:`REALIGN_BYTES` bytes of text where that ends on a draft-reference token's
        start (the same text in other tokens)."""
        generated = len(self._history) - self._n_prompt
        if generated >= REALIGN_TOKENS:
            tail = np.asarray(self._history[-REALIGN_TOKENS:], dtype=np.int64)
            start = _find_last(self._draft_ref, tail, len(self._draft_ref))
            if start >= 0:
                self.draft_ref_pos = start + REALIGN_TOKENS
                return
        if len(self._output) < REALIGN_BYTES:
            return
        text = bytes(self._output[-REALIGN_BYTES:])
        end = self._ref_text.rfind(text)
        while end >= 0:
            after = end + REALIGN_BYTES
            k = int(np.searchsorted(self._ref_starts, after))
            if k < len(self._ref_starts) and self._ref_starts[k] == after:
                self.draft_ref_pos = k
                return
            end = self._ref_text.rfind(text, 0, end + REALIGN_BYTES - 1)


class StepCost:
    """Seconds of one llama.cpp micro-batch as a function of its rows: the step-cost curve.

    The calibration's ``points`` (rows to seconds, from :func:`calibrated_cost`) are
    interpolated in log-log; beyond the first and last point, and without points, the
    prior shape takes over, a fixed part of :data:`PRIOR_FIXED_ROWS` rows plus one per row,
    anchored at the nearest point (without points only its ratios mean anything, which is
    all :func:`plan_step` needs until steps are timed).

    On top sits a correction learned from the engine's timed steps, kept per bucket of
    rows (:data:`BUCKETS`) and interpolated between them; each step weighs ``decay`` times
    the one after it, so the curve follows a machine whose load changes. A bucket with few
    steps of its own leans, with the weight of ``shrink`` steps, on the correction of all
    steps: other work on the machine slows every row count alike, and calibration batches
    (one sequence, short) are not quite a generation step either.

    Beside the decode, a step costs the engine's own work (planning, filling the batch,
    reading each row's logits): :attr:`host_seconds` per step and :attr:`host_per_row` per
    row, learned from the same steps. On a 7B model it is nothing next to the decode; on a
    small one it is as long: left out per step, every step looks dearer per token than it
    is and drafts worth less; left out per row, drafts that are rarely kept look free.
    """

    def __init__(self, *, gpu: bool, points: Mapping[int, float] | None = None,
                 decay: float = 0.98, shrink: float = 2.0) -> None:
        self.fixed_rows = PRIOR_FIXED_ROWS["gpu" if gpu else "cpu"]
        #: The calibration, rows to seconds.
        self.points = dict(sorted((int(r), float(s)) for r, s in (points or {}).items()))
        if any(r < 1 or not s > 0 for r, s in self.points.items()):
            raise ValueError(f"calibration points need rows >= 1 and seconds > 0: {points}")
        self.decay = decay
        self.shrink = shrink
        self._sum = np.zeros(len(BUCKETS))  # decayed correction sums and weights per bucket
        self._weight = np.zeros(len(BUCKETS))
        self._all_sum = self._all_weight = 0.0  # the same over all steps
        # Decayed sums for host seconds as a fixed part plus a part per row (weights, rows,
        # rows squared, seconds, rows x seconds): reading each row's logits (102400 floats
        # at DeepSeek's vocabulary) is work per row, and a small model's rows are otherwise
        # nearly free.
        self._host = np.zeros(5)
        self._table: np.ndarray | None = None  # seconds by rows, 0..BUCKETS[-1]

    def _prior(self, rows: np.ndarray) -> np.ndarray:
        return np.log(self.fixed_rows + rows)

    def _base(self, rows: np.ndarray) -> np.ndarray:
        """Log seconds of the calibration, with the prior's shape beyond it."""
        if not self.points:
            return self._prior(rows)
        r = np.array(list(self.points), dtype=float)
        s = np.log(np.array(list(self.points.values())))
        x = np.log(rows)
        inside = np.interp(x, np.log(r), s)
        below = s[0] + self._prior(rows) - self._prior(r[:1])
        above = s[-1] + self._prior(rows) - self._prior(r[-1:])
        return np.where(rows < r[0], below, np.where(rows > r[-1], above, inside))

    @staticmethod
    def _places(rows: np.ndarray) -> np.ndarray:
        """Where ``rows`` fall among the buckets, as a fractional bucket index."""
        return np.clip(np.log2(rows), 0, len(BUCKETS) - 1)

    def _correction(self, rows: np.ndarray) -> np.ndarray:
        """Log factor the timed steps put on the base curve at ``rows``."""
        overall = self._all_sum / self._all_weight if self._all_weight else 0.0
        per_bucket = (self._sum + self.shrink * overall) / (self._weight + self.shrink)
        return np.interp(self._places(rows), np.arange(len(BUCKETS)), per_bucket)

    def _log_seconds(self, rows: np.ndarray) -> np.ndarray:
        return self._base(rows) + self._correction(rows)

    def seconds(self, rows: int) -> float:
        """Expected seconds of one micro-batch of ``rows`` rows (logits for each)."""
        if rows > BUCKETS[-1]:
            return float(np.exp(self._log_seconds(np.array([float(rows)])))[0])
        if self._table is None:  # plan_step asks hundreds of times per step: a lookup
            every = np.arange(1, BUCKETS[-1] + 1, dtype=float)
            self._table = np.concatenate(([0.0], np.exp(self._log_seconds(every))))
        return float(self._table[max(rows, 0)])

    @property
    def host_per_row(self) -> float:
        """The engine's own seconds per row of a step, outside ``llama_decode`` (0 until
        steps of different rows were timed): the least-squares slope over the steps."""
        w, r, rr, h, rh = self._host
        spread = w * rr - r * r
        return max((w * rh - r * h) / spread, 0.0) if w and spread > 1e-9 * w * rr else 0.0

    @property
    def host_seconds(self) -> float:
        """The engine's own seconds per step beside its rows' (0 before a step)."""
        w, r, _rr, h, _rh = self._host
        return max((h - self.host_per_row * r) / w, 0.0) if w else 0.0

    def step_seconds(self, rows: int) -> float:
        """Expected seconds of a micro-batch of ``rows`` rows with the engine's work per
        row (what :func:`plan_step` weighs drafts with; :attr:`host_seconds` is the rest)."""
        return self.seconds(rows) + self.host_per_row * rows

    def observe(self, micro_batch_rows: Sequence[int], seconds: float, *,
                host_seconds: float = 0.0) -> None:
        """Learn from one timed step: ``seconds`` of ``llama_decode``, shared among its
        micro-batches in proportion to what the curve expected of each, and
        ``host_seconds`` of the engine's own work."""
        if not micro_batch_rows or not seconds > 0:
            return
        rows = np.array(micro_batch_rows, dtype=float)
        correction = self._correction(rows)
        base = self._base(rows)
        expected = float(np.exp(base + correction).sum())
        plain = float(np.exp(base).sum())
        if not (0 < expected < math.inf and 0 < plain < math.inf and math.isfinite(seconds)):
            return
        surprise = math.log(seconds / expected)
        self._sum *= self.decay
        self._weight *= self.decay
        self._all_sum = self.decay * self._all_sum + math.log(seconds / plain)
        self._all_weight = self.decay * self._all_weight + 1.0
        n = float(rows.sum())
        h = max(host_seconds, 0.0)
        self._host = self.decay * self._host + np.array([1.0, n, n * n, h, n * h])
        share = 1.0 / len(rows)
        for place, target in zip(self._places(rows), correction + surprise, strict=True):
            low = int(place)
            high = min(low + 1, len(BUCKETS) - 1)
            upper = place - low
            for bucket, weight in ((low, share * (1.0 - upper)), (high, share * upper)):
                self._sum[bucket] += weight * target
                self._weight[bucket] += weight
        self._table = None


@dataclass(frozen=True)
class CostIdentity:
    """What a calibration holds for: the model file as it is (its path, size and
    modification time) and how llama.cpp runs it (threads, layers on the GPU)."""

    path: str
    size: int
    mtime_ns: int
    threads: int
    gpu_layers: int

    @classmethod
    def of(cls, model: Path, *, threads: int, gpu_layers: int) -> CostIdentity:
        """The identity of ``model`` (links resolved) run with these settings."""
        resolved = Path(model).resolve()
        st = resolved.stat()
        return cls(str(resolved), st.st_size, st.st_mtime_ns, threads, gpu_layers)

    @property
    def key(self) -> str:
        """Its entry in :data:`STEP_COSTS_FILE`: one per file and settings, so a rebuilt
        file replaces its old calibration instead of adding one."""
        return f"{self.path} threads={self.threads} gpu_layers={self.gpu_layers}"


def _load_entries(cache: Path) -> dict[str, Any]:
    """The cache's entries; a missing, unreadable or damaged file (or a pipe, a device or
    a folder in its place: :func:`mathq.inputs.read_text` never blocks on one) has none."""
    try:
        data = parse_json(read_text(Path(cache)))
        if data["version"] != STEP_COSTS_VERSION:
            return {}
        return dict(data["entries"])
    except (UnreadableInput, KeyError, TypeError, ValueError):
        return {}


def _cached_points(entry: Any, identity: CostIdentity) -> dict[int, float]:
    """The calibration in ``entry`` if it is one of this very file, else nothing."""
    try:
        if (entry["size"], entry["mtime_ns"]) != (identity.size, identity.mtime_ns):
            return {}
        if any(len(str(r)) > 4 for r in entry["seconds"]):
            return {}  # no calibration has such a row count (and int() of it is slow)
        points = {int(r): float(s) for r, s in entry["seconds"].items()}
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        return {}
    return points if _plausible(points) else {}


def _plausible(points: Mapping[int, float]) -> bool:
    """Whether a calibration can be trusted: only calibration row counts, each decode
    between a microsecond and ten minutes, no batch decoded in under half the time of a
    smaller one (more rows never cost less), and none whose time per row is more than
    :data:`MAX_ROW_COST_RISE` times any smaller one's (rows get cheaper in bigger batches,
    or about as dear). A damaged file, or a machine busy with something else during one
    batch, says otherwise; such a curve, kept, would mislead every later run on the file."""
    if not points or any(r not in CALIBRATION_ROWS or not 1e-6 <= s <= 600.0
                         for r, s in points.items()):
        return False
    return all(points[later] >= points[earlier] / 2
               and points[later] / later <= MAX_ROW_COST_RISE * points[earlier] / earlier
               for earlier, later in itertools.combinations(sorted(points), 2))


def calibrated_cost(*, cache: Path, identity: CostIdentity, gpu: bool, max_rows: int,
                    time_rows: Callable[[int], float]) -> StepCost:
    """The step-cost curve of the model ``identity`` names, calibrated.

    Its points come from ``cache`` when it holds a calibration of this very file with these
    settings; the rows of :data:`CALIBRATION_ROWS` up to ``max_rows`` it lacks are measured
    now, each the median of :data:`CALIBRATION_REPEATS` calls of ``time_rows`` (seconds of
    one decode of that many rows; one call where it takes :data:`LONG_DECODE_S` or more)
    after a warm-up, and written back. A cache that cannot be
    read is measured anew and rewritten; one that cannot be written costs only a
    calibration next time.
    """
    entries = _load_entries(cache)
    points = _cached_points(entries.get(identity.key), identity)
    missing = [r for r in CALIBRATION_ROWS if r <= max_rows and r not in points]
    if missing:
        for _attempt in range(2):  # a batch slowed by other work: measure the curve again
            for rows in missing:
                time_rows(rows)  # the first decode of a shape allocates and warms caches
                first = time_rows(rows)
                points[rows] = first if first >= LONG_DECODE_S else statistics.median(
                    [first, *(time_rows(rows) for _ in range(CALIBRATION_REPEATS - 1))])
            if _plausible(points):
                break
        else:  # still implausible: use it for this run, the steps correct it; keep none
            return StepCost(gpu=gpu, points=points)
        _store(Path(cache), identity, points)
    return StepCost(gpu=gpu, points=points)


def _store(cache: Path, identity: CostIdentity, points: Mapping[int, float]) -> None:
    """Add a calibration to the cache. The entries are read again while the cache's write
    lock is held, so two runs calibrating different files at once keep both; entries of
    files since deleted or changed are dropped, so the cache holds one per file that is
    there. A read-only model folder keeps nothing: the next engine calibrates again."""
    with contextlib.suppress(OSError, MathqError), \
            atomic_outputs(cache, wait_s=TEXT_WAIT_S) as staged:
        entries = {key: entry for key, entry in _load_entries(cache).items()
                   if _current(key, entry)}
        entries[identity.key] = {"size": identity.size, "mtime_ns": identity.mtime_ns,
                                 "seconds": {str(r): s for r, s in sorted(points.items())}}
        staged[cache].write_text(json.dumps({"version": STEP_COSTS_VERSION,
                                             "entries": entries}, indent=1,
                                            sort_keys=True) + "\n", encoding="utf-8")


def _current(key: str, entry: Any) -> bool:
    """Whether a cache entry still describes a file that is there as it was measured."""
    try:
        st = Path(key.rsplit(" threads=", 1)[0]).stat()
        return (entry["size"], entry["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    except (OSError, KeyError, TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Proposal:
    """One sequence's offer to a step's plan: its slot, the drafts it proposes, their
    estimated kept rate, how many cells its cache has left after its last token, and that
    token (the filler when there is nothing to pad with)."""

    seq: int
    drafts: tuple[int, ...]
    kept_rate: float
    room: int
    last: int


def micro_batch_rows(lengths: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """The rows of each micro-batch llama.cpp makes of a batch of ``(seq, tokens)`` in
    sequence order, with per-sequence caches: each takes the same number of tokens from a
    run of consecutive sequence ids (the fewest any of them has left), until none are
    left."""
    left = {s: n for s, n in lengths if n > 0}
    rows: list[int] = []
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
        rows.append(take * len(run))
    return tuple(rows)


@dataclass(frozen=True)
class StepPlan:
    """Tokens each sequence checks this step (drafts, padded where that saves a
    micro-batch), and the rows of the micro-batches llama.cpp will make of it."""

    drafts: dict[int, tuple[int, ...]]
    micro_batch_rows: tuple[int, ...]

    @property
    def rows(self) -> int:
        """Rows of the batch: each sequence's last token and its drafts."""
        return sum(1 + len(d) for d in self.drafts.values())

    @property
    def micro_batches(self) -> int:
        """How many micro-batches, each a pass over the weights."""
        return len(self.micro_batch_rows)


def _expected(kept_rate: float, drafts: int) -> float:
    """Expected tokens of a step checking ``drafts`` drafts: 1 + a + ... + a^n."""
    if kept_rate >= 1.0:
        return drafts + 1.0
    return (1.0 - kept_rate ** (drafts + 1)) / (1.0 - kept_rate)


def plan_step(proposals: Sequence[Proposal], seconds: Callable[[int], float],
              max_rows: int, *, overhead: float = 0.0) -> StepPlan:
    """The drafts to check in one step: those that maximise expected tokens per second.

    A sequence with kept rate a expects 1 + a + ... + a^n tokens from n drafts, so its
    n-th draft adds a^n. Drafts are ranked by that gain across all sequences together, and
    every prefix of the ranking (equal gains together) is a plan, costed as the
    micro-batches llama.cpp will make of it, each ``seconds(rows)``, plus the step's
    ``overhead`` outside them (the engine's own work per step). Beside those, every
    sequence checks exactly k drafts, padded with repeats of its last one: one shape, so
    fewer micro-batches (a repeat that happens to be the greedy token is kept like any other
    draft). The most tokens per second wins, the fewer rows on a tie. At most ``max_rows``
    rows, each sequence within its cache room.
    """
    usable = [min(len(p.drafts), max(p.room, 0)) for p in proposals]
    best = StepPlan({p.seq: () for p in proposals}, ())
    best_value = -1.0

    def consider(drafts: dict[int, tuple[int, ...]], tokens: float) -> None:
        nonlocal best, best_value
        micro = micro_batch_rows([(s, 1 + len(d)) for s, d in drafts.items()])
        cost = overhead + sum(seconds(r) for r in micro)
        value = tokens / cost if cost > 0 else 0.0
        if value > best_value * 1.0001:
            best, best_value = StepPlan(drafts, micro), value

    consider(dict(best.drafts), float(len(proposals)))
    # Unpadded: the drafts most likely to be kept first, from whichever sequence. Every
    # prefix while the sequences have a few drafts each, then prefixes LADDER apart in rows:
    # the value moves little between those, and a step must not spend milliseconds planning.
    lengths = [0] * len(proposals)
    expected = float(len(proposals))
    heap = [(-p.kept_rate, i, 1) for i, p in enumerate(proposals) if usable[i]]
    heapq.heapify(heap)
    rows = last = len(proposals)
    while heap and rows < max_rows and -heap[0][0] >= MIN_GAIN:
        gain = -heap[0][0]
        while heap and -heap[0][0] == gain and rows < max_rows:
            _, i, n = heapq.heappop(heap)
            lengths[i] = n
            expected += gain
            rows += 1
            if n < usable[i]:
                heapq.heappush(heap, (-proposals[i].kept_rate ** (n + 1), i, n + 1))
        if (rows <= 4 * len(proposals) or rows >= LADDER * last or not heap
                or rows >= max_rows or -heap[0][0] < MIN_GAIN):
            consider({p.seq: p.drafts[:n] for p, n in zip(proposals, lengths, strict=True)},
                     expected)
            last = rows
    # Padded: every sequence k drafts, as far as each one's room allows.
    k = 1
    while (k <= max(usable, default=0) and len(proposals) * (1 + k) <= max_rows
           and all(p.room >= k for p in proposals)):
        drafts = {}
        expected = 0.0
        for p, n in zip(proposals, usable, strict=True):
            real = p.drafts[:min(k, n)]
            expected += _expected(p.kept_rate, len(real))
            drafts[p.seq] = real + (real[-1] if real else p.last,) * (k - len(real))
        consider(drafts, expected)
        k += 1
    return best
