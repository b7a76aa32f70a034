"""The report's table as aligned plain text, for the terminal at the end of a build or report.

Same cells as report.md and report.html (:func:`mathq.report.cells.columns`), so the three
never disagree; the terminal shows the columns marked ``terminal`` and the recommendation:
the headline, then one line per size class with the command that publishes its pick.
"""

from __future__ import annotations

from mathq.report.advice import Advice
from mathq.report.cells import columns, imatrix_lines, kind_note
from mathq.report.table import ReportData


def render_text(data: ReportData, advice: Advice) -> str:
    """The table, one row per variant with numbers right-aligned, the comparisons of
    variants made with and without an importance matrix, then the recommendation."""
    cols = [c for c in columns(data) if c.terminal]
    cells = [[c.header for c in cols]] + [[c.cell(row, data) for c in cols] for row in data.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    lines = ["  ".join(cell.rjust(w) if c.numeric else cell.ljust(w)
                       for cell, w, c in zip(r, widths, cols, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    extra = [line for line in (kind_note(data), *imatrix_lines(data)) if line]
    if extra:
        lines += ["", *extra]
    lines += ["", advice.text]
    for p in advice.picks:
        lines.append(f"  {p.label}: {p.reason}")
        if p.publish_command:
            lines.append(f"    {p.publish_command}")
    return "\n".join(lines)
