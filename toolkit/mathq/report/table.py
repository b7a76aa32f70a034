"""The report's table model: one row per variant, gathered from the stage summaries.

Rows come from the recipe's variants plus every variant the build folder has a GGUF or a
summary for, ordered from largest to smallest. Every figure is read from one place: sizes
and bits per weight from the GGUF itself (:mod:`mathq.convert.gguf_info`), or from the bench
summary when the GGUF is gone; accuracy from the smoke summary; KL divergence from the kld
summary; speed and memory from the bench summary; tags from the recipe. A measurement that
does not exist is ``None`` here and is shown as missing, never as zero.

A variant quantized with an importance matrix (``Q4_K_M-imat``, or any GGUF whose header
names a matrix) carries the matrix's name in ``imatrix``; when its plain sibling is in the
table too, an :class:`ImatrixComparison` puts the two side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mathq.convert.gguf_info import read_gguf_header
from mathq.errors import GGUFError
from mathq.evaluate.summaries import (
    BenchSummary,
    KldSummary,
    MeanSd,
    Rate,
    SmokeSummary,
    load_summary,
)
from mathq.fsutil import sha256_file
from mathq.layout import BuildLayout
from mathq.manifest import file_identity
from mathq.recipes.quants import QUANT_TYPES, get_quant, parse_variant, variant_names
from mathq.recipes.recipe import Recipe

# The full-precision variant accuracy changes are measured against, when it was smoke-tested.
FULL_PRECISION = "BF16"


@dataclass(frozen=True)
class VariantRow:
    """Everything the report says about one variant; None means not measured."""

    quant: str
    gguf: str | None
    size_bytes: int | None
    bits_per_weight: float | None
    nominal_bpw: float
    accuracy: Rate | None
    delta_vs_reference_pp: float | None
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

    @property
    def made_with_imatrix(self) -> bool:
        """Quantized with an importance matrix: one is recorded, or the name says so."""
        return self.imatrix is not None or parse_variant(self.quant).imatrix


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

    @property
    def size_unit(self) -> tuple[str, int]:
        """GiB, or MiB when every file is under 1 GiB (a tiny model's sizes would all
        read 0.00 GiB): the unit's name and its bytes."""
        sizes = [r.size_bytes for r in self.rows if r.size_bytes is not None]
        return ("GiB", 2**30) if not sizes or max(sizes) >= 2**30 else ("MiB", 2**20)

    def size_in_unit(self, row: VariantRow) -> float | None:
        """``row``'s file size in :attr:`size_unit`."""
        return row.size_bytes / self.size_unit[1] if row.size_bytes is not None else None


def _load(path: Path, kind: type) -> object | None:
    return load_summary(path, kind) if path.is_file() else None


def _present_quants(layout: BuildLayout, recipe: Recipe) -> list[str]:
    names = {parse_variant(q).name for q in recipe.quants.variants}
    for q in QUANT_TYPES:
        for name in variant_names(q):
            paths = (layout.gguf(name), layout.smoke_summary(name),
                     layout.bench_summary(name), layout.kld_summary(name))
            if any(p.is_file() for p in paths):
                names.add(name)
    return sorted(names)


def _pp(a: float, b: float) -> float:
    return round(100 * (a - b), 6)


def report_inputs(recipe: Recipe, layout: BuildLayout) -> dict[str, object]:
    """Identities of every file :func:`collect` reads, so a report can tell it is stale."""
    inputs: dict[str, object] = {"recipe_sha256": sha256_file(recipe.path)}
    for q in _present_quants(layout, recipe):
        for path in (layout.gguf(q), layout.smoke_summary(q), layout.bench_summary(q),
                     layout.kld_summary(q)):
            if path.is_file():
                identity = file_identity(path)
                inputs[layout.key(path)] = [identity["size"], identity["mtime_ns"]]
    return inputs


def collect(recipe: Recipe, layout: BuildLayout) -> ReportData:
    """Read every summary and GGUF of the build folder into the table model."""
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
    ref_acc = smoke[ref_quant].accuracy if ref_quant else None
    paper = recipe.smoke.reference_accuracy
    tags: dict[str, list[str]] = {}
    for tag, quant in recipe.ollama.tags:
        tags.setdefault(get_quant(quant).name, []).append(f"{recipe.ollama.model}:{tag}")

    rows = []
    for q in quants:
        s, b, k = smoke[q], bench[q], kld[q]
        size, bpw, gguf, header_imatrix = _size(layout, q, b)
        acc = s.accuracy if s and s.accuracy.n > 0 else None
        rows.append(VariantRow(
            quant=q, gguf=gguf, size_bytes=size, bits_per_weight=bpw,
            nominal_bpw=parse_variant(q).quant.bpw, accuracy=acc,
            delta_vs_reference_pp=(_pp(acc.value, ref_acc.value)
                                   if acc and ref_acc and q != ref_quant else None),
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
            imatrix_dataset=header_imatrix[1]))
    rows = _ordered(rows)

    smokes = [s for s in smoke.values() if s is not None]
    klds = [k for k in kld.values() if k is not None]
    benches = [b for b in bench.values() if b is not None]
    return ReportData(
        model=recipe.name, recipe=str(recipe.path), rows=tuple(rows),
        accuracy_reference=ref_quant, paper_accuracy=paper,
        paper_source=recipe.smoke.reference_source,
        smoke_suite=_single(s.suite for s in smokes),
        smoke_n=_single(s.accuracy.n for s in smokes),
        kld_reference=kld_reference, kld_corpus=_single(k.corpus for k in klds),
        kld_positions=_single(k.n_tokens for k in klds),
        bench_threads=_single(b.threads for b in benches), sources=sources,
        imatrix_comparisons=_comparisons(rows))


def _ordered(rows: list[VariantRow]) -> list[VariantRow]:
    """Largest first; a type's variant with a matrix right after its plain one (its file is
    the plain one plus a few metadata bytes, which must not put it first)."""
    by_name = {r.quant: r for r in rows}

    def key(r: VariantRow) -> tuple[float, str, bool]:
        v = parse_variant(r.quant)
        lead = by_name.get(v.quant.name, r)
        return (-(lead.bits_per_weight or lead.nominal_bpw), v.quant.name, v.imatrix)

    return sorted(rows, key=key)


def _has_figures(row: VariantRow) -> bool:
    return any(x is not None for x in (row.gguf, row.mean_kld, row.accuracy, row.same_top))


def _comparisons(rows: list[VariantRow]) -> tuple[ImatrixComparison, ...]:
    """Each ``<QUANT>-imat`` row whose plain sibling is built or measured, beside it."""
    by_name = {r.quant: r for r in rows}
    pairs = []
    for row in rows:
        v = parse_variant(row.quant)
        plain = by_name.get(v.quant.name)
        if not v.imatrix or plain is None or not _has_figures(plain):
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
