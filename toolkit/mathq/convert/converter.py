"""Hugging Face LLaMA checkpoint -> GGUF, streaming, lossless for bf16, verified.

``convert_checkpoint`` validates everything it can before writing (config, tokenizer,
every shard header, every tensor name and shape), plans the GGUF index, writes metadata as
llama.cpp's ``convert_hf_to_gguf.py`` does, then streams tensors in file order: a tensor
whose bytes do not change is copied by the kernel, q/k projections are row-permuted on
their raw 16-bit words, and type changes (only when ``outtype`` differs from the source)
go through gguf-py's own rounding. The file is written under ``<out>.partial``, verified
(:mod:`mathq.convert.verify`; the header checks overlap the tensor copy) and only then
renamed to ``out``.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np

from mathq.convert.checkpoint import Checkpoint, open_checkpoint
from mathq.convert.hfconfig import LlamaHParams, load_hparams
from mathq.convert.safetensors_reader import SOURCE_TYPES, SafetensorsFile, TensorEntry
from mathq.convert.tensor_map import MappedTensor, Transform, match_tensors, permute_rows
from mathq.convert.verify import VerifyResult, check_tensor_bytes, start_header_checks
from mathq.convert.vocab import GGUFVocab, add_vocab, build_vocab
from mathq.convert.writer import StreamingGGUFWriter
from mathq.errors import CheckpointError
from mathq.fsutil import atomic_output, ensure_free_space
from mathq.progress import Progress, ProgressCallback, no_progress

# gguf-py logs warnings (e.g. about a tokenizer's pair template) through `logging`; with no
# handler configured Python would print them. mathq's library never prints.
logging.getLogger("gguf").addHandler(logging.NullHandler())

GGMLType = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class OutType:
    """One ``--outtype``: GGUF file type, tensor type of 2-D weights, file-name label."""

    name: str
    file_type: gguf.LlamaFileType
    ggml_type: GGMLType
    label: str


OUTTYPES: dict[str, OutType] = {
    t.name: t
    for t in (
        OutType("bf16", gguf.LlamaFileType.MOSTLY_BF16, GGMLType.BF16, "BF16"),
        OutType("f16", gguf.LlamaFileType.MOSTLY_F16, GGMLType.F16, "F16"),
        OutType("f32", gguf.LlamaFileType.ALL_F32, GGMLType.F32, "F32"),
    )
}

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert. ``pre_tokenizer`` None means: recognise it from tokenizer.json."""

    outtype: str = "bf16"
    pre_tokenizer: str | None = None
    pre_tokenizer_source: str = "option"
    model_name: str | None = None
    verify: bool = True


@dataclass(frozen=True)
class ConvertResult:
    """What was written and how it was checked."""

    path: Path
    outtype: str
    file_type: int
    file_size: int
    n_tensors: int
    tensor_bytes: int
    copied_tensors: int
    transformed_tensors: int
    n_vocab: int
    n_real_tokens: int
    pre_tokenizer: str
    pre_tokenizer_source: str
    shards: tuple[str, ...]
    verification: VerifyResult | None
    seconds: float


@dataclass(frozen=True)
class _Job:
    entry: TensorEntry
    mapped: MappedTensor
    out_type: GGMLType
    nbytes: int

    @property
    def byte_copy(self) -> bool:
        return (
            self.mapped.transform is Transform.COPY
            and SOURCE_TYPES[self.entry.dtype] == self.out_type
        )


