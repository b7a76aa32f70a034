"""The report's table model: one row per variant, gathered from the stage summaries.

Rows come from the recipe's variants plus every variant the build folder has a GGUF or a
summary for, ordered from largest to smallest. Every figure is read from one place: sizes
and bits per weight from the GGUF itself (:mod:`mathq.convert.gguf_info`), or from the bench
summary when the GGUF is gone; each file's SHA-256 from the build's digest cache; accuracy
from the smoke summary, and the paired difference from BF16 from both variants' per-problem
results (:mod:`mathq.report.paired`); KL divergence from the kld summary; speed and memory
from the bench summary; tags from the recipe; versions, CPU and dates from the summaries'
environments. A measurement that does not exist is ``None`` here and is shown as missing,
never as zero.

Variants are of four kinds: *stock* (llama.cpp's type as it is), *imatrix*
(``<QUANT>-imat``, quantized with an importance matrix), *tuned* (``<QUANT>-tuned``: the stock
file's size, tensor types chosen by ``mathq tune``) and *imatrix-tuned* (``<QUANT>-imat-tuned``,
tuned and quantized with the matrix), listed in that order under their type.

A variant quantized with an importance matrix (``Q4_K_M-imat``, or any GGUF whose header
names a matrix) carries the matrix's name in ``imatrix``; when its plain sibling is in the
table too, an :class:`ImatrixComparison` puts the two side by side.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mathq.convert.gguf_info import read_gguf_header
from mathq.datasets.problems import suite_title
from mathq.errors import GGUFError
from mathq.evaluate.summaries import (
    BenchSummary,
    KldSummary,
    MeanSd,
    Rate,
    SmokeSummary,
    load_summary,
)
from mathq.fsutil import cached_digest, sha256_cached, sha256_file
from mathq.layout import BuildLayout
from mathq.manifest import file_identity
from mathq.progress import ProgressCallback, no_progress
from mathq.recipes.quants import (
    BUDGET_PREFIX,
    QUANT_TYPES,
    QuantType,
    UnknownQuantError,
    parse_variant,
    variant_names,
)
from mathq.recipes.recipe import Recipe, bundled_recipes_dir
from mathq.report.paired import PairedDifference, paired_difference, read_verdicts

# The full-precision variant accuracy changes are measured against, when it was smoke-tested.
FULL_PRECISION = "BF16"
KINDS = ("stock", "imatrix", "tuned", "imatrix-tuned")


_BITS = re.compile(r"^(?:I?Q|TQ)(\d)")


def size_class(quant: str) -> int | None:
    """The bits a variant is named for (``Q4_K_M-imat`` -> 4, ``T4.85`` -> 4); None for
    F16/BF16."""
    v = parse_variant(quant)
    if v.bpw is not None:
        return int(v.bpw)
    m = _BITS.match(quant)
    return int(m.group(1)) if m else None


def variant_kind(name: str) -> str:
    """``stock``, ``imatrix`` (``-imat``), ``tuned`` (``-tuned``) or ``imatrix-tuned``
    (``-imat-tuned``)."""
    v = parse_variant(name)
    if v.tuned:
        return "imatrix-tuned" if v.imatrix else "tuned"
    return "imatrix" if v.imatrix else "stock"


def base_type(name: str) -> QuantType:
    """The llama.cpp type a variant is made of: ``Q4_K_M`` for ``Q4_K_M-imat-tuned``."""
    return parse_variant(name).quant


@dataclass(frozen=True)
class VariantRow:
    """Everything the report says about one variant; None means not measured."""

    quant: str
    gguf: str | None
    size_bytes: int | None
    bits_per_weight: float | None
    nominal_bpw: float
    accuracy: Rate | None
    paired: PairedDifference | None
    delta_vs_paper_pp: float | None
    mean_kld: float | None
    mean_kld_err: float | None
    kld_p99: float | None
    same_top: Rate | None
    rms_delta_p: float | None
    is_kld_reference: bool
    prompt_tps: MeanSd | None
    generation_tps: MeanSd | None
    peak_rss_bytes: int | None
    ollama_tags: tuple[str, ...]
    imatrix: str | None
    imatrix_dataset: str | None = None
    kind: str = "stock"
    sha256: str | None = None
    rss_over_baseline_bytes: int | None = None
    # llama.cpp's own buffer sizes (model, kv_cache, compute, output) in bytes, for a
    # context of ``buffers_context`` tokens.
    llama_buffers: dict[str, int] = field(default_factory=dict)
    buffers_context: int | None = None
    by_subject: dict[str, Rate] = field(default_factory=dict)
    by_level: dict[str, Rate] = field(default_factory=dict)
    # The same buffers at other one-sequence contexts, by context length in tokens.
    buffers_by_context: dict[int, dict[str, int]] = field(default_factory=dict)
    # The model its KL divergence was measured from (None: not recorded, taken as BF16).
    kld_vs: str | None = None
    # The smoke run's work: its wall time, completion tokens per decode step and the share
    # of drafted tokens kept (None where it ran undrafted or before mathq recorded it).
    smoke_seconds: float | None = None
    tokens_per_step: float | None = None
    drafts_kept: float | None = None

    @property
    def made_with_imatrix(self) -> bool:
        """Quantized with an importance matrix: one is recorded, or the name says so."""
        return self.imatrix is not None or self.kind == "imatrix"

    @property
    def llama_total_bytes(self) -> int | None:
        """Model, KV cache and compute buffers together, as llama.cpp allocated them."""
        return _buffers_total(self.llama_buffers)

    def memory_at(self, n_ctx: int) -> int | None:
        """llama.cpp's buffers for a one-sequence context of ``n_ctx`` tokens, as bench
        measured them (None where it did not)."""
        return _buffers_total(self.buffers_by_context.get(n_ctx, {}))


def _buffers_total(buffers: dict[str, int]) -> int | None:
    """Model, KV cache, compute and output buffers together; None when one is unknown."""
    parts = [buffers.get(k) for k in ("model", "kv_cache", "compute")]
    if any(p is None for p in parts):
        return None
    return sum(p for p in parts if p is not None) + buffers.get("output", 0)


def qualifies(row: VariantRow) -> bool:
    """Paired with BF16 without a significant loss, KLD from BF16 and size measured: a
    variant the recommendation may pick (:mod:`mathq.report.advice`). A KLD measured from
    another model (``mathq kld --reference Q8_0``) is not comparable with the others."""
    return (row.paired is not None and not row.paired.significant_loss
            and row.mean_kld is not None and row.kld_vs in (None, FULL_PRECISION)
            and row.size_bytes is not None)


@dataclass(frozen=True)
class ImatrixComparison:
    """A variant made with an importance matrix beside the same type made without one.

    Each pair is (plain, with matrix); None where that side was not measured.
    """

    variant: str
    plain: str
    mean_kld: tuple[float | None, float | None]
    same_top: tuple[float | None, float | None]
    accuracy: tuple[float | None, float | None]

    @property
    def kld_change_pct(self) -> float | None:
        """Relative change of the mean KLD in percent (negative: the matrix helped)."""
        before, after = self.mean_kld
        if before is None or after is None or before <= 0:
            return None
        return round(100 * (after - before) / before, 6)

    @property
    def accuracy_change_pp(self) -> float | None:
        """Change of MATH accuracy in percentage points."""
        before, after = self.accuracy
        return None if before is None or after is None else _pp(after, before)


@dataclass(frozen=True)
class ReportData:
    """The rows and the context a reader needs to interpret them."""

    model: str
    recipe: str
    rows: tuple[VariantRow, ...]
    accuracy_reference: str | None
    paper_accuracy: float | None
    paper_source: str
    smoke_suite: str | None
    smoke_n: int | None
    kld_reference: str | None
    kld_corpus: str | None
    kld_positions: int | None
    bench_threads: int | None
    sources: dict[str, str]
    imatrix_comparisons: tuple[ImatrixComparison, ...] = ()
    recipe_ref: str = ""
    recipe_sha256: str | None = None
    # Ollama tags of the recipe by the quant type they name, in recipe order.
    recipe_tags: dict[str, tuple[str, ...]] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    bench_settings: dict[str, int] = field(default_factory=dict)
    confidence: float = 0.95
    # What readers call the smoke problems (``MATH-500``, the recipe's ``suite_title``).
    smoke_suite_title: str | None = None
    # The recommendation these rows support (a :class:`mathq.report.advice.Advice`, set by
    # :func:`mathq.report.advice.with_advice`; typed loosely so this module need not import
    # the one that reads it).
    advice: Any = None

    @property
    def size_unit(self) -> tuple[str, int]:
        """GiB, or MiB when every file is under 1 GiB (a tiny model's sizes would all
        read 0.00 GiB): the unit's name and its bytes."""
        sizes = [r.size_bytes for r in self.rows if r.size_bytes is not None]
        return ("GiB", 2**30) if not sizes or max(sizes) >= 2**30 else ("MiB", 2**20)

    def size_in_unit(self, row: VariantRow) -> float | None:
        """``row``'s file size in :attr:`size_unit`."""
        return row.size_bytes / self.size_unit[1] if row.size_bytes is not None else None

    def gguf_name(self, quant: str) -> str:
        """The file a variant is built into."""
        return f"{self.model}-{quant}.gguf"

    @property
    def subjects(self) -> list[str]:
        """Subjects any variant was graded on, sorted."""
        return sorted({s for r in self.rows for s in r.by_subject})

    @property
    def levels(self) -> list[str]:
        """Levels any variant was graded on, in numeric order."""
        keys = {k for r in self.rows for k in r.by_level}
        return sorted(keys, key=lambda k: (len(k), k))


