"""report.html: one self-contained page (inline CSS and SVG, no script, nothing fetched).

The page opens from a file, an archive or an air-gapped machine and shows the same
recommendation, tables and plots as report.md. The variants table has one
``<tr class="variant">`` per variant in its ``<tbody>`` (``data-quant`` names it,
``data-pick`` marks the pick of a size class), which the browser tests count. Below 48 rem
of width (a phone) every table turns into one card per row, each cell labelled by its
column, so nothing overflows the page sideways; the secondary tables (by subject, by level,
memory, files, environment) are collapsible ``<details>``.
"""

from __future__ import annotations

import re
from html import escape

from mathq.report.advice import Advice
from mathq.report.cells import MISSING, PICK_MARK, columns, imatrix_lines
from mathq.report.markdown import Section, measured_notes, picks_section, sections
from mathq.report.plots import Plot
from mathq.report.table import ReportData

_CSS = """
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem auto;
       max-width: 80rem; padding: 0 1rem; color: #1d1d1f; background: #fff; line-height: 1.45; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.advice { background: #eef5fb; border-left: 4px solid #1f5f99; padding: .7rem 1rem;
          font-size: 1.05rem; }
.note { font-size: .85rem; color: #444; }
table { border-collapse: collapse; font-size: .82rem; margin: 1rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: .35rem .5rem; vertical-align: top;
         overflow-wrap: break-word; }
th { background: #f4f4f6; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.missing { color: #999; text-align: center; }
td.hash, code { font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
tr[data-pick] td { background: #fdf6e0; }
td.pick { font-weight: 600; white-space: nowrap; }
code { background: #f4f4f6; padding: 0 .2rem; }
.plots { display: flex; flex-direction: column; gap: 1.5rem; }
figure { margin: 0; max-width: 60rem; }
figure svg { width: 100%; height: auto; display: block; }
figcaption { font-size: .8rem; color: #555; text-align: center; }
details { margin: .6rem 0; } summary { cursor: pointer; font-weight: 600; }
@media (max-width: 48rem) {
  table.cards, table.cards tbody, table.cards tr { display: block; width: 100%; }
  table.cards thead { display: none; }
  table.cards tr { border: 1px solid #ddd; border-radius: 6px; margin: 0 0 .8rem;
                   padding: .3rem; }
  table.cards td { border: none; display: grid; padding: .2rem .4rem; gap: .6rem;
                   grid-template-columns: minmax(5.5rem, 38%) minmax(0, 1fr);
                   text-align: left; white-space: normal; overflow-wrap: anywhere; }
  table.cards td.num { text-align: right; }
  table.cards td.missing { text-align: left; }
  table.cards td::before { content: attr(data-label); font-weight: 600; color: #444;
                           text-align: left; }
}
"""

_XML_PROLOGUE = re.compile(r"^\s*(<\?xml[^>]*\?>\s*)?(<!DOCTYPE[^>]*>\s*)?", re.DOTALL)


def inline_svg(svg_text: str) -> str:
    """An SVG file's markup without its XML declaration and DOCTYPE, for embedding."""
    return _XML_PROLOGUE.sub("", svg_text, count=1)


