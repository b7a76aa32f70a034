"""ggml's own quantize and dequantize routines, called through the library llama.cpp loaded.

The tuner's per-tensor cost is the error of quantizing a tensor to a candidate type. It must be
the error of the bytes llama.cpp will really write, not of a re-implementation: llama.cpp's
quantizer converts each weight row to float32 and calls ``ggml_quantize_chunk`` with the row's
importance-matrix slice, and so does :func:`quantize_rows`, with the same symbols from the same
``libggml-base`` (tests compare the bytes with a file llama.cpp wrote). gguf-py's ``quants``
module cannot stand in: it quantizes only the legacy types, not the k-quants.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                             ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """``struct ggml_type_traits`` of ggml.h (the pinned llama.cpp's layout)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


@cache
def _lib() -> ctypes.CDLL:
    import llama_cpp

    folder = Path(llama_cpp.__file__).resolve().parent / "lib"
    candidates = sorted(folder.glob("libggml-base.*")) + sorted(folder.glob("ggml-base.*"))
    if not candidates:
        raise RuntimeError(f"libggml-base not found in {folder}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


@cache
def _traits(type_id: int) -> tuple[str, int, int, object]:
    """(name, block size, bytes per block, to_float) of a ggml type, checked against gguf's
    own table so that a changed struct layout fails loudly instead of reading garbage."""
    from gguf.constants import GGMLQuantizationType

    from mathq.recipes.quants import tensor_type_block

    t = _lib().ggml_get_type_traits(type_id).contents
    expected = tensor_type_block(GGMLQuantizationType(type_id).name)
    if (t.blck_size, t.type_size) != expected or not t.to_float:
        raise RuntimeError(f"ggml type traits of {GGMLQuantizationType(type_id).name} read as "
                           f"{(t.blck_size, t.type_size)}, gguf says {expected}")
    _lib().ggml_quantize_init(type_id)
    return t.type_name.decode(), int(t.blck_size), int(t.type_size), _TO_FLOAT(t.to_float)


def row_bytes(type_id: int, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` weights in ggml type ``type_id``."""
    return int(_lib().ggml_row_size(type_id, n_per_row))


def _chunks(nrows: int, threads: int) -> list[tuple[int, int]]:
    step = max(1, -(-nrows // max(1, threads)))
    return [(r, min(nrows, r + step)) for r in range(0, nrows, step)]


def quantize_rows(type_id: int, rows: np.ndarray, imatrix: np.ndarray | None,
                  threads: int = 0) -> np.ndarray:
    """Quantize float32 ``rows`` (nrows x n_per_row, C order) to ``type_id`` as llama.cpp's
    quantizer does; the bytes, one row after another. ctypes releases the GIL, so row
    chunks run on ``threads`` threads (0: every core)."""
    _traits(type_id)
    nrows, n_per_row = rows.shape
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    size = row_bytes(type_id, n_per_row)
    out = np.empty(nrows * size, dtype=np.uint8)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    imat_ptr = None if imat is None else imat.ctypes.data

    def work(span: tuple[int, int]) -> None:
        a, b = span
        _lib().ggml_quantize_chunk(type_id, rows[a:b].ctypes.data, out[a * size:].ctypes.data,
                                   0, b - a, n_per_row, imat_ptr)

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        list(pool.map(work, _chunks(nrows, threads or os.cpu_count() or 1)))
    return out


def dequantize_rows(type_id: int, data: np.ndarray, nrows: int, n_per_row: int) -> np.ndarray:
    """ggml's ``to_float`` of ``nrows`` rows of ``type_id`` bytes: float32, nrows x n_per_row."""
    to_float = _traits(type_id)[3]
    out = np.empty((nrows, n_per_row), dtype=np.float32)
    data = np.ascontiguousarray(data)
    to_float(data.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
             nrows * n_per_row)
    return out


def requires_imatrix(type_id: int) -> bool:
    """ggml's own rule: the types it will not quantize without an importance matrix."""
    return bool(_lib().ggml_quantize_requires_imatrix(type_id))