def _load(path: Path, kind: type) -> object | None:
    return load_summary(path, kind) if path.is_file() else None


def _present_quants(layout: BuildLayout, recipe: Recipe) -> list[str]:
    """The recipe's variants, and every variant with a file or a summary in the build
    folder: each type's stock, -imat and -tuned names, and the T<bpw> budgets' files."""
    names = {parse_variant(q).name for q in recipe.quants.variants}
    candidates = [name for q in QUANT_TYPES for name in variant_names(q)]
    for found in layout.root.glob(f"{layout.name}-{BUDGET_PREFIX}*.gguf"):
        with contextlib.suppress(UnknownQuantError):  # another file that starts with T
            candidates.append(parse_variant(
                found.name.removeprefix(f"{layout.name}-").removesuffix(".gguf")).name)
    for name in candidates:
        paths = (layout.gguf(name), layout.smoke_summary(name),
                 layout.bench_summary(name), layout.kld_summary(name))
        if any(p.is_file() for p in paths):
            names.add(name)
    return sorted(names)


def _pp(a: float, b: float) -> float:
    return round(100 * (a - b), 6)


def recipe_ref(recipe: Recipe) -> str:
    """How a command line names the recipe: its name if bundled, else its path."""
    bundled = bundled_recipes_dir().resolve()
    return recipe.name if recipe.path.resolve().parent == bundled else str(recipe.path)


