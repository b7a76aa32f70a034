"""Which file a downloader should choose: the report's picks, and the best file per memory budget.

The model card answers "which file should I use?" from the build's report, never from rules
of thumb: the *recommended* file is the report's headline pick (the smallest size class with a
file that loses no measurable accuracy against BF16, see :mod:`mathq.report.advice`) when the
repo holds it, and each size class's pick comes with the report's one-sentence why.

By memory budget, the best file is the one with the lowest mean KL divergence from BF16 among
the repo's files that qualify (no significant paired accuracy loss, KLD measured; BF16 itself
when the repo holds it) and *fit*: llama.cpp's model, KV-cache, compute and output buffers for
one sequence of the stated context, as ``mathq bench`` measured them, take at most
:data:`BUDGET_SHARE` of the budget, leaving the rest to the operating system and other
programs. Budgets are the memory sizes machines and GPUs are sold with, in GiB as RAM is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mathq.report.advice import Pick
from mathq.report.table import FULL_PRECISION, ReportData, VariantRow, qualifies

#: The share of a memory budget a file's llama.cpp buffers may take.
BUDGET_SHARE = 0.8
#: RAM / VRAM sizes in GiB (laptops, desktops, workstations, 24-80 GB GPUs).
BUDGETS_GIB = (4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128)


@dataclass(frozen=True)
class BudgetChoice:
    """Budgets that share one answer: ``quant`` (None: no file fits), which needs
    ``memory_bytes`` at the stated context; ``label`` names the budgets (``8–12 GB``)."""

    label: str
    quant: str | None
    memory_bytes: int | None


def recommended(data: ReportData, uploaded: Sequence[str]) -> Pick | None:
    """The file to recommend among the ``uploaded`` variants: the report's headline pick
    when it is among them, else the pick of the smallest class that is; None when the
    report picks none of them (then nothing is recommended rather than a guess)."""
    picks = [p for p in (data.advice.picks if data.advice else ()) if p.quant in uploaded]
    headline = data.advice.quant if data.advice else None
    return next((p for p in picks if p.quant == headline), picks[0] if picks else None)


def stated_context(data: ReportData, num_ctx: int | None, uploaded: Sequence[str]) -> int | None:
    """The context budgets are judged at: the recipe's ``num_ctx`` when bench measured it
    for any uploaded file, else the context measured for the most of them (the shortest of
    a tie); None when memory was measured for none."""
    counts: dict[int, int] = {}
    for r in data.rows:
        if r.quant in uploaded:
            for c in r.buffers_by_context:
                counts[c] = counts.get(c, 0) + 1
    if num_ctx in counts:
        return num_ctx
    return min(counts, key=lambda c: (-counts[c], c)) if counts else None


def measured_contexts(data: ReportData, uploaded: Sequence[str]) -> list[int]:
    """Contexts bench measured memory at for any uploaded file, shortest first."""
    return sorted({c for r in data.rows if r.quant in uploaded for c in r.buffers_by_context})


def budget_candidates(data: ReportData, uploaded: Sequence[str]) -> list[VariantRow]:
    """The uploaded files a budget may choose: qualifying variants, and BF16 itself."""
    return [r for r in data.rows if r.quant in uploaded
            and (qualifies(r) or (r.quant == FULL_PRECISION and r.is_kld_reference))]


def _closeness(row: VariantRow) -> float:
    """Mean KLD from BF16 (0 for BF16 itself): lower is better."""
    return 0.0 if row.quant == FULL_PRECISION else (row.mean_kld or 0.0)


def by_budget(candidates: Sequence[VariantRow], n_ctx: int) -> list[BudgetChoice]:
    """The best candidate per budget, runs of budgets with the same answer merged; empty
    when no candidate's memory at ``n_ctx`` was measured.

    A file that fits a budget fits every larger one, so budgets where nothing fits can only
    come first: they read ``under N GB``."""
    sized = [(r, m) for r in candidates if (m := r.memory_at(n_ctx)) is not None]
    if not sized:
        return []
    runs: list[tuple[list[int], VariantRow | None, int | None]] = []
    for gib in BUDGETS_GIB:
        fits = [(r, m) for r, m in sized if m <= BUDGET_SHARE * gib * 2**30]
        row, memory = min(fits, key=lambda rm: (_closeness(rm[0]), rm[1]),
                          default=(None, None))
        if runs and runs[-1][1] is row:
            runs[-1][0].append(gib)
        else:
            runs.append(([gib], row, memory))
    # Each row holds from its first budget up to the next row's: thresholds, no gaps.
    choices = []
    for i, (gibs, row, memory) in enumerate(runs):
        if row is None:
            label = (f"under {runs[i + 1][0][0]} GB" if i + 1 < len(runs)
                     else f"up to {gibs[-1]} GB")
        else:
            label = f"from {gibs[0]} GB"
        choices.append(BudgetChoice(label, row.quant if row else None, memory))
    return choices
