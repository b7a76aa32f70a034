"""The kld stage: how far each variant's next-token distributions drift from the reference's.

A few hundred MATH problems cannot tell Q6_K from Q8_0; the KL divergence from the full-precision
model over a few thousand positions of math text can, in minutes. The reference (BF16, or Q8_0 when
memory is short) is run once over the corpus and its log-probabilities are cached under
``build/<model>/kld/``, keyed by the reference file (name, size, modification time), the corpus
hash and the chunking; every variant is then compared with that file chunk by chunk, so memory
stays at one chunk of logits whatever the corpus length. Statistics and file format are
llama-perplexity's (:mod:`mathq.evaluate.kld.stats`, :mod:`mathq.evaluate.kld.logprob_file`);
results go to one :class:`mathq.evaluate.summaries.KldSummary` per variant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from mathq.convert.gguf_info import read_gguf_header
from mathq.datasets.corpus import Corpus
from mathq.errors import GGUFError, InputFileError, MathqError, OutputBusyError
from mathq.evaluate.environment import measurement_environment
from mathq.evaluate.kld import DEFAULT_CTX
from mathq.evaluate.kld.evaluator import ChunkEvaluator
from mathq.evaluate.kld.logprob_file import LogprobFile, LogprobWriter, file_size
from mathq.evaluate.kld.stats import KldAccumulator, KldStats, compress_log_probs
from mathq.evaluate.summaries import KldSummary, wilson_rate
from mathq.fsutil import (
    atomic_outputs,
    ensure_free_space,
    exclusive_lock,
    make_dirs,
    removing_new_dirs,
)
from mathq.layout import BuildLayout
from mathq.manifest import file_identity
from mathq.progress import Progress, ProgressCallback, no_progress
from mathq.recipes.quants import making_command

CACHE_FORMAT = 1   # bump when the cache's meaning changes, so old files are not reused


@dataclass(frozen=True)
class KldOptions:
    """How to measure: the reference variant, the text, the chunk size, and where to run.

    ``max_chunks`` caps the number of ``n_ctx``-token chunks (None: the whole corpus).
    ``threads`` 0 and ``gpu_layers`` None are :mod:`mathq.llama.devices`' defaults (every
    layer on the GPU when llama.cpp can offload).
    """

    reference: str = "BF16"
    corpus: Path | None = None
    n_ctx: int = DEFAULT_CTX
    max_chunks: int | None = None
    threads: int = 0
    gpu_layers: int | None = None


@dataclass(frozen=True)
class ReferenceCache:
    """The reference's log-probabilities on disk, and whether this run computed them."""

    path: Path
    reference: str
    key: str
    n_ctx: int
    n_chunks: int
    n_vocab: int
    computed: bool
    seconds: float


@dataclass(frozen=True)
class KldRun:
    """What ``mathq kld`` did: the reference file used and one summary per variant."""

    reference: ReferenceCache
    summaries: tuple[KldSummary, ...]
    paths: tuple[Path, ...]


def reference_key(reference: Path, corpus: Corpus, options: KldOptions) -> str:
    """What the cached reference depends on, hashed: file, corpus, chunking, format."""
    material = {"format": CACHE_FORMAT, "reference": file_identity(reference),
                "corpus_sha256": corpus.sha256, "n_ctx": options.n_ctx,
                "max_chunks": options.max_chunks}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def reference_bytes_bound(corpus: Corpus, n_vocab: int, options: KldOptions) -> int:
    """The most disk the reference pass can take before its model has tokenized the text:
    a token is at least one byte of it (byte-level BPE and SentencePiece alike, plus a BOS
    and a leading space), so the text's UTF-8 bytes bound the chunks. At 7B (102,400 tokens)
    a chunk of 512 is 52 MB; the bundled corpus's 28 KB bound 55 chunks, of which DeepSeek's
    tokenizer fills about 14."""
    n_chunk = (len(corpus.text.encode("utf-8")) + 2) // options.n_ctx
    if options.max_chunks is not None:
        n_chunk = min(n_chunk, options.max_chunks)
    return file_size(options.n_ctx, n_vocab, n_chunk) if n_chunk > 0 else 0


