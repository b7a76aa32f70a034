"""The table's columns and how each cell reads, shared by the Markdown and HTML pages.

One definition of every column (header, explanation, text of a cell) keeps report.md and
report.html saying the same thing. A measurement that is missing reads as :data:`MISSING`,
never as zero. A variant quantized with an importance matrix carries :data:`IMATRIX_MARK`
after its name, explained by :func:`imatrix_note`; :func:`imatrix_lines` compares it with
its plain sibling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mathq.evaluate.summaries import MeanSd
from mathq.fsutil import format_bytes
from mathq.report.table import ImatrixComparison, ReportData, VariantRow

MISSING = "—"
IMATRIX_MARK = "†"


@dataclass(frozen=True)
class Column:
    """A table column: its header, what it means, and the text of a row's cell."""

    key: str
    header: str
    note: str
    cell: Callable[[VariantRow, ReportData], str]
    numeric: bool = True


def _num(value: float | None, fmt: str) -> str:
    return MISSING if value is None else format(value, fmt)


def _signed_pp(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:+.1f}".replace("-", "−")


def _rate(row: VariantRow, _data: ReportData) -> str:
    a = row.accuracy
    if a is None:
        return MISSING
    return f"{100 * a.value:.1f} [{100 * a.low:.1f}, {100 * a.high:.1f}]"


def _vs_ref(row: VariantRow, data: ReportData) -> str:
    if row.quant == data.accuracy_reference and row.accuracy is not None:
        return "reference"
    return _signed_pp(row.delta_vs_reference_pp)


def _kld_decimals(mean: float) -> int:
    """Three significant digits, at least four decimals."""
    return max(4, 2 - math.floor(math.log10(abs(mean)))) if mean else 4


def _kld(row: VariantRow, _data: ReportData) -> str:
    if row.is_kld_reference:
        return "reference"
    if row.mean_kld is None:
        return MISSING
    # The error to the same decimals as the mean.
    decimals = _kld_decimals(row.mean_kld)
    err = f" ± {row.mean_kld_err:.{decimals}f}" if row.mean_kld_err else ""
    return f"{row.mean_kld:.{decimals}f}{err}"


def _quant(row: VariantRow, _data: ReportData) -> str:
    return f"{row.quant} {IMATRIX_MARK}" if row.made_with_imatrix else row.quant


def _same_top(row: VariantRow, _data: ReportData) -> str:
    if row.is_kld_reference:
        return "reference"
    return MISSING if row.same_top is None else f"{100 * row.same_top.value:.2f}"


def _speed(value: MeanSd | None) -> str:
    if value is None:
        return MISSING
    return f"{value.mean:.1f} ± {value.sd:.1f}" if value.n > 1 else f"{value.mean:.1f}"


def _ram(row: VariantRow, _data: ReportData) -> str:
    return MISSING if row.peak_rss_bytes is None else format_bytes(row.peak_rss_bytes)


def _tags(row: VariantRow, _data: ReportData) -> str:
    return ", ".join(row.ollama_tags) if row.ollama_tags else MISSING


def columns(data: ReportData) -> tuple[Column, ...]:
    """The report's columns, with headers that name this report's references."""
    ref = data.accuracy_reference or "BF16"
    paper = f"{data.paper_accuracy:g} %" if data.paper_accuracy is not None else "not set"
    return (
        Column("quant", "Quant", f"llama.cpp quantization type; {IMATRIX_MARK}: made with an "
               "importance matrix", _quant, False),
        Column("size", data.size_unit[0], "GGUF file size",
               lambda r, d: _num(d.size_in_unit(r), ".2f")),
        Column("bpw", "Bits/weight", "file bits over parameters, metadata included",
               lambda r, _d: _num(r.bits_per_weight, ".2f")),
        Column("accuracy", "MATH % [95 % CI]",
               "smoke-test accuracy with its Wilson interval", _rate),
        Column("vs_reference", f"Δ vs {ref} (pp)",
               f"accuracy change against {ref}, in percentage points", _vs_ref),
        Column("vs_paper", "Δ vs paper (pp)",
               f"against the published figure ({paper}; full MATH test set)",
               lambda r, _d: _signed_pp(r.delta_vs_paper_pp)),
        Column("kld", "Mean KLD",
               f"KL divergence from {data.kld_reference or 'the reference'}, nats per token",
               _kld),
        Column("same_top", "Same top %",
               "positions where the most likely next token is unchanged", _same_top),
        Column("prompt_tps", "Prompt tok/s", "prompt processing (pp512), mean ± sd",
               lambda r, _d: _speed(r.prompt_tps)),
        Column("generation_tps", "Gen tok/s", "generation (tg128), mean ± sd",
               lambda r, _d: _speed(r.generation_tps)),
        Column("peak_ram", "Peak RAM", "peak resident memory while benchmarking", _ram),
        Column("ollama", "Ollama tags", "tags published for this variant", _tags, False),
    )


def imatrix_note(data: ReportData) -> str | None:
    """What the mark means and which matrix (and calibration text) the marked rows used."""
    if not any(r.made_with_imatrix for r in data.rows):
        return None
    used = sorted({(r.imatrix, r.imatrix_dataset or "") for r in data.rows if r.imatrix})
    files = "; ".join(Path(m).name + (f", calibrated on {d}" if d else "") for m, d in used)
    return (f"{IMATRIX_MARK} quantized with an importance matrix"
            + (f" ({files})" if files else "") + ": llama.cpp spends the type's bits where "
            "the calibration text's activations are large.")


def _signed_pct(value: float | None) -> str:
    return "" if value is None else f" ({value:+.0f} %)".replace("-", "−")


def _pair(before: float | None, after: float | None, fmt: Callable[[float], str]) -> str:
    return " → ".join(MISSING if x is None else fmt(x) for x in (before, after))


def comparison_line(c: ImatrixComparison) -> str:
    """``Q4_K_M-imat vs Q4_K_M: mean KLD 0.0680 → 0.0605 (−11 %); ...``."""
    klds = [x for x in c.mean_kld if x is not None]
    decimals = _kld_decimals(min(klds)) if klds else 4
    parts = [f"mean KLD {_pair(*c.mean_kld, lambda x: f'{x:.{decimals}f}')}"
             f"{_signed_pct(c.kld_change_pct)}",
             f"same top {_pair(*c.same_top, lambda x: f'{100 * x:.2f} %')}",
             f"MATH {_pair(*c.accuracy, lambda x: f'{100 * x:.1f} %')}"
             + ("" if c.accuracy_change_pp is None
                else f" ({_signed_pp(c.accuracy_change_pp)} pp)")]
    return f"{c.variant} vs {c.plain}: " + "; ".join(parts)


def imatrix_lines(data: ReportData) -> list[str]:
    """One comparison line per variant made with a matrix whose plain sibling is there."""
    return [comparison_line(c) for c in data.imatrix_comparisons]
