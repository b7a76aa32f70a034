"""report.md: the table, the advice, the plots and how it was measured, fit for a model card.

Plain GitHub-flavoured Markdown with images by relative path (the PNGs sit next to it), no
front matter and no HTML, so a model card can include it as it is.
"""

from __future__ import annotations

from mathq.report.advice import Advice
from mathq.report.cells import MISSING, columns, imatrix_lines, imatrix_note
from mathq.report.plots import Plot
from mathq.report.table import ReportData


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def measured_notes(data: ReportData) -> list[str]:
    """Sentences saying how each kind of figure was measured (shared with the HTML page)."""
    notes = []
    if data.smoke_suite:
        n = f"{data.smoke_n} problems of " if data.smoke_n else ""
        notes.append(f"MATH accuracy: `mathq smoke` on {n}{data.smoke_suite}, greedy decoding, "
                     "with a Wilson 95 % interval; small samples give wide intervals.")
    if data.paper_accuracy is not None:
        notes.append(f"Paper: {data.paper_accuracy:g} % — {data.paper_source}.")
    if data.kld_reference:
        where = f" on {data.kld_corpus}" if data.kld_corpus else ""
        count = f" ({data.kld_positions} scored positions)" if data.kld_positions else ""
        notes.append(f"KL divergence: `mathq kld` against {data.kld_reference}{where}{count}, "
                     "llama-perplexity's --kl-divergence statistics.")
    if data.bench_threads:
        notes.append(f"Speed and memory: `mathq bench`, llama-bench's pp512 and tg128, "
                     f"{data.bench_threads} threads.")
    note = imatrix_note(data)
    if note:
        notes.append(note)
    notes.append(f"{MISSING} marks a figure that was not measured.")
    return notes


def render_markdown(data: ReportData, advice: Advice, plots: tuple[Plot, ...]) -> str:
    """The whole report.md text."""
    cols = columns(data)
    lines = [f"## {data.model}: quality, size and speed of each variant", "",
             f"**Advice:** {advice.text}", "",
             "| " + " | ".join(_escape(c.header) for c in cols) + " |",
             "|" + "|".join("---:" if c.numeric else ":---" for c in cols) + "|"]
    for row in data.rows:
        lines.append("| " + " | ".join(_escape(c.cell(row, data)) for c in cols) + " |")
    lines.append("")
    comparisons = imatrix_lines(data)
    if comparisons:
        lines += ["### With and without an importance matrix", ""]
        lines += [f"- {_escape(c)}" for c in comparisons]
        lines.append("")
    for plot in plots:
        lines += [f"![{plot.title}]({plot.png.name})", ""]
    lines += ["### How these figures were measured", ""]
    lines += [f"- {n}" for n in measured_notes(data)]
    lines += ["", "Columns:", ""]
    lines += [f"- **{_escape(c.header)}**: {c.note}." for c in cols]
    return "\n".join(lines) + "\n"
