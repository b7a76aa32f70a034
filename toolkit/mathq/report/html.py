"""report.html: one self-contained page (inline CSS and SVG, no script, nothing fetched).

The page opens from a file, an archive or an air-gapped machine and shows the same table,
advice and plots as report.md. The table has one ``<tr class="variant">`` per variant in its
``<tbody>``, which the browser test counts.
"""

from __future__ import annotations

import re
from html import escape

from mathq.report.advice import Advice
from mathq.report.cells import MISSING, columns, imatrix_lines
from mathq.report.markdown import measured_notes
from mathq.report.plots import Plot
from mathq.report.table import ReportData

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 78rem; padding: 0 1rem; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.advice { background: #eef5fb; border-left: 4px solid #1f5f99; padding: .7rem 1rem; }
table { border-collapse: collapse; font-size: .85rem; margin: 1rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: .35rem .6rem; vertical-align: top; }
th { background: #f4f4f6; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.missing { color: #999; text-align: center; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; } figure svg { width: 32rem; max-width: 100%; height: auto; }
figcaption { font-size: .8rem; color: #555; text-align: center; }
code { background: #f4f4f6; padding: 0 .2rem; }
"""

_XML_PROLOGUE = re.compile(r"^\s*(<\?xml[^>]*\?>\s*)?(<!DOCTYPE[^>]*>\s*)?", re.DOTALL)


def inline_svg(svg_text: str) -> str:
    """An SVG file's markup without its XML declaration and DOCTYPE, for embedding."""
    return _XML_PROLOGUE.sub("", svg_text, count=1)


def _code(text: str) -> str:
    """Escape, then show `backticked` words as code, as in the Markdown notes."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


def render_html(data: ReportData, advice: Advice, plots: tuple[Plot, ...]) -> str:
    """The whole page; the plots' SVG files must exist."""
    cols = columns(data)
    head = "".join(f'<th title="{escape(c.note)}">{escape(c.header)}</th>' for c in cols)
    body = []
    for row in data.rows:
        cells = []
        for c in cols:
            text = c.cell(row, data)
            cls = "missing" if text == MISSING else ("num" if c.numeric else "")
            cells.append(f'<td class="{cls}">{escape(text)}</td>' if cls
                         else f"<td>{escape(text)}</td>")
        marked = (f' data-imatrix="{escape(row.imatrix or "")}"' if row.made_with_imatrix
                  else "")
        body.append(f'<tr class="variant" data-quant="{escape(row.quant)}"{marked}>'
                    + "".join(cells) + "</tr>")
    comparisons = "".join(f"<li>{escape(line)}</li>" for line in imatrix_lines(data))
    imatrix_section = ("<h2>With and without an importance matrix</h2>\n"
                       f'<ul id="imatrix">{comparisons}</ul>\n' if comparisons else "")
    figures = "".join(
        f'<figure id="plot-{p.name}">{inline_svg(p.svg.read_text(encoding="utf-8"))}'
        f"<figcaption>{escape(p.title)}</figcaption></figure>" for p in plots)
    notes = "".join(f"<li>{_code(n)}</li>" for n in measured_notes(data))
    legend = "".join(f"<li><b>{escape(c.header)}</b>: {escape(c.note)}.</li>" for c in cols)
    title = f"{data.model}: quality, size and speed of each variant"
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
<p class="advice"><b>Advice:</b> {escape(advice.text)}</p>
<table id="variants">
<thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
{imatrix_section}<h2>Plots</h2>
<div class="plots">{figures}</div>
<h2>How these figures were measured</h2>
<ul>{notes}</ul>
<h2>Columns</h2>
<ul>{legend}</ul>
</body>
</html>
"""
