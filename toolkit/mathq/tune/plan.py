"""The tuner's arithmetic: what each tensor costs in bytes and error per type, the budget, and
the allocation of types under it.

Nothing here runs a model. A tensor's *error* for a type is the importance-weighted squared
error of ggml's own quantization of it (:mod:`mathq.tune.ggml`); the search turns errors into
predicted KL divergence with one measured factor per tensor group (its *sensitivity*),
and :func:`allocate` spends the byte budget where a byte buys the most predicted KLD.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mathq.convert.gguf_info import FLOAT_TYPES, GGUFSummary, TensorInfo
from mathq.errors import TuneError
from mathq.recipes.quants import (
    TENSOR_TYPE_FALLBACK,
    TUNABLE_TYPES_HINT,
    tensor_type_block,
    tunable_type,
)

DEFAULT_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
"""Candidate tensor types: the k-quants llama.cpp's own mixes are built from, and Q8_0. Q2_K
is among them because a budget of ``--match Q2_K`` cannot be met without it: the stock Q2_K
mix itself holds most matrices at Q2_K."""

ALIGNMENT_SLACK = 31      # general.alignment is 32: each tensor's data may gain up to 31 bytes
HEADER_SLACK = 4096       # metadata a quantized file adds beyond what is counted exactly

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
          "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``4.2GiB``, ``4200MB``, ``1.8MiB`` or a plain byte count -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise TuneError(f"--size {text!r} is not a size",
                        "write it as a number with a unit, e.g. 4.2GiB, 4200MB or 1879136")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper()
    if not math.isfinite(number * _UNITS[unit]):
        raise TuneError(f"--size {text[:40]!r} is not a size a file can have",
                        "write it as a number with a unit, e.g. 4.2GiB, 4200MB or 1879136")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise TuneError(f"--size {text!r} is not a positive size", "e.g. --size 4.2GiB")
    return size


def parse_types(text: str) -> tuple[str, ...]:
    """``Q3_K,q4_k`` -> ggml tensor type names in gguf's spelling, checked, repeats dropped.

    An unknown name gets the same fix as a known one the tuner cannot use: the types it can
    choose, not ggml's whole list (F64, I8, Q8_K ...), most of which no weight is stored in.
    """
    names: dict[str, None] = {}
    for part in text.split(","):
        if part.strip():
            if (name := tunable_type(part)) is None:
                raise TuneError(f"--types {part.strip().upper()}: not a type the tuner can "
                                "choose", TUNABLE_TYPES_HINT)
            names[name] = None
    if not names:
        raise TuneError("--types names no type", f"e.g. --types {','.join(DEFAULT_TYPES)}")
    return tuple(names)


def group_of(name: str) -> str:
    """A tensor's group, the unit a KLD probe measures: its role without the layer
    (``blk.3.attn_v.weight`` -> ``attn_v``, ``output.weight`` -> ``output``)."""
    return re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight")


def quantizable(model: GGUFSummary) -> list[TensorInfo]:
    """The tensors llama.cpp quantizes: float matrices whose name ends in ``weight``
    (norms and other vectors stay F32)."""
    return [t for t in model.tensors
            if len(t.shape) >= 2 and t.type in FLOAT_TYPES and t.name.endswith("weight")]


def tensor_bytes(tensor: TensorInfo, type_name: str) -> int:
    """Bytes of ``tensor``'s data in ``type_name``."""
    block, size = tensor_type_block(type_name)
    rows = tensor.n_elements // tensor.shape[0]
    return rows * (tensor.shape[0] // block) * size


def fits_shape(tensor: TensorInfo, type_name: str) -> bool:
    """Whether llama.cpp stores ``tensor`` in ``type_name`` as asked: its rows must be whole
    blocks, else llama.cpp falls back to another type (Q4_K -> Q5_0 for 11008-wide rows)."""
    return tensor.shape[0] % tensor_type_block(type_name)[0] == 0


def candidates(tensor: TensorInfo, types: Iterable[str]) -> list[str]:
    """The types ``tensor`` can be stored in: each candidate, or where its rows are not
    whole blocks of it, the type llama.cpp falls back to (a 7B's 11008-wide ``ffn_down``
    rows take Q4_0/Q5_0/Q5_1/Q8_0, as in llama.cpp's own mixes)."""
    out: dict[str, None] = {}
    for t in types:
        t = t if fits_shape(tensor, t) else TENSOR_TYPE_FALLBACK.get(t, t)
        if fits_shape(tensor, t):
            out[t] = None
    return list(out)


@dataclass(frozen=True)
class TensorCost:
    """One quantizable tensor: its group, and bytes and weighted error per candidate type
    (``error_se``: the error's standard error where it was estimated from sampled rows)."""

    name: str
    group: str
    n_bytes: Mapping[str, int]
    error: Mapping[str, float]
    error_se: Mapping[str, float] = field(default_factory=dict)


def pattern_for(name: str) -> str:
    """The ``--tensor-type`` regex that names exactly one tensor."""
    return "^" + re.escape(name) + "$"


def overrides_text(assignment: Mapping[str, str]) -> str:
    """``llama-quantize --tensor-type-file`` text: one ``PATTERN=TYPE`` per line."""
    return "".join(f"{pattern_for(n)}={t}\n" for n, t in sorted(assignment.items()))


def overrides_pairs(assignment: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The same overrides as ``QuantizeOptions.overrides`` pairs."""
    return tuple((pattern_for(n), t) for n, t in sorted(assignment.items()))


@dataclass(frozen=True)
class SizeModel:
    """File bytes = ``fixed`` (metadata, F32 norms, alignment slack) + the chosen types'
    tensor bytes. Counting every tensor's alignment padding at its worst keeps the
    prediction an upper bound, so a plan within the budget is a file within it."""

    fixed: int
    bf16_size: int

    def file_bytes(self, costs: Iterable[TensorCost], assignment: Mapping[str, str]) -> int:
        """The upper bound on the file's size for ``assignment``."""
        return self.fixed + sum(c.n_bytes[assignment[c.name]] for c in costs)


def size_model(model: GGUFSummary, data_offset: int, extra_metadata: int) -> SizeModel:
    """The fixed part of a quantized file of ``model`` (the BF16 file, whose header starts at
    ``data_offset``) with ``extra_metadata`` bytes of added keys."""
    quant = {t.name for t in quantizable(model)}
    kept = sum(t.n_bytes for t in model.tensors if t.name not in quant)
    fixed = data_offset + extra_metadata + HEADER_SLACK + kept + \
        ALIGNMENT_SLACK * len(model.tensors)
    return SizeModel(fixed=fixed, bf16_size=model.size)


def check_budget(budget: int, costs: list[TensorCost], sizes: SizeModel, what: str) -> None:
    """Refuse a budget no mix of the candidate types fits, and one that needs no quantizing."""
    smallest = sizes.fixed + sum(min(c.n_bytes.values()) for c in costs)
    if budget < smallest:
        raise TuneError(f"{what} ({budget} bytes) is below the smallest mix of the candidate "
                        f"types ({smallest} bytes)",
                        "raise the budget or add smaller types to --types")
    if budget >= sizes.bf16_size:
        raise TuneError(f"{what} ({budget} bytes) is not below the BF16 file "
                        f"({sizes.bf16_size} bytes)", "use the BF16 file, or a smaller budget")


def predicted(costs: Iterable[TensorCost], sensitivity: Mapping[str, float],
              assignment: Mapping[str, str]) -> float:
    """Predicted mean KLD of an assignment: each tensor's error times its group's factor."""
    return sum(sensitivity[c.group] * c.error[assignment[c.name]] for c in costs)


def _hull(cost: TensorCost, s: float) -> list[str]:
    """The tensor's types on the lower convex hull of (bytes, predicted KLD), cheapest
    first: the only types a marginal-gain search should step through."""
    points = sorted(((cost.n_bytes[t], s * cost.error[t], t) for t in cost.n_bytes),
                    key=lambda p: (p[0], p[1], p[2]))
    hull: list[tuple[int, float, str]] = []
    for p in points:
        if hull and p[1] >= hull[-1][1]:
            continue  # more bytes, no less error: never worth it
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()  # hull[-1] lies on or above the chord from hull[-2] to p
            else:
                break
        hull.append(p)
    return [t for _, _, t in hull]


def allocate(costs: list[TensorCost], sensitivity: Mapping[str, float], budget: int,
             sizes: SizeModel) -> dict[str, str]:
    """Types for every tensor with file bytes <= ``budget`` and predicted KLD low.

    Start from each tensor's smallest type; take upgrade steps along each tensor's convex
    hull in order of predicted KLD saved per byte (the greedy that solves the fractional
    problem exactly), skipping steps that no longer fit; then spend what is left on any
    single upgrade that fits, best saving per byte first. Ties break by name, so the
    result depends only on the inputs.
    """
    by_name = {c.name: c for c in costs}
    hulls = {c.name: _hull(c, sensitivity[c.group]) for c in costs}
    assignment = {name: hull[0] for name, hull in hulls.items()}
    left = budget - sizes.file_bytes(costs, assignment)
    if left < 0:
        raise TuneError(f"the budget ({budget} bytes) is below the smallest mix",
                        "raise the budget or add smaller types to --types")

    def step(name: str, i: int) -> tuple[float, str, int] | None:
        hull = hulls[name]
        if i + 1 >= len(hull):
            return None
        c, a, b = by_name[name], hull[i], hull[i + 1]
        s = sensitivity[c.group]
        gain = s * (c.error[a] - c.error[b]) / (c.n_bytes[b] - c.n_bytes[a])
        return (-gain, name, i)

    heap = [s for s in (step(n, 0) for n in sorted(hulls)) if s is not None]
    heapq.heapify(heap)
    while heap:
        _, name, i = heapq.heappop(heap)
        c, a, b = by_name[name], hulls[name][i], hulls[name][i + 1]
        extra = c.n_bytes[b] - c.n_bytes[a]
        if extra > left:
            continue  # this tensor's later steps need this one first
        assignment[name] = b
        left -= extra
        nxt = step(name, i + 1)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    while True:  # leftovers: single upgrades off the hull that still fit
        best: tuple[float, str, str] | None = None
        for name in sorted(by_name):
            c, cur = by_name[name], assignment[name]
            s = sensitivity[c.group]
            for t in sorted(c.n_bytes):
                extra = c.n_bytes[t] - c.n_bytes[cur]
                saved = s * (c.error[cur] - c.error[t])
                if 0 < extra <= left and saved > 0:
                    cand = (-saved / extra, name, t)
                    if best is None or cand < best:
                        best = cand
        if best is None:
            return assignment
        _, name, t = best
        left -= by_name[name].n_bytes[t] - by_name[name].n_bytes[assignment[name]]
        assignment[name] = t


def main_type(costs: Iterable[TensorCost], assignment: Mapping[str, str]) -> str:
    """The type holding the most bytes of an assignment (names the file's ``file_type``)."""
    held: dict[str, int] = {}
    for c in costs:
        t = assignment[c.name]
        held[t] = held.get(t, 0) + c.n_bytes[t]
    return max(sorted(held), key=lambda t: held[t])
