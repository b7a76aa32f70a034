"""The tuner's per-tensor costs: bytes and importance-weighted error in each candidate type.

Rows of each tensor are read from the BF16 file, quantized to every candidate with ggml's own
routines (:mod:`mathq.tune.ggml`, the bytes llama.cpp would write) and dequantized back; the
squared error per input column is weighted by an importance matrix.

Not every row: llama.cpp quantizes each row on its own, so a tensor's error is the sum of
its rows' errors, and a random sample of rows estimates that sum without bias. The sample
starts at :data:`SAMPLE_ROWS` rows and quadruples until every candidate's estimate has a
standard error of at most :data:`RELATIVE_SE` of itself (the finite-population error of a
mean of sampled rows), or holds every row; the standard error is kept beside the estimate.
At 7B a matrix has 4,096 to 102,400 rows, and rows of one tensor differ little in error, so
a few hundred rows settle it: the cost phase reads a few per cent of the weights instead of
quantizing the model six times.
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
    """Each sampled row's weighted error per type; the tensor's estimated total and its
    standard error."""

    def __init__(self, n_rows: int, types: list[str]) -> None:
        self.n_rows = n_rows
        self.rows: dict[str, list[np.ndarray]] = {ty: [] for ty in types}

    def add(self, ty: str, errors: np.ndarray) -> None:
        self.rows[ty].append(errors)

    def estimate(self, ty: str) -> tuple[float, float]:
        """(the tensor's total error, its standard error): N times the sample mean, with the
        finite-population correction (no error once every row is in)."""
        e = np.concatenate(self.rows[ty])
        n, big_n = len(e), self.n_rows
        total = float(big_n * e.mean())
        if n >= big_n or n < 2:
            return total, 0.0
        se = big_n * float(e.std(ddof=1)) / math.sqrt(n) * math.sqrt(1 - n / big_n)
        return total, se

    def settled(self) -> bool:
        return all(se <= RELATIVE_SE * abs(total)
                   for total, se in (self.estimate(ty) for ty in self.rows))


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
    acc = _RowErrors(n_rows, fit)
    done, want = 0, n_rows if sample_rows is None else min(n_rows, sample_rows)
    while True:
        for start in range(done, want, step):
            picked = np.sort(order[start:min(want, start + step)])
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


def _entry(imatrix: Imatrix | None, name: str, n_per_row: int) -> np.ndarray | None:
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
        errors, se = _measure(source, model, t, fit, _entry(quant_imatrix, t.name, t.shape[0]),
                              _entry(cost_imatrix, t.name, t.shape[0]), threads, sample_rows)
        costs.append(TensorCost(t.name, group_of(t.name),
                                {ty: tensor_bytes(t, ty) for ty in fit}, errors, se))
    progress(Progress("tune costs", len(tensors), len(tensors), "tensors"))
    write_text_atomic(cache, json.dumps({"key": key, "costs": [asdict(c) for c in costs]})
                      + "\n")
    return costs
