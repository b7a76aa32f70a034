"""What a GGUF file is: architecture, file type, tensors and their types, parameter count.

Quantize checks its input and output with this; the report, the kld stage and publishing use
it for the measured bits per weight (file bytes over parameters), which differs from a type's
nominal figure, and publishing to check that each file holds the quantization its name says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathq.errors import GGUFError
from mathq.fsutil import READ_HINT, os_reason
from mathq.inputs import file_problem
from mathq.recipes.quants import by_ftype

GGUF_MAGIC = b"GGUF"

# Types that hold unquantized weights: converting from these is not a requantization.
FLOAT_TYPES = frozenset({"F32", "F16", "BF16"})


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: name, ggml type name and shape in ggml order (ne0 = row length first).

    ``offset`` is where its data starts in the file (absolute) and ``n_bytes`` its length.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    offset: int = 0
    n_bytes: int = 0

    @property
    def n_elements(self) -> int:
        """Number of weights in the tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFSummary:
    """The facts about a GGUF file that stages need."""

    path: Path
    architecture: str
    file_type: int | None
    tensors: tuple[TensorInfo, ...]
    size: int

    @property
    def file_type_name(self) -> str:
        """``general.file_type`` as a quant name, e.g. ``Q4_K_M``."""
        q = by_ftype(self.file_type) if self.file_type is not None else None
        return q.name if q else f"ftype {self.file_type}"

    @property
    def n_params(self) -> int:
        """Total weights over all tensors."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """File bits over weights: the real cost per weight, metadata included."""
        return self.size * 8 / self.n_params if self.n_params else 0.0

    @property
    def is_quantized(self) -> bool:
        """True when any weight matrix is stored in a quantized type."""
        return any(t.type not in FLOAT_TYPES for t in self.tensors if len(t.shape) >= 2)

    def tensor_types(self) -> dict[str, str]:
        """Tensor name to ggml type name."""
        return {t.name: t.type for t in self.tensors}


def is_gguf(path: Path) -> bool:
    """True when the file starts with GGUF's magic bytes."""
    if file_problem(path) is not None:  # a named pipe would block the open below
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _check_gguf_file(path: Path) -> None:
    """Refuse a missing, unreadable or non-GGUF file with the error that says which."""
    problem = file_problem(path)
    if problem == "does not exist":
        raise GGUFError(f"{path} not found", "check the path, or run `mathq convert` first")
    if problem is not None:
        raise GGUFError(f"{path} {problem}", "give a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {os_reason(e)}", READ_HINT) from e
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (no GGUF magic bytes)",
                        "give a .gguf file made by `mathq convert` or llama.cpp")


def read_gguf_summary(path: Path) -> GGUFSummary:
    """Read a GGUF's header, refusing files that are not GGUF or cannot be parsed."""
    return read_gguf_header(path).summary


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF's summary plus its scalar and string metadata (arrays are skipped)."""

    summary: GGUFSummary
    values: dict[str, object]
    data_offset: int = 0


