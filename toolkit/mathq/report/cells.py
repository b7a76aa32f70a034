"""The table's columns and how each cell reads, shared by the text, Markdown and HTML pages.

One definition of every column (header, explanation, text of a cell) keeps the terminal
table, report.md and report.html saying the same thing. A measurement that is missing reads
as :data:`MISSING`, never as zero. A variant quantized with an importance matrix carries
:data:`IMATRIX_MARK` after its name and a tuned one :data:`TUNED_MARK`, explained by
:func:`kind_note`; :func:`imatrix_lines` compares an ``-imat`` variant with its plain
sibling. :func:`status` says where a row stands in the recommendation (the pick of its size
class, on the frontier, dominated, losing accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mathq.evaluate.summaries import MeanSd, Rate
from mathq.fsutil import format_bytes
from mathq.report.table import (
    FULL_PRECISION,
    ImatrixComparison,
    ReportData,
    VariantRow,
    qualifies,
    size_class,
)

MISSING = "—"
IMATRIX_MARK = "†"
TUNED_MARK = "‡"
PICK_MARK = "★"
REFERENCE = "reference"


@dataclass(frozen=True)
class Column:
    """A table column: its header, what it means, and the text of a row's cell.

    ``terminal`` columns are the ones the build's closing table prints (the pages show all).
    """

    key: str
    header: str
    note: str
    cell: Callable[[VariantRow, ReportData], str]
    numeric: bool = True
    terminal: bool = True


def signed(value: float, decimals: int = 1) -> str:
    """``+0.5`` / ``−0.5`` with a real minus sign."""
    return f"{value:+.{decimals}f}".replace("-", "−")


def _num(value: float | None, fmt: str) -> str:
    return MISSING if value is None else format(value, fmt)


def rate_text(a: Rate | None) -> str:
    """``93.5 [89.2, 96.2]``: a percentage with its Wilson interval."""
    if a is None:
        return MISSING
    return f"{100 * a.value:.1f} [{100 * a.low:.1f}, {100 * a.high:.1f}]"


P_FLOOR = 0.001  # smaller p-values read "< 0.001"


def format_p(p: float) -> str:
    """A p-value to two significant digits, ``< 0.001`` below that."""
    if p < P_FLOOR:
        return f"< {P_FLOOR:g}"
    return f"{p:.2f}" if p >= 0.01 else f"{p:.3f}"


def _paired(row: VariantRow, data: ReportData) -> str:
    if row.quant == data.accuracy_reference and row.accuracy is not None:
        return REFERENCE
    p = row.paired
    if p is None:
        return MISSING
    return f"{signed(100 * p.difference)} [{signed(100 * p.low)}, {signed(100 * p.high)}]"


def _p_value(row: VariantRow, data: ReportData) -> str:
    if row.quant == data.accuracy_reference and row.accuracy is not None:
        return REFERENCE
    return MISSING if row.paired is None else format_p(row.paired.p_value)


def kld_decimals(mean: float) -> int:
    """Three significant digits, at least four decimals."""
    return max(4, 2 - math.floor(math.log10(abs(mean)))) if mean else 4


def kld_text(row: VariantRow) -> str:
    """``0.0571 ± 0.0042``: the mean KLD with its standard error, to the same decimals."""
    if row.mean_kld is None:
        return MISSING
    decimals = kld_decimals(row.mean_kld)
    err = f" ± {row.mean_kld_err:.{decimals}f}" if row.mean_kld_err else ""
    return f"{row.mean_kld:.{decimals}f}{err}"


def smoke_run_text(row: VariantRow, _data: ReportData | None = None) -> str:
    """``61 s · 5.5 tok/step · 98 % kept``: the smoke run's time and, where it drafted,
    what drafting did."""
    if row.smoke_seconds is None:
        return MISSING
    parts = [f"{row.smoke_seconds:.0f} s"]
    if row.tokens_per_step is not None:
        parts.append(f"{row.tokens_per_step:.1f} tok/step")
    if row.drafts_kept is not None:
        parts.append(f"{100 * row.drafts_kept:.0f} % kept")
    return " · ".join(parts)


def _kld(row: VariantRow, data: ReportData) -> str:
    if row.is_kld_reference:
        return REFERENCE
    return kld_text(row) + kld_from(row, data)


def kld_from(row: VariantRow, data: ReportData) -> str:
    """`` (from Q8_0)`` when a row's KLD was measured from another model than the table's
    reference (the column header names that one), else nothing."""
    shown = data.kld_reference or FULL_PRECISION
    return f" (from {row.kld_vs})" if row.kld_vs and row.kld_vs != shown else ""


def quant_text(row: VariantRow) -> str:
    """The variant's name with its kind's mark."""
    mark = {"imatrix": IMATRIX_MARK, "tuned": TUNED_MARK,
            "imatrix-tuned": IMATRIX_MARK + TUNED_MARK}.get(row.kind, "")
    if not mark and row.made_with_imatrix:
        mark = IMATRIX_MARK
    return f"{row.quant} {mark}" if mark else row.quant


def _same_top(row: VariantRow, _data: ReportData) -> str:
    if row.is_kld_reference:
        return REFERENCE
    return MISSING if row.same_top is None else f"{100 * row.same_top.value:.2f}"


def speed_text(value: MeanSd | None) -> str:
    """``3107.4 ± 20.3`` tokens per second."""
    if value is None:
        return MISSING
    return f"{value.mean:.1f} ± {value.sd:.1f}" if value.n > 1 else f"{value.mean:.1f}"


def bytes_text(value: int | None) -> str:
    """Bytes in the largest sensible unit, or missing."""
    return MISSING if value is None else format_bytes(value)


def _tags(row: VariantRow, _data: ReportData) -> str:
    return ", ".join(row.ollama_tags) if row.ollama_tags else MISSING


def status(row: VariantRow, data: ReportData) -> str:
    """Where ``row`` stands in the advice: reference, pick, frontier, dominated, ..."""
    advice = data.advice
    if row.quant == data.accuracy_reference or (row.is_kld_reference and row.accuracy is None):
        return REFERENCE
    if advice is None or size_class(row.quant) is None:
        return MISSING
    pick = next((p for p in advice.picks if p.quant == row.quant), None)
    if pick is not None:
        return f"{PICK_MARK} {pick.label} pick"
    if row.quant in advice.frontier:
        return "frontier"
    if qualifies(row):
        return "dominated"
    if row.paired is not None and row.paired.significant_loss:
        return "loses accuracy"
    if row.paired is None and row.accuracy is not None and data.accuracy_reference is None:
        return "no baseline"
    return "not measured"


def columns(data: ReportData) -> tuple[Column, ...]:
    """The report's columns, with headers that name this report's references."""
    ref = data.accuracy_reference or "BF16"
    cols = [
        Column("quant", "Quant", f"llama.cpp quantization type; {IMATRIX_MARK}: made with an "
               f"importance matrix, {TUNED_MARK}: tuned", lambda r, _d: quant_text(r), False),
        Column("status", "Advice", f"{PICK_MARK}: the recommended file of its size class; "
               "frontier: no other qualifying file is both smaller and closer to BF16; "
               "dominated: one is; loses accuracy: a significant paired loss", status, False),
        Column("size", data.size_unit[0], "GGUF file size",
               lambda r, d: _num(d.size_in_unit(r), ".2f")),
        Column("bpw", "Bits/weight", "file bits over parameters, metadata included",
               lambda r, _d: _num(r.bits_per_weight, ".2f")),
        Column("accuracy", "MATH % [95 % CI]",
               "smoke-test accuracy with its Wilson interval",
               lambda r, _d: rate_text(r.accuracy)),
        Column("vs_reference", f"Δ vs {ref} (pp) [95 % CI]",
               f"accuracy minus {ref}'s on the same problems, percentage points, with "
               "Newcombe's paired interval", _paired),
        Column("p_value", "p", f"McNemar's exact test of the paired difference from {ref}",
               _p_value),
    ]
    if data.paper_accuracy is not None:
        cols.append(Column("vs_paper", "Δ vs paper (pp)",
                           f"against the published figure ({data.paper_accuracy:g} %; full "
                           "MATH test set)",
                           lambda r, _d: MISSING if r.delta_vs_paper_pp is None
                           else signed(r.delta_vs_paper_pp), terminal=False))
    cols += [
        Column("kld", "Mean KLD",
               f"KL divergence from {data.kld_reference or 'the reference'}, nats per token, "
               "± standard error", _kld),
        Column("same_top", "Same top %",
               "positions where the most likely next token is unchanged", _same_top,
               terminal=False),
        Column("prompt_tps", "Prompt tok/s", "prompt processing (pp512), mean ± sd",
               lambda r, _d: speed_text(r.prompt_tps), terminal=False),
        Column("generation_tps", "Gen tok/s", "generation (tg128), mean ± sd",
               lambda r, _d: speed_text(r.generation_tps)),
        Column("smoke_run", "Smoke run", "the smoke test's wall time; where drafted, "
               "completion tokens per decode step and the share of drafts reached that were kept",
               smoke_run_text),
        Column("memory", "Memory", "llama.cpp's model, KV-cache and compute buffers for a "
               "one-sequence context (see Memory)",
               lambda r, _d: bytes_text(r.llama_total_bytes)),
        Column("ollama", "Ollama tags", "tags published for this variant", _tags, False,
               terminal=False),
    ]
    return tuple(cols)


def kind_note(data: ReportData) -> str | None:
    """What the kind marks mean and which matrix (and calibration text) the marked rows used."""
    notes = []
    if any(r.made_with_imatrix for r in data.rows):
        used = sorted({(r.imatrix, r.imatrix_dataset or "") for r in data.rows if r.imatrix})
        files = "; ".join(Path(m).name + (f", calibrated on {d}" if d else "") for m, d in used)
        notes.append(f"{IMATRIX_MARK} quantized with an importance matrix"
                     + (f" ({files})" if files else "") + ": llama.cpp spends the type's "
                     "bits where the calibration text's activations are large.")
    if any(r.kind.endswith("tuned") for r in data.rows):
        notes.append(f"{TUNED_MARK} a tuned variant of its type (<QUANT>-tuned).")
    return " ".join(notes) or None


def _signed_pct(value: float | None) -> str:
    return "" if value is None else f" ({value:+.0f} %)".replace("-", "−")


def _pair(before: float | None, after: float | None, fmt: Callable[[float], str]) -> str:
    return " → ".join(MISSING if x is None else fmt(x) for x in (before, after))


def comparison_line(c: ImatrixComparison) -> str:
    """``Q4_K_M-imat vs Q4_K_M: mean KLD 0.0680 → 0.0605 (−11 %); ...``."""
    klds = [x for x in c.mean_kld if x is not None]
    decimals = kld_decimals(min(klds)) if klds else 4
    parts = [f"mean KLD {_pair(*c.mean_kld, lambda x: f'{x:.{decimals}f}')}"
             f"{_signed_pct(c.kld_change_pct)}",
             f"same top {_pair(*c.same_top, lambda x: f'{100 * x:.2f} %')}",
             f"MATH {_pair(*c.accuracy, lambda x: f'{100 * x:.1f} %')}"
             + ("" if c.accuracy_change_pp is None
                else f" ({signed(c.accuracy_change_pp)} pp)")]
    return f"{c.variant} vs {c.plain}: " + "; ".join(parts)


def imatrix_lines(data: ReportData) -> list[str]:
    """One comparison line per variant made with a matrix whose plain sibling is there."""
    return [comparison_line(c) for c in data.imatrix_comparisons]


def memory_rows(data: ReportData) -> list[list[str]]:
    """The memory table: per variant llama.cpp's buffers and the peak RSS over baseline."""
    out = []
    for r in data.rows:
        b = r.llama_buffers
        out.append([quant_text(r), bytes_text(b.get("model")), bytes_text(b.get("kv_cache")),
                    bytes_text(b.get("compute")), bytes_text(r.llama_total_bytes),
                    bytes_text(r.rss_over_baseline_bytes)])
    return out


