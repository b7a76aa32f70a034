"""llama.cpp importance-matrix files: the GGUF format and the legacy ``.dat`` format.

An importance matrix holds, for each weight matrix, the mean squared input activation of each
input column; quantizers use it to spend precision where activations are large. Values are
normalised here exactly as ``llama-quantize`` does before calling ``llama_model_quantize``
(GGUF: ``in_sum2 / counts`` per expert, 1 where a count is 0; legacy: ``sums / ncall``), so
mathq and ``llama-quantize`` given the same file produce the same output.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mathq.errors import GGUFError
from mathq.inputs import UnreadableInput, file_problem, read_bytes

GGUF_MAGIC = b"GGUF"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"


class ImatrixError(GGUFError):
    """An importance-matrix file that cannot be used."""


@dataclass(frozen=True)
class Imatrix:
    """Normalised importance data keyed by weight tensor name (``blk.0.attn_q.weight``)."""

    path: Path
    entries: dict[str, np.ndarray]
    datasets: tuple[str, ...]
    chunk_count: int
    legacy: bool


def _bad(path: Path, problem: str) -> ImatrixError:
    return ImatrixError(f"{path}: not a usable importance matrix: {problem}",
                        "make one with `llama-imatrix` or pass a different --imatrix file")


def load_imatrix(path: Path) -> Imatrix:
    """Read and validate an imatrix file of either format."""
    path = Path(path)
    if (problem := file_problem(path)) is not None:  # a pipe would block the open below
        raise _bad(path, problem)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise _bad(path, e.strerror or str(e)) from e
    data = _load_gguf(path) if magic == GGUF_MAGIC else _load_legacy(path)
    for name, values in data.entries.items():
        if not np.all(np.isfinite(values)):
            raise _bad(path, f"entry {name} holds NaN or infinite values")
    return data


def _load_gguf(path: Path) -> Imatrix:
    from gguf import GGMLQuantizationType, GGUFReader

    from mathq.convert.gguf_info import read_gguf_header
    from mathq.errors import GGUFError

    try:  # mathq's own scanner first: its errors say what is wrong in words
        read_gguf_header(path)
    except GGUFError as e:
        raise _bad(path, e.message.removeprefix(f"{path} ")) from None
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError ...
        raise _bad(path, f"unreadable GGUF ({type(e).__name__})") from e
    fields = reader.fields
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in fields]
    if missing:
        raise _bad(path, f"missing metadata {', '.join(missing)} (llama-quantize refuses it too)")
    datasets = tuple(str(d) for d in fields[KEY_DATASETS].contents())
    chunk_count = int(fields[KEY_CHUNK_COUNT].contents())
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.tensor_type != GGMLQuantizationType.F32:
            raise _bad(path, f"tensor {t.name} is {t.tensor_type.name}, expected F32")
        if t.name.endswith(SUM_SUFFIX):
            sums[t.name.removesuffix(SUM_SUFFIX)] = np.asarray(t.data, np.float32).reshape(-1)
        elif t.name.endswith(COUNT_SUFFIX):
            counts[t.name.removesuffix(COUNT_SUFFIX)] = np.asarray(t.data, np.float32).reshape(-1)
    if not sums:
        raise _bad(path, "no *.in_sum2 tensors")
    if set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))[0]
        raise _bad(path, f"{odd} lacks its matching {SUM_SUFFIX}/{COUNT_SUFFIX} tensor")
    entries = {}
    for name, s in sums.items():
        c = np.rint(counts[name]).astype(np.float32)  # llama.cpp rounds counts to integers
        if c.size == 0 or s.size % c.size:
            raise _bad(path, f"{name}: {s.size} sums do not split into {c.size} count groups")
        per = s.reshape(c.size, -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = np.where(c[:, None] > 0, per / np.where(c > 0, c, 1)[:, None], 1.0)
        entries[name] = norm.astype(np.float32).reshape(-1)
    return Imatrix(path, entries, datasets, chunk_count, legacy=False)


def _load_legacy(path: Path) -> Imatrix:
    try:
        raw = read_bytes(path)
    except UnreadableInput as e:
        raise _bad(path, str(e)) from None
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise _bad(path, f"file ends early at byte {pos} (neither GGUF nor legacy .dat)")
        out = struct.unpack_from(fmt, raw, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise _bad(path, f"legacy header says {n_entries} entries")
    entries = {}
    for i in range(n_entries):
        (length,) = take("<i")
        if not 0 < length <= 1024:
            raise _bad(path, f"entry {i + 1} has a name length of {length}")
        name_bytes = take(f"<{length}s")[0]
        try:
            name = name_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _bad(path, f"entry {i + 1} has a name that is not UTF-8") from e
        ncall, nval = take("<ii")
        if nval < 1:
            raise _bad(path, f"entry {name} has {nval} values")
        values = np.frombuffer(take(f"<{nval * 4}s")[0], np.float32).copy()
        entries[name] = values / ncall if ncall > 0 else values
    chunk_count, datasets = 0, ()
    if pos < len(raw):
        (chunk_count,) = take("<i")
        if pos + 4 <= len(raw):
            (length,) = take("<i")
            if length > 0:
                datasets = (take(f"<{length}s")[0].decode("utf-8", errors="replace"),)
    return Imatrix(path, {k: v.astype(np.float32) for k, v in entries.items()}, datasets,
                   chunk_count, legacy=True)


def write_imatrix_gguf(path: Path, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray],
                       datasets: tuple[str, ...], chunk_count: int, chunk_size: int) -> None:
    """Write raw sums of squared activations and token counts in ``llama-imatrix``'s format.

    ``sums[name]`` has one value per input column (times experts), ``counts[name]`` one count
    per expert (a single value for dense weights). The file is written atomically.
    """
    from gguf import GGUFWriter

    from mathq.fsutil import atomic_output

    with atomic_output(Path(path)) as tmp:
        writer = GGUFWriter(tmp, arch="imatrix", use_temp_file=False)
        # GGUFWriter always writes general.architecture; llama-imatrix writes general.type.
        writer.add_type("imatrix")
        writer.add_array(KEY_DATASETS, list(datasets))
        writer.add_uint32(KEY_CHUNK_COUNT, chunk_count)
        writer.add_uint32(KEY_CHUNK_SIZE, chunk_size)
        for name in sorted(sums):
            c = np.asarray(counts[name], np.float32).reshape(1, -1)
            s = np.asarray(sums[name], np.float32).reshape(c.size, -1)
            writer.add_tensor(f"{name}{SUM_SUFFIX}", s)
            writer.add_tensor(f"{name}{COUNT_SUFFIX}", c.reshape(c.size, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
