"""The JSON summaries stages leave for the report: smoke, bench and KL divergence.

Producers (``smoke``, ``bench``, ``kld``) write these; the report and the model card read
them. One dataclass per summary is the schema; a missing measurement is ``None`` (shown as
missing, never as zero). Files live where :class:`mathq.layout.BuildLayout` says.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mathq.errors import MathqError
from mathq.fsutil import to_jsonable, write_text_atomic
from mathq.inputs import UnreadableInput, parse_json, read_text
from mathq.llama.devices import ParallelChoice

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Rate:
    """A proportion with its Wilson 95 % interval; ``n`` trials, ``k`` successes."""

    k: int
    n: int
    value: float
    low: float
    high: float

    def problem(self) -> str | None:
        """What makes this not a proportion (read from a file, it may be damaged), or None."""
        if not 0 <= self.k <= self.n:
            return f"{self.k} of {self.n} is not a count of successes"
        if not 0 <= self.low <= self.high <= 1 or not 0 <= self.value <= 1:
            return f"{self.value} [{self.low}, {self.high}] is not a proportion and its interval"
        return None


def wilson_rate(k: int, n: int, z: float = 1.959964) -> Rate:
    """``k`` of ``n`` with its Wilson score interval (95 % for the default ``z``).

    Wilson's interval stays inside [0, 1] and is sensible at 0 or n successes, where the
    normal approximation collapses to a point; for n = 0 the interval is all of [0, 1].
    """
    if n <= 0:
        return Rate(k=0, n=0, value=0.0, low=0.0, high=1.0)
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Rate(k=k, n=n, value=p, low=max(0.0, centre - half), high=min(1.0, centre + half))


@dataclass(frozen=True)
class MeanSd:
    """A repeated measurement: mean, sample standard deviation and repetitions."""

    mean: float
    sd: float
    n: int


@dataclass(frozen=True)
class SmokeSummary:
    """One variant's smoke test: MATH accuracy and the work it took."""

    model: str
    quant: str
    gguf: str
    suite: str
    suite_source: str
    backend: str
    parallel: int
    max_tokens: int
    accuracy: Rate
    by_subject: dict[str, Rate]
    by_level: dict[str, Rate]
    prompt_tokens: int
    completion_tokens: int
    generation_tokens_per_second: float | None
    wall_seconds: float
    reference_accuracy: float | None = None
    reference_source: str = ""
    imatrix: str | None = None
    schema: int = SCHEMA_VERSION
    # Added by the smoke stage: verdict counts, the subset's seed, and how many runs (a
    # killed run resumed makes two) produced the results.
    verdicts: dict[str, int] = field(default_factory=dict)
    seed: int | None = None
    runs: int = 1
    # How many sequences were decoded together and why (``--parallel auto`` or given);
    # None in summaries written before mathq recorded it.
    parallel_choice: ParallelChoice | None = None
    # Versions, CPU and date of the run (:mod:`mathq.evaluate.environment`).
    environment: dict[str, str] = field(default_factory=dict)
    # Drafted decoding (:mod:`mathq.llama.drafts`), summed over the answers that recorded
    # it: the draft reference's results file (None: prompt lookup only), why drafting was
    # off (None: on), drafts reached and kept (``accepted_tokens``, the name saved
    # summaries store kept drafts by), decode steps, and completion tokens per decode step
    # (how many fewer passes than one token each; the wall-time gain is what
    # benchmarks/smoke_throughput.py measures).
    draft_reference: str | None = None
    draft_off: str | None = None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None
    decode_steps: int | None = None
    tokens_per_step: float | None = None


@dataclass(frozen=True)
class BenchSummary:
    """One variant's speed, llama-bench's method: pp512 and tg128 in tokens per second."""

    model: str
    quant: str
    gguf: str
    file_size: int
    bits_per_weight: float
    threads: int
    load_seconds: float | None
    peak_rss_bytes: int | None
    prompt_tokens_per_second: MeanSd | None
    generation_tokens_per_second: MeanSd | None
    # Aggregate generation throughput (tokens/s over all sequences) by parallel sequences.
    throughput_by_parallel: dict[str, float] = field(default_factory=dict)
    imatrix: str | None = None
    schema: int = SCHEMA_VERSION
    # Added by the bench stage: the test sizes (llama-bench's pp512/tg128) and repetitions.
    n_prompt: int = 512
    n_gen: int = 128
    repetitions: int = 5
    # Where it ran: the device (``CPU``, or the GPU's name), layers offloaded of the
    # model's offloadable ones (its layers plus the output layer), and the GPU memory this
    # process took (the drop in the GPUs' free memory from before loading to the fullest
    # context). None in summaries written before mathq recorded them.
    device: str | None = None
    gpu_layers: int | None = None
    offloadable_layers: int | None = None
    vram_bytes: int | None = None
    # Memory (see :mod:`mathq.evaluate.bench`): the peak resident set before the model was
    # loaded, and llama.cpp's own buffer sizes in bytes (model, kv_cache, compute, output)
    # for a context of ``buffers_context`` tokens.
    baseline_rss_bytes: int | None = None
    llama_buffers: dict[str, int] = field(default_factory=dict)
    buffers_context: int | None = None
    environment: dict[str, str] = field(default_factory=dict)
    # The same buffers for one-sequence contexts of other lengths (by tokens), read without
    # decoding: what running the file at that context takes.
    buffers_by_context: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def rss_over_baseline_bytes(self) -> int | None:
        """Peak resident memory the model added: the peak minus the peak before loading."""
        if self.peak_rss_bytes is None or self.baseline_rss_bytes is None:
            return None
        return max(0, self.peak_rss_bytes - self.baseline_rss_bytes)


