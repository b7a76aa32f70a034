"""The tuner's per-tensor costs: bytes and importance-weighted error in each candidate type.

Rows of each tensor are read from the BF16 file, quantized to every candidate with ggml's own
routines (:mod:`mathq.tune.ggml`, the bytes llama.cpp would write) and dequantized back; the
squared error per input column is weighted by an importance matrix.

Not every row: llama.cpp quantizes each row on its own, so a tensor's error is the sum of
its rows' errors, and a random sample of rows estimates it. A row's error grows with its
size (the block scales follow its largest weights), so the estimate is a ratio estimator:
every row's importance-weighted squared norm is read (cheap: no quantizing), the sample
gives error per unit of norm, and the total is that ratio times the tensor's whole norm.
Rows of very different sizes (outlier rows, zero rows) then cost the estimate little. The
sample starts at :data:`SAMPLE_ROWS` rows and quadruples until every candidate's estimate
has a standard error (the ratio estimator's, with the finite-population correction) of at
most :data:`RELATIVE_SE` of itself, or holds every row; the standard error is kept beside
the estimate. At 7B a matrix has 4,096 to 102,400 rows: a few hundred settle it, and the
cost phase quantizes a few per cent of the weights instead of the model six times.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mathq.convert.converter import to_f32
from mathq.convert.gguf_info import GGUFSummary, TensorInfo, tensor_data
from mathq.errors import TuneError
from mathq.fsutil import sha256_file, write_text_atomic
from mathq.inputs import UnreadableInput, parse_json, read_text
from mathq.manifest import file_identity
from mathq.progress import Progress, ProgressCallback, no_progress
from mathq.quantize.imatrix_file import Imatrix
from mathq.tune import ggml
from mathq.tune.plan import TensorCost, candidates, group_of, quantizable, tensor_bytes

SLICE_BYTES = 64 << 20   # float32 rows quantized at a time: bounds memory on a 7B's embedding
SAMPLE_ROWS = 256        # rows of a tensor drawn first
RELATIVE_SE = 0.01       # the sample grows until each estimate's standard error is this share


class _RowErrors:
    """Each sampled row's weighted error per type and weighted squared norm; the tensor's
    estimated total error (a ratio estimator on the norms) and its standard error."""

    def __init__(self, norms: np.ndarray, types: list[str]) -> None:
        self.norms = norms  # every row's weighted squared norm
        self.picked: list[np.ndarray] = []
        self.errors: dict[str, list[np.ndarray]] = {ty: [] for ty in types}

    def add_rows(self, rows: np.ndarray) -> None:
        self.picked.append(rows)

    def add(self, ty: str, errors: np.ndarray) -> None:
        self.errors[ty].append(errors)

    def estimate(self, ty: str) -> tuple[float, float]:
        """(the tensor's total error, its standard error): the sample's error per unit of
        norm times the whole tensor's norm; exact once every row is in."""
        e = np.concatenate(self.errors[ty])
        x = self.norms[np.concatenate(self.picked)]
        n, big_n, total_x = len(e), len(self.norms), float(self.norms.sum())
        if n >= big_n:
            return float(e.sum()), 0.0
        ratio = float(e.sum() / x.sum()) if x.sum() > 0 else 0.0
        residual = e - ratio * x
        spread = float(residual.std(ddof=1)) if n > 1 else math.inf
        return ratio * total_x, big_n * spread / math.sqrt(n) * math.sqrt(1 - n / big_n)

    def settled(self) -> bool:
        return all(se <= RELATIVE_SE * abs(total)
                   for total, se in (self.estimate(ty) for ty in self.errors))


def _norms(raw: np.ndarray, t: TensorInfo, weights: np.ndarray | None, step: int) -> np.ndarray:
    """Every row's squared norm, weighted like the error (``weights`` per column)."""
    out = np.empty(raw.shape[0])
    for start in range(0, raw.shape[0], step):
        rows = np.square(to_f32(raw[start:start + step], t.type), dtype=np.float64)
        out[start:start + step] = rows @ weights if weights is not None else rows.sum(axis=1)
    return out


def _measure(path: Path, model: GGUFSummary, t: TensorInfo, fit: list[str],
             used: np.ndarray | None, weights: np.ndarray | None, threads: int,
             sample_rows: int | None) -> tuple[dict[str, float], dict[str, float]]:
    """A tensor's estimated weighted error per type and its standard error (0 when every
    row was measured: ``sample_rows`` None measures all)."""
    from gguf import GGMLQuantizationType

    raw = np.asarray(tensor_data(path, t)).reshape(-1, t.shape[0])
    n_rows = raw.shape[0]
    seed = int.from_bytes(hashlib.sha256(t.name.encode()).digest()[:8], "little")
    order = np.random.default_rng(seed).permutation(n_rows)
    step = max(1, SLICE_BYTES // (4 * t.shape[0]))
    acc = _RowErrors(_norms(raw, t, weights, step) if sample_rows is not None
                     else np.ones(n_rows), fit)
    done, want = 0, n_rows if sample_rows is None else min(n_rows, sample_rows)
    while True:
        for start in range(done, want, step):
            picked = np.sort(order[start:min(want, start + step)])
            acc.add_rows(picked)
            rows = to_f32(raw[picked], t.type)
            for ty in fit:
                tid = int(GGMLQuantizationType[ty])
                back = ggml.dequantize_rows(tid, ggml.quantize_rows(tid, rows, used, threads),
                                            *rows.shape)
                sq = np.square(back - rows, dtype=np.float64)
                acc.add(ty, sq @ weights if weights is not None else sq.sum(axis=1))
        done = want
        if done >= n_rows or acc.settled():
            break
        want = min(n_rows, 4 * want)
    estimates = {ty: acc.estimate(ty) for ty in fit}
    return ({ty: e[0] for ty, e in estimates.items()},
            {ty: e[1] for ty, e in estimates.items()})


def imatrix_entry(imatrix: Imatrix | None, name: str, n_per_row: int) -> np.ndarray | None:
    """``name``'s column weights in ``imatrix``, or None where it has none of that width."""
    values = imatrix.entries.get(name) if imatrix is not None else None
    return values if values is not None and values.size == n_per_row else None


def tensor_costs(source: Path, model: GGUFSummary, types: tuple[str, ...],
                 quant_imatrix: Imatrix | None, cost_imatrix: Imatrix, cache: Path,
                 threads: int = 0, progress: ProgressCallback = no_progress,
                 sample_rows: int | None = SAMPLE_ROWS) -> list[TensorCost]:
    """Bytes and weighted error of every quantizable tensor in every type its rows fit.

    The quantization itself uses ``quant_imatrix`` (what the file will be made with); the
    error is weighted by ``cost_imatrix``, and estimated from sampled rows (``sample_rows``
    first; None: every row). Cached in ``cache``, keyed by all inputs.
    """
    key = hashlib.sha256(json.dumps({
        "source": file_identity(source), "types": types,
        "quant_imatrix": sha256_file(quant_imatrix.path) if quant_imatrix else None,
        "cost_imatrix": sha256_file(cost_imatrix.path),
        "sample": [sample_rows, RELATIVE_SE]}, sort_keys=True).encode()).hexdigest()
    if cache.is_file():
        try:  # a damaged cache only costs the measurement again
            data = parse_json(read_text(cache))
            if data.get("key") == key:
                return [TensorCost(**c) for c in data["costs"]]
        except (UnreadableInput, AttributeError, KeyError, TypeError):
            pass
    tensors = quantizable(model)
    costs = []
    for i, t in enumerate(tensors):
        progress(Progress("tune costs", i, len(tensors), "tensors", item=t.name))
        fit = candidates(t, types)
        if not fit:
            raise TuneError(f"no candidate type fits {t.name} (rows of {t.shape[0]})",
                            "add a 32-block type such as Q8_0 or Q4_0 to --types")
        errors, se = _measure(source, model, t, fit,
                              imatrix_entry(quant_imatrix, t.name, t.shape[0]),
                              imatrix_entry(cost_imatrix, t.name, t.shape[0]), threads,
                              sample_rows)
        costs.append(TensorCost(t.name, group_of(t.name),
                                {ty: tensor_bytes(t, ty) for ty in fit}, errors, se))
    progress(Progress("tune costs", len(tensors), len(tensors), "tensors"))
    write_text_atomic(cache, json.dumps({"key": key, "costs": [asdict(c) for c in costs]})
                      + "\n")
    return costs