def reference_cache_path(layout: BuildLayout, reference: str, key: str) -> Path:
    """``kld/reference-<QUANT>-<key>.logits``: llama-perplexity's --kl-divergence-base file."""
    return layout.kld_dir / f"reference-{reference}-{key}.logits"


def require_gguf(layout: BuildLayout, quant: str, why: str) -> Path:
    path = layout.gguf(quant)
    if not path.is_file():
        hint = f"run `{making_command(layout.name, quant)}`" + (
            ", or measure against Q8_0 with --reference Q8_0" if quant == "BF16" else "")
        raise InputFileError(f"{why} {path} not found", hint)
    return path


def check_headers(paths: Iterable[Path]) -> None:
    """Read every GGUF's header (a damaged or truncated file is refused in milliseconds)
    before the reference pass, which takes an hour and gigabytes at 7B."""
    for path in paths:
        read_gguf_header(Path(path))


def ensure_reference(layout: BuildLayout, corpus: Corpus, options: KldOptions,
                     progress: ProgressCallback = no_progress) -> ReferenceCache:
    """Reuse the cached reference pass if its key matches, else compute and cache it."""
    ref_path = require_gguf(layout, options.reference, "reference model")
    return ensure_reference_file(ref_path, options.reference, layout.kld_dir, corpus, options,
                                 progress)


def ensure_reference_file(ref_path: Path, reference: str, cache_dir: Path, corpus: Corpus,
                          options: KldOptions,
                          progress: ProgressCallback = no_progress) -> ReferenceCache:
    """:func:`ensure_reference` for any GGUF ``ref_path`` (called ``reference``), its pass
    cached in ``cache_dir`` as ``reference-<name>-<key>.logits``.

    The cache is shared by every run measuring into ``cache_dir``: one computes it under a
    lock while a second is refused at once (it would otherwise delete the first's files as
    stale, or read them half-written); a finished cache is read without the lock, as it
    only ever appears whole."""
    options = dataclasses.replace(options, reference=reference)
    key = reference_key(ref_path, corpus, options)
    cache = Path(cache_dir) / f"reference-{reference}-{key}.logits"
    if cache.is_file() and cache.with_suffix(".json").is_file():
        with contextlib.suppress(MathqError):  # unreadable: computed again below
            f = LogprobFile(cache)
            return ReferenceCache(cache, options.reference, key, f.n_ctx, f.n_chunk,
                                  f.n_vocab, computed=False, seconds=0.0)
    busy = OutputBusyError(f"another mathq command is computing the reference pass in "
                           f"{cache_dir}", "wait for it to finish, then run this again: it "
                           "reuses the pass")
    with removing_new_dirs(Path(cache_dir)):  # whoever asked (kld, tune), stopped early
        make_dirs(Path(cache_dir))
        with exclusive_lock(Path(cache_dir) / f"reference-{reference}.lock", busy):
            return _compute_reference(ref_path, cache, key, corpus, options, progress)


def _compute_reference(ref_path: Path, cache: Path, key: str, corpus: Corpus,
                       options: KldOptions, progress: ProgressCallback) -> ReferenceCache:
    cache_dir = cache.parent
    started = time.perf_counter()
    stage = f"reference {options.reference}"
    with ChunkEvaluator(ref_path, options.n_ctx, options.threads, options.gpu_layers) as ev:
        tokens = ev.tokenize(corpus.text)
        n_chunk = len(tokens) // options.n_ctx
        if options.max_chunks is not None:
            n_chunk = min(n_chunk, options.max_chunks)
        if n_chunk < 1:
            raise MathqError(f"the corpus ({corpus.name}) has {len(tokens)} tokens, fewer than "
                             f"one chunk of {options.n_ctx}",
                             f"lower --ctx-size or give a longer {corpus.option}")
        tokens = tokens[:n_chunk * options.n_ctx]
        ensure_free_space(Path(cache_dir), file_size(options.n_ctx, ev.n_vocab, n_chunk),
                          f"the reference log-probabilities ({options.reference})")
        for stale in Path(cache_dir).glob(f"reference-{options.reference}-*"):
            stale.unlink()
        index = cache.with_suffix(".json")
        with atomic_outputs(cache, index) as staged:  # the pair appears together or not at all
            writer = LogprobWriter(staged[cache], options.n_ctx, ev.n_vocab, tokens)
            try:
                for i in range(n_chunk):
                    progress(Progress(stage, i, n_chunk, "chunks"))
                    chunk = tokens[i * options.n_ctx:(i + 1) * options.n_ctx]
                    writer.write_chunk(compress_log_probs(ev.scored_logits(chunk)))
            finally:
                writer.close()
            seconds = time.perf_counter() - started
            staged[index].write_text(json.dumps({
                "reference": options.reference, "reference_file": file_identity(ref_path),
                "corpus": corpus.name, "corpus_sha256": corpus.sha256, "n_ctx": options.n_ctx,
                "n_chunks": n_chunk, "n_vocab": ev.n_vocab, "format": "llama-perplexity logits",
                "seconds": round(seconds, 3)}, indent=2) + "\n", encoding="utf-8")
        n_vocab = ev.n_vocab
    progress(Progress(stage, n_chunk, n_chunk, "chunks"))
    return ReferenceCache(cache, options.reference, key, options.n_ctx, n_chunk, n_vocab,
                          computed=True, seconds=seconds)


