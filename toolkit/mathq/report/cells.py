"""The table's columns and how each cell reads, shared by the Markdown and HTML pages.

One definition of every column (header, explanation, text of a cell) keeps report.md and
report.html saying the same thing. A measurement that is missing reads as :data:`MISSING`,
never as zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from mathq.fsutil import format_bytes
from mathq.report.table import ReportData, VariantRow
from mathq.summaries import MeanSd

MISSING = "—"


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


def _kld(row: VariantRow, _data: ReportData) -> str:
    if row.is_kld_reference:
        return "reference"
    if row.mean_kld is None:
        return MISSING
    # Three significant digits (at least four decimals), the error to the same decimals.
    mean = row.mean_kld
    decimals = max(4, 2 - math.floor(math.log10(abs(mean)))) if mean else 4
    err = f" ± {row.mean_kld_err:.{decimals}f}" if row.mean_kld_err else ""
    return f"{mean:.{decimals}f}{err}"


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
        Column("quant", "Quant", "llama.cpp quantization type", lambda r, _d: r.quant, False),
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