@dataclass(frozen=True)
class KldSummary:
    """One variant's next-token distributions against the reference model's.

    The statistics are llama-perplexity's ``--kl-divergence`` ones: mean KL divergence with
    its standard error, percentiles, the share of positions whose top token is the same, and
    the RMS of the change in the probability of the text's actual next token (llama-perplexity's
    "RMS Δp"). ``kld_percentiles`` is keyed by llama-perplexity's labels (``max``, ``99.9``,
    ``99``, ``95``, ``90``, ``median``, ``10``, ``5``, ``1``, ``0.1``, ``min``).
    """

    model: str
    quant: str
    reference: str
    corpus: str
    n_tokens: int
    mean_kld: float
    mean_kld_err: float
    kld_percentiles: dict[str, float]
    same_top: Rate
    rms_delta_p: float
    imatrix: str | None = None
    schema: int = SCHEMA_VERSION
    rms_delta_p_err: float | None = None
    ppl: float | None = None
    ppl_reference: float | None = None
    n_ctx: int | None = None
    n_chunks: int | None = None
    corpus_sha256: str = ""
    seconds: float | None = None
    environment: dict[str, str] = field(default_factory=dict)


S = TypeVar("S")


def save_summary(path: Path, summary: Any) -> None:
    """Write a summary as indented JSON, atomically."""
    write_text_atomic(Path(path), json.dumps(to_jsonable(summary), indent=2,
                                             ensure_ascii=False) + "\n")


def load_summary(path: Path, kind: type[S]) -> S:
    """Read a summary written by :func:`save_summary` back into its dataclass.

    Every value is checked against the dataclass's type hints, so a hand-edited or damaged
    file (a string where a number belongs, a NaN a broken variant measured, a 5,000-digit
    integer) is named here, field by field, instead of crashing whoever formats it."""
    try:
        return _build(kind, parse_json(read_text(path)), kind.__name__)
    except (UnreadableInput, _SchemaError) as e:
        problem = e.describe(path) if isinstance(e, UnreadableInput) else f"{path}: {e}"
        raise MathqError(f"cannot read {kind.__name__} from {problem}",
                         "rerun the stage that writes it (a NaN or infinity means the variant "
                         "computes garbage: rebuild it)") from None


class _SchemaError(ValueError):
    """A summary value that does not match its field's type."""


_JSON_KIND = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
              list: "an array", dict: "an object", type(None): "null"}


def _build(tp: Any, value: Any, where: str) -> Any:
    """Rebuild nested dataclasses from JSON following the type hints, checking each value."""
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _SchemaError(f"{where} must be an object, got {_JSON_KIND[type(value)]}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        missing = [name for name, f in fields.items() if name not in value
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise _SchemaError(f"{where} lacks field {missing[0]!r}")
        built = tp(**{name: _build(hints[name], value[name], f"{where}.{name}")
                      for name in fields if name in value})
        check = getattr(built, "problem", None)
        if callable(check) and (problem := check()) is not None:
            raise _SchemaError(f"{where}: {problem}")
        return built
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _build(inner[0], value, where)
    if origin is dict:
        key, v = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _SchemaError(f"{where} must be an object, got {_JSON_KIND[type(value)]}")
        if key is int:  # JSON keys are text: an int key must be written in digits
            bad = next((k for k in value if not (k.isascii() and k.isdigit())), None)
            if bad is not None:
                raise _SchemaError(f"{where} has the key {bad[:40]!r} where a number belongs")
            return {int(k): _build(v, x, f"{where}.{k}") for k, x in value.items()}
        return {k: _build(v, x, f"{where}.{k}") for k, x in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _SchemaError(f"{where} must be an array, got {_JSON_KIND[type(value)]}")
        return origin(value)
    expected = {float: (int, float), int: (int,), str: (str,), bool: (bool,)}.get(tp)
    if expected is not None and (not isinstance(value, expected)
                                 or (tp is not bool and isinstance(value, bool))):
        raise _SchemaError(f"{where} must be {_JSON_KIND[tp]}, got "
                           f"{_JSON_KIND.get(type(value), 'something else')}")
    return value