def _plan_jobs(ckpt: Checkpoint, hp: LlamaHParams, outtype: OutType) -> list[_Job]:
    found = {name: e.shape for name, e in ckpt.tensors.items()}
    mapped = {m.hf_name: m for m in match_tensors(hp, found, str(ckpt.hf_dir))}
    jobs = []
    # File order: each shard is read front to back, once.
    for entry in sorted(ckpt.tensors.values(), key=lambda e: (str(e.path), e.begin)):
        m = mapped.get(entry.name)
        if m is None:
            continue
        if entry.dtype not in SOURCE_TYPES:
            raise CheckpointError(
                f"tensor {entry.name} in {entry.path.name} is {entry.dtype}; "
                "mathq converts BF16, F16 and F32 checkpoints",
                "use llama.cpp's convert_hf_to_gguf.py for quantized ones",
            )
        # llama.cpp keeps 1-D tensors (the norms) in F32 whatever the file type.
        out_type = GGMLType.F32 if len(m.shape) == 1 else outtype.ggml_type
        itemsize = {GGMLType.F32: 4, GGMLType.F16: 2, GGMLType.BF16: 2}[out_type]
        jobs.append(_Job(entry, m, out_type, int(np.prod(m.shape)) * itemsize))
    return jobs


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw BF16, F16 or F32 values widened to float32 (BF16 exactly: its bits are the top
    half of an F32's); the converter's type changes and the tuner's costs start here."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def _tensor_data(raw: np.ndarray, job: _Job) -> np.ndarray:
    """The bytes of one transformed tensor: permute rows, then change type if asked."""
    if job.mapped.transform is not Transform.COPY:
        raw = permute_rows(raw, job.mapped.n_head)
    if SOURCE_TYPES[job.entry.dtype] == job.out_type:
        return raw
    # Widen to F32, then round as gguf-py (and so llama.cpp's converter) does.
    return gguf.quants.quantize(to_f32(raw, job.entry.dtype), job.out_type)


def _add_metadata(
    w: StreamingGGUFWriter,
    hp: LlamaHParams,
    hf_dir: Path,
    outtype: OutType,
    vocab: GGUFVocab,
    model_name: str | None,
) -> None:
    """KV pairs in the order and form ``convert_hf_to_gguf.py`` writes for LlamaModel."""
    g = w.gguf
    total, shared, expert, n_expert = g.get_total_parameter_count()
    meta = gguf.Metadata.load(None, hf_dir, model_name, total)
    if meta.name is None:
        meta.name = hf_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    g.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(g)
    g.add_block_count(hp.n_layer)
    g.add_context_length(hp.n_ctx)
    g.add_embedding_length(hp.n_embd)
    g.add_feed_forward_length(hp.n_ff)
    g.add_head_count(hp.n_head)
    g.add_head_count_kv(hp.n_head_kv)
    g.add_rope_freq_base(hp.rope_theta)
    g.add_layer_norm_rms_eps(hp.rms_norm_eps)
    g.add_key_length(hp.head_dim)
    g.add_value_length(hp.head_dim)
    g.add_file_type(outtype.file_type)
    g.add_vocab_size(hp.n_vocab)
    g.add_rope_dimension_count(hp.head_dim)
    g.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(g, vocab)


@dataclass(frozen=True)
class _Plan:
    """Everything a conversion decides before writing: tensors, their types, the vocab."""

    hf_dir: Path
    options: ConvertOptions
    outtype: OutType
    hp: LlamaHParams
    ckpt: Checkpoint
    jobs: list[_Job]
    vocab: GGUFVocab

    def writer(self, path: Path) -> StreamingGGUFWriter:
        """A writer for ``path`` with every tensor planned and the metadata added."""
        writer = StreamingGGUFWriter(path, ARCH)
        for j in self.jobs:
            writer.plan(j.mapped.gguf_name, j.mapped.shape, j.out_type, j.nbytes)
        _add_metadata(writer, self.hp, self.hf_dir, self.outtype, self.vocab,
                      self.options.model_name)
        return writer


def _plan(hf_dir: Path, options: ConvertOptions) -> _Plan:
    if options.outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {options.outtype!r}")
    outtype = OUTTYPES[options.outtype]
    hp = load_hparams(hf_dir)
    ckpt = open_checkpoint(hf_dir)
    jobs = _plan_jobs(ckpt, hp, outtype)  # config.json against its weights, before the vocab
    vocab = build_vocab(hf_dir, hp.n_vocab, options.pre_tokenizer, options.pre_tokenizer_source)
    return _Plan(hf_dir, options, outtype, hp, ckpt, jobs, vocab)


def write_skeleton(hf_dir: Path, out: Path, options: ConvertOptions = ConvertOptions()) -> int:
    """The GGUF that converting ``hf_dir`` would write, header and tensor index exact, its
    data section a hole (a sparse file: a few MB of disk for a 14 GB file); its size.

    llama.cpp reads only the header and index to plan a quantization, so its dry run on the
    skeleton gives every variant's exact size before the BF16 file exists: a build checks
    its disk with llama.cpp's own arithmetic, not an estimate of the mixes.
    """
    writer = _plan(Path(hf_dir), options).writer(Path(out))
    try:
        writer.begin()  # header, index, and the file truncated to its final size
    finally:
        writer.close()
    return Path(out).stat().st_size


def convert_checkpoint(
    hf_dir: Path,
    out: Path,
    options: ConvertOptions = ConvertOptions(),
    progress: ProgressCallback = no_progress,
) -> ConvertResult:
    """Convert the LLaMA checkpoint in ``hf_dir`` to the GGUF file ``out``.

    Raises :class:`mathq.errors.CheckpointError` (bad input, before anything is written),
    :class:`mathq.errors.GGUFError` (verification failed; nothing is left behind) or
    :class:`mathq.errors.DiskSpaceError`.
    """
    started = time.monotonic()
    hf_dir, out = Path(hf_dir), Path(out)
    plan = _plan(hf_dir, options)
    jobs, total = plan.jobs, sum(j.nbytes for j in plan.jobs)
    ensure_free_space(out.parent, total + (64 << 20), f"{out.name}")

    with atomic_output(out) as tmp:
        writer = plan.writer(tmp)
        header_checks: Future[VerifyResult] | None = None
        try:
            writer.begin()
            if options.verify:  # header and index are final now; check them meanwhile
                header_checks = start_header_checks(tmp, writer.tensors, hf_dir)
            _write_tensors(writer, jobs, total, progress)
            file_size = writer.finish()
        finally:
            writer.close()
            if header_checks is not None:
                wait([header_checks])  # never leave a thread reading a file we delete
        verification = None
        if header_checks is not None:
            progress(Progress("verify", 0, 1, "checks", item="tensor index and tokenizer"))
            header = header_checks.result()
            spot = check_tensor_bytes(tmp, writer.tensors, writer.data_start, plan.ckpt)
            verification = replace(header, bytes_spot_checked=spot)
            progress(Progress("verify", 1, 1, "checks"))
    return ConvertResult(
        path=out,
        outtype=plan.outtype.name,
        file_type=int(plan.outtype.file_type),
        file_size=file_size,
        n_tensors=len(jobs),
        tensor_bytes=total,
        copied_tensors=sum(j.byte_copy for j in jobs),
        transformed_tensors=sum(not j.byte_copy for j in jobs),
        n_vocab=plan.hp.n_vocab,
        n_real_tokens=plan.vocab.n_real,
        pre_tokenizer=plan.vocab.pre,
        pre_tokenizer_source=plan.vocab.pre_source,
        shards=tuple(p.name for p in plan.ckpt.shards),
        verification=verification,
        seconds=time.monotonic() - started,
    )


def _write_tensors(
    writer: StreamingGGUFWriter, jobs: list[_Job], total: int, progress: ProgressCallback
) -> None:
    done = 0
    files: dict[Path, SafetensorsFile] = {}
    try:
        for i, job in enumerate(jobs, 1):
            path = job.entry.path
            if path not in files:
                for f in files.values():  # one shard open at a time
                    f.close()
                files = {path: SafetensorsFile(path)}
            st = files[path]
            name = job.mapped.gguf_name
            if job.byte_copy:
                writer.write_range(name, st.fileno(), job.entry.begin, job.entry.nbytes)
            else:
                data = _tensor_data(st.array(job.entry.name), job)
                writer.write_array(name, data)
                del data
                st.release(job.entry.name)
            done += job.nbytes
            progress(
                Progress("convert", done, total, "B", item=name, info=f"{i}/{len(jobs)} tensors")
            )
    finally:
        for f in files.values():
            f.close()