def report_inputs(recipe: Recipe, layout: BuildLayout) -> dict[str, object]:
    """Identities of every file :func:`collect` reads, so a report can tell it is stale."""
    inputs: dict[str, object] = {"recipe_sha256": sha256_file(recipe.path)}
    for q in _present_quants(layout, recipe):
        for path in (layout.gguf(q), layout.smoke_summary(q), layout.smoke_results(q),
                     layout.bench_summary(q), layout.kld_summary(q)):
            if path.is_file():
                identity = file_identity(path)
                inputs[layout.key(path)] = [identity["size"], identity["mtime_ns"]]
    return inputs


def _merge_environments(envs: list[dict[str, str]]) -> dict[str, str]:
    """One value per key: the common one, a date range, or the distinct values joined."""
    keys = list(dict.fromkeys(k for e in envs for k in e))
    out = {}
    for k in keys:
        values = sorted({e[k] for e in envs if k in e})
        if k == "date" and len(values) > 1:
            out[k] = f"{values[0]} – {values[-1]}"
        else:
            out[k] = " / ".join(values)
    return out


def _suite_words(source: str, recipe: Recipe) -> str:
    """A problem file named relative to the recipe's folder's parent (the repository for
    bundled recipes), so the report does not depend on where it was run."""
    path = Path(source)
    if not path.is_absolute():
        return source
    rel = os.path.relpath(path, recipe.path.resolve().parent.parent)
    return rel if not rel.startswith("..") else str(path)


def _suite_title(name: str, recipe: Recipe) -> str:
    """The recipe's ``suite_title`` when the smoke ran on the recipe's own suite, else the
    suite's title (``MATH-500``) or the file's stem."""
    spec = recipe.smoke
    # A local file's summary names it by its stem; compare stems, not paths, so a build
    # made in another checkout (or with a copy of the recipe) still gets the title.
    same = name in (spec.suite, Path(spec.suite).stem)
    return spec.suite_title if spec.suite_title and same else suite_title(name)


