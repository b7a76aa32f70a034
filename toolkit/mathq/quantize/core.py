"""Quantize a BF16 (or F16/F32) GGUF into llama.cpp's types with llama.cpp's own quantizer.

mathq calls ``llama_model_quantize`` in process through llama-cpp-python with the same
parameters ``llama-quantize`` would pass (importance matrix normalised the same way, the same
``quantize.imatrix.*`` metadata), so the output is the file llama.cpp's tool would write.
What mathq adds: checks before the work starts (input kind, imatrix fit, disk space), a
progress bar fed from llama.cpp's per-tensor log, and an output that is renamed into place
only after it was reopened, checked and loaded by llama.cpp.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mathq.convert.gguf_info import GGUFSummary, read_gguf_summary
from mathq.errors import MissingImatrixError, QuantizeError, TensorTypeFileError
from mathq.fsutil import atomic_output, ensure_free_space, public_name
from mathq.inputs import UnreadableInput, read_text
from mathq.llama.runtime import LOG_ERROR, capture_llama_log, llama_reason
from mathq.progress import Progress, ProgressCallback, no_progress
from mathq.quantize.imatrix_file import Imatrix, load_imatrix
from mathq.recipes.quants import QuantType, UnknownQuantError, ggml_type_id

_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_FLOAT_SUFFIX = re.compile(r"-(BF16|F16|F32)$", re.IGNORECASE)

# Keys llama-quantize writes when it is given an importance matrix.
KV_IMATRIX_FILE = "quantize.imatrix.file"
KV_IMATRIX_DATASET = "quantize.imatrix.dataset"
KV_IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
KV_IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"


@dataclass(frozen=True)
class QuantizeOptions:
    """Settings of one quantization; each maps to a ``llama-quantize`` option.

    ``imatrix`` is named in the output's metadata, as ``llama-quantize`` does, but by its
    file name only (and its calibration text's too): a GGUF may be uploaded, and no folder
    of this machine should go with it.
    ``overrides`` are ``(regex, ggml type)`` pairs, ``--tensor-type`` in llama-quantize.
    ``metadata`` are extra ``(key, value)`` pairs written into the output's header, as
    llama-quantize writes its ``quantize.imatrix.*`` keys (strings of at most 127 bytes;
    a path among them is written as its file name, see :func:`mathq.fsutil.public_name`).
    """

    quant: QuantType
    imatrix: Path | None = None
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    overrides: tuple[tuple[str, str], ...] = ()
    allow_requantize: bool = False
    threads: int = 0
    metadata: tuple[tuple[str, str | int], ...] = ()


@dataclass(frozen=True)
class QuantizeResult:
    """A finished, verified quantized GGUF."""

    path: Path
    quant: str
    size: int
    n_tensors: int
    bits_per_weight: float
    seconds: float
    tensor_types: dict[str, str]


def output_name(source: Path, quant: str) -> str:
    """``model-BF16.gguf`` -> ``model-Q4_K_M.gguf`` (any name -> ``<stem>-<QUANT>.gguf``)."""
    return f"{_FLOAT_SUFFIX.sub('', source.stem)}-{quant}.gguf"


def check_imatrix_fits(imatrix: Imatrix, model: GGUFSummary) -> None:
    """Refuse an importance matrix made for another model before any work is done."""
    tensors = {t.name: t for t in model.tensors}
    matched = [n for n in imatrix.entries if n in tensors]
    if not matched:
        raise QuantizeError(
            f"importance matrix {imatrix.path} has no entry for any tensor of {model.path.name}",
            "it was made for another model; compute one for this model (`llama-imatrix`)")
    for name in matched:
        shape = tensors[name].shape
        expected = shape[0] * (shape[2] if len(shape) > 2 else 1)
        if imatrix.entries[name].size != expected and name != "token_embd.weight":
            raise QuantizeError(
                f"importance matrix {imatrix.path} has {imatrix.entries[name].size} values for "
                f"{name}, which has {expected} input columns",
                "it was made for a model of another shape; compute one for this model")


def _kv_override(key: str, value: str | int) -> object:
    """A header key for llama.cpp to write. Every string mathq puts in a quantized GGUF
    passes here, so a path among them becomes its file name (the file may be uploaded)."""
    import llama_cpp

    kvo = llama_cpp.llama_model_kv_override()
    kvo.key = key.encode()
    if isinstance(value, int):
        kvo.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
        kvo.value.val_i64 = value
    else:
        kvo.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        kvo.value.val_str = public_name(value).encode()[:127]
    return kvo


def _terminated(struct_type: type, items: list) -> ctypes.Array:
    """A C array of ``items`` followed by a zeroed terminator entry."""
    array = (struct_type * (len(items) + 1))(*items)
    ctypes.memset(ctypes.byref(array[len(items)]), 0, ctypes.sizeof(struct_type))
    return array


def preflight(source: Path, options: QuantizeOptions) -> tuple[GGUFSummary, Imatrix | None]:
    """Every check that needs no output: input kind, type, matrix and overrides. Run for
    all variants before the first is made, so bad input never leaves half the work done."""
    source = Path(source)
    quant = options.quant
    model = read_gguf_summary(source)
    if quant.is_float:
        raise QuantizeError(f"{quant.name} is not a quantized type",
                            "use `mathq convert --outtype` for F32/F16/BF16 files")
    if model.is_quantized and not options.allow_requantize:
        raise QuantizeError(
            f"{source.name} is already quantized ({model.file_type_name}); requantizing "
            "loses more quality than quantizing the BF16 file",
            "quantize the BF16 GGUF instead, or pass --allow-requantize")
    imatrix = load_imatrix(options.imatrix) if options.imatrix else None
    if quant.requires_imatrix and imatrix is None:
        raise MissingImatrixError(f"{quant.name} needs an importance matrix",
                            "pass --imatrix FILE; `mathq quants` marks the types that need one")
    if imatrix is not None:
        check_imatrix_fits(imatrix, model)
    for pattern, type_name in options.overrides:
        ggml_type_id(type_name)
        try:
            re.compile(pattern)
        except re.error as e:
            raise QuantizeError(f"tensor type override {pattern!r} is not a regular "
                                f"expression ({e})", "fix the PATTERN of --tensor-type") from None
    for type_name in (options.output_tensor_type, options.token_embedding_type):
        if type_name:
            ggml_type_id(type_name)
    return model, imatrix


def quantize_gguf(source: Path, dest: Path, options: QuantizeOptions,
                  progress: ProgressCallback = no_progress) -> QuantizeResult:
    """Quantize ``source`` into ``dest`` (written atomically) and verify the result."""
    import llama_cpp

    source, dest = Path(source), Path(dest)
    quant = options.quant
    model, imatrix = preflight(source, options)
    ensure_free_space(dest.parent, quantized_size(source, options, model), f"{dest.name}")
    params, _arrays = _params(options, imatrix)  # the arrays live as long as this call
    errors: list[str] = []
    n_total = len(model.tensors)

    def on_line(level: int, line: str) -> None:
        if m := _TENSOR_LINE.match(line):
            progress(Progress(f"quantize {quant.name}", int(m.group(1)), int(m.group(2)),
                              "tensors", item=m.group(3)))
        elif (level == LOG_ERROR or "failed to quantize" in line) and line.strip().strip("="):
            errors.append(line.strip())

    started = time.perf_counter()
    with atomic_output(dest) as tmp:
        llama_cpp.llama_backend_init()
        with capture_llama_log(on_line):
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(),
                                                    ctypes.byref(params))
        if status != 0 or not tmp.exists():
            reason = next((e.split("failed to quantize:", 1)[1].strip() for e in reversed(errors)
                           if "failed to quantize:" in e), llama_reason(errors))
            raise QuantizeError(f"llama.cpp could not quantize {source.name} to {quant.name}: "
                                f"{reason}", "see `mathq quants` and `mathq quantize --help`")
        seconds = time.perf_counter() - started
        out = verify_quantized(tmp, quant, n_total)
    progress(Progress(f"quantize {quant.name}", n_total, n_total, "tensors"))
    return QuantizeResult(path=dest, quant=quant.name, size=out.size, n_tensors=len(out.tensors),
                          bits_per_weight=out.bits_per_weight, seconds=seconds,
                          tensor_types=out.tensor_types())


_QUANT_SIZE_LINE = re.compile(r"quant size\s*=\s*([0-9.]+) MiB")
#: Room for the keys a quantization adds to the header (imatrix names, counts, overrides).
_ADDED_METADATA = 64 << 10


def quantized_size(source: Path, options: QuantizeOptions,
                   model: GGUFSummary | None = None) -> int:
    """Bytes of the file quantizing ``source`` with ``options`` will write, at most:
    llama.cpp's dry run (its own type choices, no data read) gives the tensors' bytes; the
    header and padding are the source's, plus room for the keys quantizing adds.

    Works on a :func:`mathq.convert.converter.write_skeleton` too, so a build knows every
    variant's size before the BF16 file exists.
    """
    import llama_cpp

    source = Path(source)
    model = model or read_gguf_summary(source)
    # The matrix changes values, not types: the plan needs none.
    params, _arrays = _params(replace(options, imatrix=None), None)
    params.dry_run = True
    lines: list[str] = []
    errors: list[str] = []

    def on_line(level: int, line: str) -> None:
        (errors if level == LOG_ERROR else lines).append(line.strip())

    llama_cpp.llama_backend_init()
    with capture_llama_log(on_line):
        status = llama_cpp.llama_model_quantize(str(source).encode(), os.devnull.encode(),
                                                ctypes.byref(params))
    sizes = [m for line in lines if (m := _QUANT_SIZE_LINE.search(line))]
    if status != 0 or not sizes:
        raise QuantizeError(f"llama.cpp could not plan quantizing {source.name} to "
                            f"{options.quant.name}: {llama_reason(errors)}",
                            "see `mathq quants` and `mathq quantize --help`")
    # The log prints MiB to two decimals: round up by its last digit.
    tensors = int((float(sizes[-1].group(1)) + 0.01) * 2**20)
    header_and_padding = model.size - sum(t.n_bytes for t in model.tensors)
    return tensors + header_and_padding + 32 * len(model.tensors) + _ADDED_METADATA


def _params(options: QuantizeOptions, imatrix: Imatrix | None) -> tuple[object, list[object]]:
    """llama.cpp's quantize parameters for ``options``, and the C arrays they point into
    (which must outlive the call)."""
    import llama_cpp

    quant = options.quant
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant.ftype
    params.nthread = options.threads or (os.cpu_count() or 1)
    params.allow_requantize = options.allow_requantize
    if options.output_tensor_type:
        params.output_tensor_type = ggml_type_id(options.output_tensor_type)
    if options.token_embedding_type:
        params.token_embedding_type = ggml_type_id(options.token_embedding_type)
    keep_alive: list[object] = []
    kvs = [_kv_override(k, v) for k, v in options.metadata]
    if imatrix is not None:
        floats = {n: (ctypes.c_float * v.size).from_buffer_copy(v.tobytes())
                  for n, v in imatrix.entries.items()}
        keep_alive.append(floats)
        items = [llama_cpp.llama_model_imatrix_data(n.encode(), f, len(f))
                 for n, f in floats.items()]
        params.imatrix = _terminated(llama_cpp.llama_model_imatrix_data, items)
        kvs.append(_kv_override(KV_IMATRIX_FILE, Path(options.imatrix).name))
        if imatrix.datasets:
            kvs.append(_kv_override(KV_IMATRIX_DATASET, imatrix.datasets[0]))
        kvs.append(_kv_override(KV_IMATRIX_ENTRIES, len(imatrix.entries)))
        if imatrix.chunk_count > 0:
            kvs.append(_kv_override(KV_IMATRIX_CHUNKS, imatrix.chunk_count))
        keep_alive.append(params.imatrix)
    if kvs:
        params.kv_overrides = _terminated(llama_cpp.llama_model_kv_override, kvs)
        keep_alive.append(params.kv_overrides)
    if options.overrides:
        items = [llama_cpp.llama_model_tensor_override(pattern.encode(), ggml_type_id(t))
                 for pattern, t in options.overrides]
        params.tt_overrides = _terminated(llama_cpp.llama_model_tensor_override, items)
        keep_alive.append(params.tt_overrides)
    return params, keep_alive


#: A line per tensor of a 7B model is a few kilobytes; 64 MiB is no such file.
TENSOR_TYPE_FILE_LIMIT = 64 << 20


def read_tensor_type_file(path: Path) -> tuple[tuple[str, str], ...]:
    """``llama-quantize --tensor-type-file``: whitespace-separated ``PATTERN=TYPE`` words,
    read as llama-quantize reads them (patterns lower-cased), each checked before any work."""
    path = Path(path)
    try:
        words = read_text(path, TENSOR_TYPE_FILE_LIMIT).split()
    except UnreadableInput as e:
        raise TensorTypeFileError(f"cannot read tensor type file {e.describe(path)}",
                                  "give a text file of PATTERN=TYPE lines") from None
    if not words:
        raise TensorTypeFileError(f"tensor type file {path} is empty",
                                  "give a text file of PATTERN=TYPE lines")
    pairs = []
    for word in words:
        pattern, sep, type_name = word.rpartition("=")
        if not sep or not pattern or not type_name:
            raise TensorTypeFileError(f"{path}: expected PATTERN=TYPE, got {word[:60]!r}",
                                      "one PATTERN=TYPE per line, e.g. attn_v=Q8_0")
        try:
            ggml_type_id(type_name)
            re.compile(pattern)
        except UnknownQuantError as e:
            raise TensorTypeFileError(f"{path}: {e.message}", e.hint) from None
        except re.error as e:
            raise TensorTypeFileError(f"{path}: {pattern[:60]!r} is not a regular expression "
                                      f"({e})", "fix the PATTERN") from None
        pairs.append((pattern.lower(), type_name))
    return tuple(pairs)


def verify_quantized(path: Path, quant: QuantType, n_tensors: int) -> GGUFSummary:
    """Reopen a fresh output: right file type, every tensor present, and llama.cpp loads it.

    llama.cpp loads it without its weights (``no_alloc``, no mmap): the architecture, the
    hyper-parameters, every tensor's presence and shape and the file's bounds are checked as
    in a full load, but no weight page is read, so verifying a 7 GB file costs megabytes of
    memory instead of the file's size (a full load maps and faults in all of it).
    """
    import llama_cpp

    out = read_gguf_summary(path)
    if out.file_type != quant.ftype:
        raise QuantizeError(f"llama.cpp wrote file type {out.file_type_name}, "
                            f"expected {quant.name}", "this is a bug; please report it")
    if len(out.tensors) != n_tensors:
        raise QuantizeError(f"quantized file has {len(out.tensors)} tensors, expected "
                            f"{n_tensors}", "this is a bug; please report it")
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    mparams.no_alloc = True
    mparams.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE  # no_alloc maps nothing
    mparams.lazy_mode = llama_cpp.LLAMA_LAZY_MODE_OFF
    with capture_llama_log(lambda _level, _line: None):
        handle = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not handle:
        raise QuantizeError(f"llama.cpp cannot load the quantized file {path.name}",
                            "this is a bug; please report it")
    llama_cpp.llama_model_free(handle)
    return out
