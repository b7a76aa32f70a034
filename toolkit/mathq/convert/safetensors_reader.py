"""A validating, memory-mapped reader for ``.safetensors`` files, without torch.

The format is an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, data offsets) and a data section. A checkpoint that was cut short by a
failed download, or whose header was damaged, must fail here with a message naming the
file and the tensor -- not later as garbage weights -- so the header is checked in full
before any byte of data is handed out: every offset inside the data section, no two
tensors overlapping, the tensors covering the data section exactly, and each tensor's byte
size equal to its shape times its dtype's width.

Data is handed out in two forms: a byte range of the file (for kernel-side copies that
never enter this process) and a NumPy view of the memory map (for tensors that must be
transformed). :meth:`SafetensorsFile.release` drops a tensor's pages from this process's
resident set again, so peak memory stays bounded by one tensor, not the file.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from mathq.errors import CheckpointError
from mathq.inputs import UnreadableInput, file_problem, parse_json

# dtype name -> (bytes per element, NumPy dtype of the raw storage). BF16 has no NumPy
# dtype; it is handed out as its raw 16-bit words and widened where needed.
DTYPES: dict[str, tuple[int, np.dtype[Any]]] = {
    "F64": (8, np.dtype("<f8")),
    "F32": (4, np.dtype("<f4")),
    "F16": (2, np.dtype("<f2")),
    "BF16": (2, np.dtype("<u2")),
    "I64": (8, np.dtype("<i8")),
    "I32": (4, np.dtype("<i4")),
    "I16": (2, np.dtype("<i2")),
    "I8": (1, np.dtype("i1")),
    "U8": (1, np.dtype("u1")),
    "BOOL": (1, np.dtype("?")),
    "F8_E4M3": (1, np.dtype("u1")),
    "F8_E5M2": (1, np.dtype("u1")),
}

# The dtypes the converter reads, and their GGML twins: a tensor whose source dtype's twin is
# the output type is copied byte for byte (and verified as such).
SOURCE_TYPES = {"BF16": GGMLQuantizationType.BF16, "F16": GGMLQuantizationType.F16,
                "F32": GGMLQuantizationType.F32}

# The safetensors library refuses headers above 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000

_REDOWNLOAD = "download the file again (e.g. `mathq download`), it is damaged"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    path: Path

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin


def _fail(path: Path, problem: str, hint: str = _REDOWNLOAD) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}", hint)


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """Parse and validate the header of ``path``.

    Returns the tensors by name, the free-form ``__metadata__`` and the offset at which
    the data section starts. Raises :class:`CheckpointError` naming the first problem.
    """
    path = Path(path)
    if (problem := file_problem(path)) is not None:  # a pipe would block the open below
        raise CheckpointError(f"{path} {problem}", "download the checkpoint again")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(
                    path, f"is not a safetensors file: {size} bytes, too short for a header"
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _fail(
                    path,
                    f"is truncated or not a safetensors file: header length "
                    f"{n} does not fit in its {size} bytes",
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(
            f"cannot read {path}: {e.strerror or e}", "check the file's permissions"
        ) from e
    try:
        header = parse_json(raw)
    except UnreadableInput as e:
        raise _fail(path, f"has a corrupt header ({e})") from None
    if not isinstance(header, dict):
        raise _fail(path, "has a corrupt header (not a JSON object)")

    data_start = 8 + n
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _fail(path, "has a corrupt header (__metadata__ is not an object)")
    entries = {name: _entry(path, name, spec, data_start) for name, spec in header.items()}
    _check_layout(path, entries, data_start, data_size)
    return entries, {str(k): str(v) for k, v in metadata.items()}, data_start


def _entry(path: Path, name: str, spec: Any, data_start: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise _fail(path, f"tensor {name!r}: header entry is not an object")
    dtype = spec.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _fail(path, f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    offsets = spec.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail(
            path,
            f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] "
            "with 0 <= begin <= end",
        )
    expected = math.prod(shape) * DTYPES[dtype][0]
    if offsets[1] - offsets[0] != expected:
        raise _fail(
            path,
            f"tensor {name!r}: {dtype} {shape} needs {expected} bytes but "
            f"data_offsets {offsets} span {offsets[1] - offsets[0]}",
        )
    return TensorEntry(
        name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1], path
    )


def _check_layout(
    path: Path, entries: dict[str, TensorEntry], data_start: int, data_size: int
) -> None:
    """No overlaps; the tensors tile the data section exactly, or say why not."""
    ordered = sorted(entries.values(), key=lambda e: (e.begin, e.end))
    position = data_start
    tiled = True
    for prev, cur in zip([None, *ordered], ordered, strict=False):
        if prev is not None and cur.begin < prev.end:
            raise _fail(path, f"tensors {prev.name!r} and {cur.name!r} overlap in the data section")
        tiled = tiled and cur.begin == position
        position = cur.end
    data_end = data_start + data_size
    if tiled and position > data_end:
        raise _fail(
            path,
            f"is truncated: its header describes {position - data_start} bytes "
            f"of tensor data, the file holds {data_size}",
        )
    for e in ordered:
        if e.end > data_end:
            raise _fail(
                path,
                f"tensor {e.name!r}: data_offsets "
                f"[{e.begin - data_start}, {e.end - data_start}] lie outside "
                f"the data section ({data_size} bytes)",
            )
    if not tiled:
        raise _fail(path, "has gaps between tensors in its data section (corrupt header)")
    if position != data_end:
        raise _fail(
            path,
            f"has {data_end - position} bytes after the last tensor that its "
            "header does not describe",
        )


class SafetensorsFile:
    """An open, validated safetensors file; use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tensors, self.metadata, self.data_start = read_header(self.path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._map: mmap.mmap | None = None

    def fileno(self) -> int:
        """The OS file descriptor, for kernel-side copies of byte ranges."""
        return self._file.fileno()

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def array(self, name: str) -> np.ndarray:
        """A read-only NumPy view of a tensor's raw storage (BF16 as uint16 words)."""
        e = self.tensors[name]
        dtype = DTYPES[e.dtype][1]
        count = e.nbytes // dtype.itemsize
        return np.frombuffer(self._mapped(), dtype=dtype, count=count, offset=e.begin).reshape(
            e.shape
        )

    def release(self, name: str) -> None:
        """Drop a tensor's mapped pages from this process (they stay in the page cache)."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        e = self.tensors[name]
        start = e.begin - e.begin % mmap.PAGESIZE
        length = e.end - start
        if length > 0:
            self._map.madvise(mmap.MADV_DONTNEED, start, length)

    def close(self) -> None:
        """Unmap and close. A view from :meth:`array` still alive (an exception, SIGTERM,
        unwinding through a frame that holds one) keeps the map open: it is then left to
        be unmapped when the view goes, instead of failing the unwinding with BufferError."""
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, count: int) -> None:
    """Copy ``count`` bytes between files inside the kernel where it can, else via pread.

    ``copy_file_range`` lets the kernel (or the filesystem, with reflinks) move the bytes
    without passing them through this process, which is what makes a byte-exact tensor
    copy as fast as ``cp``.
    """
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < count:
        if use_kernel:
            try:
                n = os.copy_file_range(
                    src_fd, dst_fd, count - done, src_offset + done, dst_offset + done
                )
            except OSError:
                use_kernel = False
                continue
            if n == 0:
                raise OSError(f"unexpected end of input after {done} of {count} bytes")
            done += n
        else:
            chunk = os.pread(src_fd, min(count - done, 1 << 24), src_offset + done)
            if not chunk:
                raise OSError(f"unexpected end of input after {done} of {count} bytes")
            write_all(dst_fd, chunk, dst_offset + done)
            done += len(chunk)


def write_all(fd: int, data: Any, offset: int) -> None:
    """``pwrite`` all of ``data`` (bytes-like) at ``offset``, however many calls it takes."""
    view = memoryview(data).cast("B")
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written : written + (1 << 30)], offset + written)