def _code(text: str) -> str:
    """Escape, then show `backticked` words as code, as in the Markdown notes."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


def _breakable(text: str) -> str:
    """A figure that may wrap only between its value and its uncertainty: ``0.0571`` /
    ``± 0.0042`` and ``93.5`` / ``[89.2, 96.2]``, never inside either."""
    return text.replace(" ± ", " ±\u00a0").replace(", ", ",\u00a0")


def _cell(label: str, text: str, numeric: bool, extra: str = "") -> str:
    cls = "missing" if text == MISSING else ("num" if numeric else "")
    cls = f"{cls} {extra}".strip()
    attr = f' class="{cls}"' if cls else ""
    shown = _breakable(text) if numeric else text
    return f'<td data-label="{escape(label)}"{attr}>{_code(shown)}</td>'


def _section_table(s: Section, table_id: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in s.header)
    numeric = [False, *([True] * (len(s.header) - 1))] if s.key.startswith("by-") else None
    body = []
    for row in s.rows:
        cells = "".join(_cell(h or "", c, bool(numeric and numeric[i]),
                              "hash" if h == "SHA-256" else "")
                        for i, (h, c) in enumerate(zip(s.header, row, strict=True)))
        body.append(f"<tr>{cells}</tr>")
    thead = f"<thead><tr>{head}</tr></thead>" if any(s.header) else ""
    return (f'<table id="{table_id}" class="cards">{thead}<tbody>'
            + "".join(body) + "</tbody></table>")


def render_html(data: ReportData, advice: Advice, plots: tuple[Plot, ...]) -> str:
    """The whole page; the plots' SVG files must exist."""
    cols = columns(data)
    head = "".join(f'<th title="{escape(c.note)}">{escape(c.header)}</th>' for c in cols)
    pick_of = {p.quant: p.label for p in advice.picks if p.quant}
    body = []
    for row in data.rows:
        cells = "".join(_cell(c.header, c.cell(row, data), c.numeric,
                              "pick" if c.key == "status" and row.quant in pick_of else "")
                        for c in cols)
        marked = (f' data-imatrix="{escape(row.imatrix or "")}"' if row.made_with_imatrix
                  else "")
        pick = f' data-pick="{escape(pick_of[row.quant])}"' if row.quant in pick_of else ""
        body.append(f'<tr class="variant" data-quant="{escape(row.quant)}" '
                    f'data-kind="{escape(row.kind)}"{pick}{marked}>{cells}</tr>')
    picks = picks_section(data, advice)
    pick_rows = []
    for p, row in zip(advice.picks, picks.rows, strict=True):
        cells = "".join(_cell(h, c, False, "pick" if i == 1 and p.quant else "")
                        for i, (h, c) in enumerate(zip(picks.header, row, strict=True)))
        pick_rows.append(f'<tr data-class="{escape(p.label)}">{cells}</tr>')
    pick_head = "".join(f"<th>{escape(h)}</th>" for h in picks.header)
    pick_notes = "".join(f'<p class="note">{_code(n)}</p>' for n in picks.notes)
    comparisons = "".join(f"<li>{escape(line)}</li>" for line in imatrix_lines(data))
    imatrix_section = ("<h2>With and without an importance matrix</h2>\n"
                       f'<ul id="imatrix">{comparisons}</ul>\n' if comparisons else "")
    figures = "".join(
        f'<figure id="plot-{p.name}">{inline_svg(p.svg.read_text(encoding="utf-8"))}'
        f"<figcaption>{escape(p.title)}</figcaption></figure>" for p in plots)
    details = "".join(
        f'<details id="{s.key}"{"" if s.collapsed else " open"}><summary>{escape(s.title)}'
        f"</summary>{_section_table(s, s.key + '-table')}"
        + "".join(f'<p class="note">{_code(n)}</p>' for n in s.notes) + "</details>"
        for s in sections(data))
    notes = "".join(f"<li>{_code(n)}</li>" for n in measured_notes(data))
    legend = "".join(f"<li><b>{escape(c.header)}</b>: {escape(c.note)}.</li>" for c in cols)
    title = f"{data.model}: which file to publish"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{escape(title)}</h1>
<p class="advice" id="advice">{PICK_MARK} {_code(advice.text)}</p>
<table id="picks" class="cards">
<thead><tr>{pick_head}</tr></thead>
<tbody>{"".join(pick_rows)}</tbody>
</table>
{pick_notes}
<h2>Every variant</h2>
<table id="variants" class="cards">
<thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
{imatrix_section}<h2>Plots</h2>
<div class="plots">{figures}</div>
<h2>Details</h2>
{details}
<h2>How these figures were measured</h2>
<ul>{notes}</ul>
<h2>Columns</h2>
<ul>{legend}</ul>
</body>
</html>
"""
