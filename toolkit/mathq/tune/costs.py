"""The tuner's per-tensor costs: bytes and importance-weighted error in each candidate type.

Each tensor is read from the BF16 file a slice of rows at a time, quantized to every candidate
with ggml's own routines (:mod:`mathq.tune.ggml`, the bytes llama.cpp would write) and
dequantized back; the squared error per input column is weighted by an importance matrix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from mathq.convert.converter import to_f32
from mathq.convert.gguf_info import GGUFSummary, tensor_data
from mathq.errors import TuneError
from mathq.fsutil import sha256_file, write_text_atomic
from mathq.inputs import UnreadableInput, parse_json, read_text
from mathq.manifest import file_identity
from mathq.progress import Progress, ProgressCallback, no_progress
from mathq.quantize.imatrix_file import Imatrix
from mathq.tune import ggml
from mathq.tune.plan import TensorCost, candidates, group_of, quantizable, tensor_bytes

SLICE_BYTES = 64 << 20   # float32 rows quantized at a time: bounds memory on a 7B's embedding


def _row_slices(path: Path, model: GGUFSummary, name: str) -> Iterator[np.ndarray]:
    """A tensor's rows as float32, a slice of at most :data:`SLICE_BYTES` at a time."""
    t = next(x for x in model.tensors if x.name == name)
    raw = np.asarray(tensor_data(path, t)).reshape(-1, t.shape[0])
    step = max(1, SLICE_BYTES // (4 * t.shape[0]))
    for start in range(0, raw.shape[0], step):
        yield to_f32(raw[start:start + step], t.type)


def _entry(imatrix: Imatrix | None, name: str, n_per_row: int) -> np.ndarray | None:
    values = imatrix.entries.get(name) if imatrix is not None else None
    return values if values is not None and values.size == n_per_row else None


def tensor_costs(source: Path, model: GGUFSummary, types: tuple[str, ...],
                 quant_imatrix: Imatrix | None, cost_imatrix: Imatrix, cache: Path,
                 threads: int = 0, progress: ProgressCallback = no_progress
                 ) -> list[TensorCost]:
    """Bytes and weighted error of every quantizable tensor in every type its rows fit.

    The quantization itself uses ``quant_imatrix`` (what the file will be made with); the
    error is weighted by ``cost_imatrix``. Cached in ``cache``, keyed by all inputs.
    """
    from gguf import GGMLQuantizationType

    key = hashlib.sha256(json.dumps({
        "source": file_identity(source), "types": types,
        "quant_imatrix": sha256_file(quant_imatrix.path) if quant_imatrix else None,
        "cost_imatrix": sha256_file(cost_imatrix.path)}, sort_keys=True).encode()).hexdigest()
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
        weights = _entry(cost_imatrix, t.name, t.shape[0])
        used = _entry(quant_imatrix, t.name, t.shape[0])
        fit = candidates(t, types)
        if not fit:
            raise TuneError(f"no candidate type fits {t.name} (rows of {t.shape[0]})",
                            "add a 32-block type such as Q8_0 or Q4_0 to --types")
        sq = {ty: np.zeros(t.shape[0]) for ty in fit}
        for rows in _row_slices(source, model, t.name):
            for ty in fit:
                tid = int(GGMLQuantizationType[ty])
                back = ggml.dequantize_rows(tid, ggml.quantize_rows(tid, rows, used, threads),
                                            *rows.shape)
                sq[ty] += np.square(back - rows, dtype=np.float64).sum(axis=0)
        errors = {ty: float((v * weights).sum() if weights is not None else v.sum())
                  for ty, v in sq.items()}
        costs.append(TensorCost(t.name, group_of(t.name),
                                {ty: tensor_bytes(t, ty) for ty in fit}, errors))
    progress(Progress("tune costs", len(tensors), len(tensors), "tensors"))
    write_text_atomic(cache, json.dumps({"key": key, "costs": [asdict(c) for c in costs]})
                      + "\n")
    return costs