# GGUFValueType -> struct format of one scalar (little-endian); 8 is STRING, 9 is ARRAY.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_header(path: Path) -> GGUFHeader:
    """Read a GGUF's tensor table and scalar metadata without parsing its arrays.

    gguf-py's reader builds a numpy view per array element, which takes several seconds on
    DeepSeek's 102400-token vocabulary; publishing, the report and the kld stage need only
    tensor shapes and a few scalars, so this scanner skips arrays by their lengths (strings
    one length at a time, numbers in one step). It is mathq's one GGUF header reader (the
    tests compare it with gguf-py's ``GGUFReader`` on every GGUF they make). Like gguf-py it
    reads GGUF versions 2 and 3 and refuses others by name, and it checks that every
    tensor's data lies inside the file. Little-endian files only: a big-endian one is
    refused by name.
    """
    import mmap
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    _check_gguf_file(path)
    section = "header"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        try:
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
            if version > 0xFFFF:
                raise GGUFError(f"{path} is a big-endian GGUF file; mathq reads little-endian "
                                "ones", "convert the model again without --bigendian")
            if version not in (2, 3):
                raise GGUFError(f"{path} is GGUF version {version}; mathq reads 2 and 3",
                                "convert the model again with a current llama.cpp")
            pos = 24

            def string(at: int) -> tuple[str, int]:
                (n,) = struct.unpack_from("<Q", m, at)
                return m[at + 8:at + 8 + n].decode("utf-8", "replace"), at + 8 + n

            values: dict[str, object] = {}
            section = "metadata"
            for _ in range(n_kv):
                key, pos = string(pos)
                (kind,) = struct.unpack_from("<I", m, pos)
                pos += 4
                if kind == _STRING:
                    values[key], pos = string(pos)
                elif kind not in _SCALARS and kind != _ARRAY:
                    raise ValueError(f"metadata {key!r} has unknown value type {kind}")
                elif kind == _ARRAY:
                    item, count = struct.unpack_from("<IQ", m, pos)
                    pos += 12
                    if item == _STRING:
                        for _ in range(count):
                            pos += 8 + struct.unpack_from("<Q", m, pos)[0]
                    elif item in _SCALARS:
                        pos += count * struct.calcsize(_SCALARS[item])
                    else:
                        raise ValueError(f"metadata {key!r} is an array of unknown type {item}")
                    if pos > len(m):
                        raise struct.error("past the end")
                else:
                    values[key] = struct.unpack_from(_SCALARS[kind], m, pos)[0]
                    pos += struct.calcsize(_SCALARS[kind])
            index = []
            section = "tensor index"
            for _ in range(n_tensors):
                name, pos = string(pos)
                (n_dims,) = struct.unpack_from("<I", m, pos)
                if n_dims > 4:  # GGML_MAX_DIMS
                    raise ValueError(f"tensor {name!r} has {n_dims} dimensions (at most 4)")
                dims = struct.unpack_from(f"<{n_dims}Q", m, pos + 4)
                ggml_type, offset = struct.unpack_from("<IQ", m, pos + 4 + 8 * n_dims)
                pos += 4 + 8 * n_dims + 4 + 8
                try:
                    kind = GGMLQuantizationType(ggml_type)
                except ValueError:
                    raise ValueError(f"tensor {name!r} has unknown type {ggml_type}") from None
                index.append((name, kind, dims, offset))
            alignment = values.get("general.alignment", 32)
            if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
                raise ValueError(f"general.alignment {alignment!r} is not a power of two")
            data_offset = pos + (-pos) % alignment
            tensors = []
            for name, kind, dims, offset in index:
                block, type_size = GGML_QUANT_SIZES[kind]
                n = 1
                for d in dims:
                    n *= int(d)
                if dims and int(dims[0]) % block:
                    raise ValueError(f"tensor {name} rows of {dims[0]} are not whole "
                                     f"{kind.name} blocks")
                n_bytes = n // block * type_size
                if data_offset + offset + n_bytes > len(m):
                    raise ValueError(f"tensor {name} runs past the end of the file")
                tensors.append(TensorInfo(name, kind.name, tuple(int(d) for d in dims),
                                          data_offset + offset, n_bytes))
        except GGUFError:
            raise
        except (struct.error, OverflowError):
            raise GGUFError(f"{path} is cut short: it ends (at byte {len(m)}) inside its "
                            f"{section}", "rebuild or download it again") from None
        except (KeyError, ValueError, MemoryError) as e:
            raise GGUFError(f"{path} is a damaged GGUF file: {e}",
                            "rebuild or download it again; it may have been cut short") from None
    ftype = values.get("general.file_type")
    summary = GGUFSummary(path=path, architecture=str(values.get("general.architecture", "")),
                          file_type=int(ftype) if isinstance(ftype, int) else None,
                          tensors=tuple(tensors), size=path.stat().st_size)
    return GGUFHeader(summary, values, data_offset)


def tensor_data(path: Path, tensor: TensorInfo) -> Any:
    """A read-only memory map of one tensor's bytes: float types as their raw elements
    (BF16 as uint16 words), quantized types as bytes, shaped rows first."""
    import numpy as np

    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
    if tensor.type in dtypes:
        dtype, shape = dtypes[tensor.type], tuple(reversed(tensor.shape))
    else:
        dtype, shape = np.uint8, (tensor.n_bytes,)
    return np.memmap(path, dtype=dtype, mode="r", offset=tensor.offset, shape=shape)


def gguf_imatrix(path: Path) -> str | None:
    """The importance matrix a quantized GGUF was made with (``quantize.imatrix.file``, as
    llama-quantize and mathq record it), or None."""
    value = read_gguf_header(path).values.get("quantize.imatrix.file")
    return str(value) if value is not None else None
