"""The report's table as aligned plain text, for the terminal at the end of a build or report.

Same columns and cells as report.md and report.html (:func:`mathq.report.cells.columns`),
so the three never disagree; only the framing differs.
"""

from __future__ import annotations

from mathq.report.advice import Advice
from mathq.report.cells import columns, imatrix_lines, imatrix_note
from mathq.report.table import ReportData


def render_text(data: ReportData, advice: Advice) -> str:
    """The table, one row per variant with numbers right-aligned, the comparisons of
    variants made with and without an importance matrix, then the advice."""
    cols = columns(data)
    cells = [[c.header for c in cols]] + [[c.cell(row, data) for c in cols] for row in data.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) if c.numeric else cell.ljust(w)
                       for cell, w, c in zip(r, widths, cols, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    extra = [line for line in (imatrix_note(data), *imatrix_lines(data)) if line]
    if extra:
        lines += ["", *extra]
    return "\n".join([*lines, "", advice.text])