def collect(recipe: Recipe, layout: BuildLayout,
            progress: ProgressCallback = no_progress, *, hash_files: bool = True
            ) -> ReportData:
    """Read every summary and GGUF of the build folder into the table model.

    Hashing a GGUF the digest cache does not know reads the whole file (``sha256``
    progress); afterwards its hash comes from the cache. Without ``hash_files`` only
    hashes the cache already holds are shown, and nothing is read or written for the
    others (a model card needs no hash of the files it does not upload).
    """
    quants = _present_quants(layout, recipe)
    smoke = {q: _load(layout.smoke_summary(q), SmokeSummary) for q in quants}
    bench = {q: _load(layout.bench_summary(q), BenchSummary) for q in quants}
    kld = {q: _load(layout.kld_summary(q), KldSummary) for q in quants}
    sources = {}
    for q in quants:
        for kind, path in (("smoke", layout.smoke_summary(q)), ("bench", layout.bench_summary(q)),
                           ("kld", layout.kld_summary(q))):
            if path.is_file():
                sources[f"{kind}/{q}"] = str(path.relative_to(layout.root))

    kld_refs = sorted({s.reference for s in kld.values() if s is not None})
    kld_reference = kld_refs[0] if len(kld_refs) == 1 else None
    ref_quant = next((q for q in (FULL_PRECISION, kld_reference)
                      if q and smoke.get(q) is not None), None)
    ref_verdicts = (read_verdicts(layout.smoke_results(ref_quant)) if ref_quant else {})
    paper = recipe.smoke.reference_accuracy
    tags: dict[str, list[str]] = {}
    raw_tags: dict[str, list[str]] = {}
    for tag, variant in recipe.ollama.tags:
        tags.setdefault(variant, []).append(f"{recipe.ollama.model}:{tag}")
        raw_tags.setdefault(variant, []).append(tag)

    rows = []
    for q in quants:
        s, b, k = smoke[q], bench[q], kld[q]
        size, bpw, gguf, header_imatrix = _size(layout, q, b)
        acc = s.accuracy if s and s.accuracy.n > 0 else None
        paired = None
        if acc is not None and ref_verdicts and q != ref_quant:
            paired = paired_difference(q, str(ref_quant),
                                       read_verdicts(layout.smoke_results(q)), ref_verdicts)
        path = layout.gguf(q)
        rows.append(VariantRow(
            quant=q, gguf=gguf, size_bytes=size, bits_per_weight=bpw,
            nominal_bpw=parse_variant(q).nominal_bpw, accuracy=acc, paired=paired,
            delta_vs_paper_pp=(round(100 * acc.value - paper, 6)
                               if acc and paper is not None else None),
            mean_kld=k.mean_kld if k else None, mean_kld_err=k.mean_kld_err if k else None,
            kld_p99=k.kld_percentiles.get("99") if k else None,
            same_top=k.same_top if k else None, rms_delta_p=k.rms_delta_p if k else None,
            is_kld_reference=q == kld_reference,
            prompt_tps=b.prompt_tokens_per_second if b else None,
            generation_tps=b.generation_tokens_per_second if b else None,
            peak_rss_bytes=b.peak_rss_bytes if b else None,
            ollama_tags=tuple(tags.get(q, ())),
            imatrix=(k.imatrix if k else None) or (b.imatrix if b else None)
            or (s.imatrix if s else None) or header_imatrix[0],
            imatrix_dataset=header_imatrix[1], kind=variant_kind(q),
            sha256=_sha256(path, layout, progress, hash_files),
            rss_over_baseline_bytes=b.rss_over_baseline_bytes if b else None,
            llama_buffers=dict(b.llama_buffers) if b else {},
            buffers_context=b.buffers_context if b else None,
            buffers_by_context=({c: dict(v) for c, v in b.buffers_by_context.items()}
                                if b else {}),
            kld_vs=k.reference if k else None,
            by_subject=dict(s.by_subject) if s else {},
            by_level=dict(s.by_level) if s else {},
            smoke_seconds=s.wall_seconds if s else None,
            tokens_per_step=s.tokens_per_step if s else None,
            drafts_kept=(s.accepted_tokens / s.drafted_tokens
                         if s and s.drafted_tokens and s.accepted_tokens is not None
                         else None)))
    rows = _ordered(rows)

    smokes = [s for s in smoke.values() if s is not None]
    klds = [k for k in kld.values() if k is not None]
    benches = [b for b in bench.values() if b is not None]
    suite_source = _single(s.suite_source for s in smokes)
    suite_name = _single(s.suite for s in smokes)
    bench_settings = {}
    for key in ("n_prompt", "n_gen", "repetitions"):
        value = _single(getattr(b, key) for b in benches)
        if value is not None:
            bench_settings[key] = value
    return ReportData(
        model=recipe.name, recipe=str(recipe.path), rows=tuple(rows),
        accuracy_reference=ref_quant, paper_accuracy=paper,
        paper_source=recipe.smoke.reference_source,
        smoke_suite=(_suite_words(suite_source, recipe) if suite_source
                     else _single(s.suite for s in smokes)),
        smoke_n=_single(s.accuracy.n for s in smokes),
        smoke_suite_title=(_suite_title(str(suite_name), recipe) if suite_name is not None
                           else None),
        kld_reference=kld_reference, kld_corpus=_single(k.corpus for k in klds),
        kld_positions=_single(k.n_tokens for k in klds),
        bench_threads=_single(b.threads for b in benches), sources=sources,
        imatrix_comparisons=_comparisons(rows), recipe_ref=recipe_ref(recipe),
        recipe_sha256=sha256_file(recipe.path),
        recipe_tags={q: tuple(v) for q, v in raw_tags.items()},
        environment=_merge_environments([x.environment for x in (*smokes, *benches, *klds)
                                         if x.environment]),
        bench_settings=bench_settings)


