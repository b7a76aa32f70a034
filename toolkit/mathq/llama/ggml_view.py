"""Read-only views of ggml graph tensors from Python, for llama.cpp's evaluation callback.

llama.cpp calls ``cb_eval(struct ggml_tensor *, ask, user_data)`` for every node of the
compute graph. To use that from Python we need the tensor's fields, so :class:`GgmlTensor`
mirrors ``struct ggml_tensor`` of the ggml that llama-cpp-python 0.3.36 vendors
(``ggml/include/ggml.h``: GGML_MAX_DIMS 4, GGML_MAX_SRC 10, GGML_MAX_OP_PARAMS 64,
GGML_MAX_NAME 64). A wrong layout would read garbage, so :func:`ggml_api` checks it
against the library before anything is read: ggml reports ``ggml_tensor_overhead()``,
which is ``sizeof(struct ggml_tensor)`` plus its 32-byte object header. Op numbers are not
hard-coded either: they are looked up by name with ``ggml_op_name``, because ggml inserts
new ops in the middle of its enum from one release to the next.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type + padding
GGML_TYPE_F32 = 0  # enum ggml_type; F32 has been 0 since ggml began
_OP_SEARCH_LIMIT = 256  # ggml has fewer ops than this; we stop at the ones we look for


class GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of the vendored ggml, field for field."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


class GgmlLayoutError(RuntimeError):
    """The ggml library does not match the struct layout this module was written for."""


@dataclass(frozen=True)
class GgmlApi:
    """The ggml functions and enum values the callback needs, checked once per process."""

    lib: ctypes.CDLL
    op_mul_mat: int
    op_mul_mat_id: int

    def is_host(self, t: GgmlTensor) -> bool:
        """True when the tensor's bytes live in host memory (always so on the CPU backend)."""
        return bool(t.buffer) and bool(self.lib.ggml_backend_buffer_is_host(t.buffer))

    def op_name(self, op: int) -> str:
        """ggml's name of an op number (``MUL_MAT``)."""
        return self.lib.ggml_op_name(op).decode()


@functools.cache
def ggml_api() -> GgmlApi:
    """Bind ggml from llama-cpp-python's own libraries and check the struct layout."""
    from llama_cpp import _ggml

    lib = _ggml.libggml  # libggml.so; symbols of libggml-base resolve through it
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    lib.ggml_tensor_overhead.argtypes = []
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                            ctypes.c_size_t]
    expected = lib.ggml_tensor_overhead() - GGML_OBJECT_SIZE
    if ctypes.sizeof(GgmlTensor) != expected:
        raise GgmlLayoutError(
            f"struct ggml_tensor is {expected} bytes in the loaded ggml, but mathq's mirror is "
            f"{ctypes.sizeof(GgmlTensor)} bytes; mathq.llama.ggml_view must be updated for this "
            "llama-cpp-python version")
    ops: dict[str, int] = {}
    for i in range(_OP_SEARCH_LIMIT):
        name = lib.ggml_op_name(i)
        if name is None:
            break
        if name.decode() in ("MUL_MAT", "MUL_MAT_ID"):
            ops[name.decode()] = i
            if len(ops) == 2:
                break
    if len(ops) != 2:
        raise GgmlLayoutError("ggml has no MUL_MAT/MUL_MAT_ID ops; mathq.llama.ggml_view must be "
                              "updated for this llama-cpp-python version")
    return GgmlApi(lib, ops["MUL_MAT"], ops["MUL_MAT_ID"])


def tensor_at(address: int) -> GgmlTensor:
    """The tensor at a ``struct ggml_tensor *`` (a view, not a copy; valid during the call)."""
    return GgmlTensor.from_address(address)


def tensor_name(t: GgmlTensor) -> str:
    """The tensor's name as ggml stores it (NUL-terminated, at most 63 bytes)."""
    return t.name.decode("utf-8", errors="replace")


def f32_view(t: GgmlTensor) -> np.ndarray:
    """A zero-copy NumPy view of an F32 host tensor, honouring its strides.

    Shape is ggml's ``ne`` reversed (``[ne3, ne2, ne1, ne0]``), so the last axis runs
    along a row. Valid only while ggml keeps the tensor, i.e. inside the callback.
    """
    ne, nb, extent = _f32_layout(t)
    if extent == 0:
        return np.zeros(ne[::-1], np.float32)
    raw = (ctypes.c_char * extent).from_address(t.data)
    return np.ndarray(shape=tuple(ne[::-1]), dtype=np.float32, buffer=raw,
                      strides=tuple(nb[::-1]))


def f32_array(api: GgmlApi, t: GgmlTensor) -> np.ndarray:
    """An F32 tensor wherever it lives: :func:`f32_view` of host memory, or a copy of
    device (GPU) memory made with ``ggml_backend_tensor_get``, as llama-imatrix does."""
    if api.is_host(t):
        return f32_view(t)
    ne, nb, extent = _f32_layout(t)
    if extent == 0:
        return np.zeros(ne[::-1], np.float32)
    if not t.buffer or not t.data:
        raise ValueError(f"tensor {tensor_name(t)} has no memory to read")
    nbytes = api.lib.ggml_nbytes(ctypes.addressof(t))
    if nbytes != extent:  # ggml's size of a strided tensor is the same span
        raise ValueError(f"tensor {tensor_name(t)}: ggml_nbytes {nbytes} != {extent}")
    raw = (ctypes.c_char * extent)()
    api.lib.ggml_backend_tensor_get(ctypes.addressof(t), raw, 0, extent)
    return np.ndarray(shape=tuple(ne[::-1]), dtype=np.float32, buffer=raw,
                      strides=tuple(nb[::-1]))


def _f32_layout(t: GgmlTensor) -> tuple[list[int], list[int], int]:
    """``ne``, ``nb`` and the bytes an F32 tensor spans (0 when it is empty)."""
    if t.type != GGML_TYPE_F32:
        raise ValueError(f"tensor {tensor_name(t)} is not F32 (type {t.type})")
    ne = [int(t.ne[i]) for i in range(GGML_MAX_DIMS)]
    nb = [int(t.nb[i]) for i in range(GGML_MAX_DIMS)]
    if min(ne) <= 0:
        return ne, nb, 0
    return ne, nb, sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + 4