def _imatrix_of(path: Path) -> str | None:
    """The importance matrix a variant was quantized with, as llama-quantize recorded it."""
    from mathq.quantize.core import KV_IMATRIX_FILE

    value = read_gguf_header(path).values.get(KV_IMATRIX_FILE)
    return str(value) if value is not None else None


def measure_variant(layout: BuildLayout, quant: str, reference: ReferenceCache, corpus: Corpus,
                    options: KldOptions,
                    progress: ProgressCallback = no_progress) -> KldSummary:
    """Compare one variant with the cached reference over every chunk; return its summary."""
    path = require_gguf(layout, quant, f"{quant} model")
    return measure_gguf(path, quant, layout.name, reference, corpus, options, progress)


def measure_gguf(path: Path, quant: str, model: str, reference: ReferenceCache, corpus: Corpus,
                 options: KldOptions, progress: ProgressCallback = no_progress,
                 enough: Callable[[KldStats], bool] | None = None) -> KldSummary:
    """:func:`measure_variant` for any GGUF ``path``, named ``quant`` in its summary;
    ``enough`` stops it early, after the first chunk whose statistics it accepts."""
    ref = LogprobFile(reference.path)
    started = time.perf_counter()
    stage = f"kld {quant}"
    with ChunkEvaluator(path, ref.n_ctx, options.threads, options.gpu_layers) as ev:
        if ev.n_vocab != ref.n_vocab:
            raise GGUFError(f"{path.name} has a vocabulary of {ev.n_vocab} tokens, the reference "
                            f"{reference.reference} has {ref.n_vocab}",
                            "compare variants of the same model only")
        acc = KldAccumulator(ev.n_vocab)
        done = 0
        for i in range(ref.n_chunk):
            tokens = ref.chunk_tokens(i)
            next_tokens = tokens[ev.first + 1:ev.first + 1 + ev.n_scored]
            acc.add(ev.scored_logits(tokens), ref.chunk_rows(i), next_tokens)
            done = i + 1
            if enough is not None and enough(acc.result()):
                break
            if i + 1 < ref.n_chunk:
                progress(Progress(stage, i + 1, ref.n_chunk, "chunks",
                                  info=f"KLD {acc.mean_kld:.5f}"))
    stats = acc.result()
    seconds = time.perf_counter() - started
    progress(Progress(stage, done, done, "chunks", info=f"KLD {stats.mean_kld:.5f}"))
    return KldSummary(
        model=model, quant=quant, reference=reference.reference, corpus=corpus.name,
        n_tokens=stats.count, mean_kld=stats.mean_kld, mean_kld_err=stats.mean_kld_err,
        kld_percentiles=stats.kld_percentiles,
        same_top=wilson_rate(stats.same_top, stats.count),
        rms_delta_p=stats.rms_delta_p, imatrix=_imatrix_of(path),
        rms_delta_p_err=stats.rms_delta_p_err, ppl=stats.ppl, ppl_reference=stats.ppl_reference,
        n_ctx=ref.n_ctx, n_chunks=done, corpus_sha256=corpus.sha256,
        seconds=round(seconds, 3),
        environment=measurement_environment(options.threads or os.cpu_count() or 1))