def memory_header(data: ReportData) -> list[str]:
    """Headers of :func:`memory_rows`."""
    ctx = {r.buffers_context for r in data.rows if r.buffers_context}
    kv = f"KV cache ({ctx.pop()} tokens)" if len(ctx) == 1 else "KV cache"
    return ["Quant", "Model buffer", kv, "Compute buffer", "llama.cpp total",
            "Peak RSS over baseline"]


def breakdown_rows(data: ReportData, by: str) -> tuple[list[str], list[list[str]]]:
    """Accuracy by subject (``by="subject"``) or level: header and one row per group,
    each variant's ``k/n (pct)``."""
    groups = data.subjects if by == "subject" else data.levels
    measured = [r for r in data.rows if r.accuracy is not None]
    header = ["Subject" if by == "subject" else "Level", *(quant_text(r) for r in measured)]
    rows = []
    for g in groups:
        cells = [g]
        for r in measured:
            rate = (r.by_subject if by == "subject" else r.by_level).get(g)
            cells.append(MISSING if rate is None or rate.n == 0
                         else f"{rate.k}/{rate.n} ({100 * rate.value:.1f} %)")
        rows.append(cells)
    return header, rows


def file_rows(data: ReportData) -> list[list[str]]:
    """Each built file: name, exact size in bytes and SHA-256."""
    return [[r.gguf or data.gguf_name(r.quant),
             MISSING if r.size_bytes is None else str(r.size_bytes),
             r.sha256 or MISSING] for r in data.rows if r.gguf]