def _sha256(path: Path, layout: BuildLayout, progress: ProgressCallback,
            hash_files: bool) -> str | None:
    if not path.is_file():
        return None
    if hash_files:
        return sha256_cached(path, layout.digest_cache, progress)
    return cached_digest(path, layout.digest_cache)


def _ordered(rows: list[VariantRow]) -> list[VariantRow]:
    """Largest first; a type's variant with a matrix right after its plain one (its file is
    the plain one plus a few metadata bytes, which must not put it first)."""
    by_name = {r.quant: r for r in rows}

    def key(r: VariantRow) -> tuple[float, str, int]:
        base = base_type(r.quant)
        lead = by_name.get(base.name, r)
        return (-(lead.bits_per_weight or lead.nominal_bpw), base.name, KINDS.index(r.kind))

    return sorted(rows, key=key)


def _has_figures(row: VariantRow) -> bool:
    return any(x is not None for x in (row.gguf, row.mean_kld, row.accuracy, row.same_top))


def _comparisons(rows: list[VariantRow]) -> tuple[ImatrixComparison, ...]:
    """Each ``<QUANT>-imat`` row whose plain sibling is built or measured, beside it."""
    by_name = {r.quant: r for r in rows}
    pairs = []
    for row in rows:
        plain = by_name.get(base_type(row.quant).name)
        if row.kind != "imatrix" or plain is None or not _has_figures(plain):
            continue
        pairs.append(ImatrixComparison(
            variant=row.quant, plain=plain.quant,
            mean_kld=(plain.mean_kld, row.mean_kld),
            same_top=(plain.same_top.value if plain.same_top else None,
                      row.same_top.value if row.same_top else None),
            accuracy=(plain.accuracy.value if plain.accuracy else None,
                      row.accuracy.value if row.accuracy else None)))
    return tuple(pairs)


def _single(values: object) -> object | None:
    """The one value all summaries share, or None when they differ or there are none."""
    distinct = set(values)  # type: ignore[call-overload]
    return distinct.pop() if len(distinct) == 1 else None


def _size(layout: BuildLayout, quant: str, bench: BenchSummary | None
          ) -> tuple[int | None, float | None, str | None, tuple[str | None, str | None]]:
    """Size, bits per weight, file name, and (matrix, its dataset) as the GGUF records them."""
    from mathq.quantize.core import KV_IMATRIX_DATASET, KV_IMATRIX_FILE

    path = layout.gguf(quant)
    if path.is_file():
        try:
            header = read_gguf_header(path)
            info = header.summary
            matrix, dataset = (header.values.get(k) for k in (KV_IMATRIX_FILE,
                                                              KV_IMATRIX_DATASET))
            return (info.size, info.bits_per_weight, path.name,
                    (str(matrix) if matrix is not None else None,
                     str(dataset) if dataset is not None else None))
        except GGUFError:
            pass  # a damaged file: fall back to what bench measured, or show it missing
    if bench is not None:
        return bench.file_size, bench.bits_per_weight, Path(bench.gguf).name, (None, None)
    return None, None, None, (None, None)
