"""Write a recipe's report: report.md, report.html, report.json and the plots, atomically.

Reads only the summaries in the build folder (and GGUF headers for sizes), so it runs in
seconds and can be rerun after any stage; the files are written under temporary names and
renamed into place together, once all of them are written.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathq import __version__
from mathq.fsutil import atomic_outputs, removing_new_dirs, to_jsonable
from mathq.layout import BuildLayout
from mathq.manifest import Fingerprint, Manifest
from mathq.progress import Progress, ProgressCallback, no_progress
from mathq.recipes.recipe import Recipe, load_recipe
from mathq.report.advice import Advice, size_class, with_advice
from mathq.report.cells import P_FLOOR
from mathq.report.html import render_html
from mathq.report.markdown import render_markdown
from mathq.report.paired import ALPHA, Z95
from mathq.report.plots import Plot, plot_files, png_width, write_plots
from mathq.report.table import ReportData, VariantRow, collect, report_inputs

REPORT_SCHEMA = 2


@dataclass(frozen=True)
class ReportOptions:
    """Where to write (default: the build folder's report/)."""

    out_dir: Path | None = None


@dataclass(frozen=True)
class ReportResult:
    """The files written, the advice and the table they came from."""

    markdown: Path
    html: Path
    json: Path
    plots: tuple[Plot, ...]
    advice: Advice
    data: ReportData


def _paired_json(row: VariantRow) -> dict[str, Any] | None:
    p = row.paired
    if p is None:
        return None
    return {**to_jsonable(p), "significant_loss": p.significant_loss}


def report_json(data: ReportData, advice: Advice, plots: tuple[Plot, ...]) -> dict[str, Any]:
    """report.json's content: the table model with every figure, missing ones as null."""
    rows = []
    for r in data.rows:
        row = to_jsonable(r)
        row["paired"] = _paired_json(r)
        row["gib"] = round(r.size_bytes / 2**30, 6) if r.size_bytes is not None else None
        row["mib"] = round(r.size_bytes / 2**20, 6) if r.size_bytes is not None else None
        row["llama_total_bytes"] = r.llama_total_bytes
        row["size_class"] = size_class(r.quant)
        rows.append(row)
    return {
        "schema": REPORT_SCHEMA, "generator": f"mathq {__version__}",
        "model": data.model, "recipe": data.recipe, "recipe_ref": data.recipe_ref,
        "recipe_sha256": data.recipe_sha256,
        "advice": {"quant": advice.quant, "text": advice.text, "rule": advice.rule,
                   "frontier": list(advice.frontier), "qualified": list(advice.qualified),
                   "alpha": ALPHA, "confidence": data.confidence, "z": Z95,
                   "p_floor": P_FLOOR,
                   "picks": [{**to_jsonable(p), "label": p.label} for p in advice.picks]},
        "accuracy_reference": data.accuracy_reference,
        "paper": {"accuracy": data.paper_accuracy, "source": data.paper_source},
        "smoke": {"suite": data.smoke_suite, "title": data.smoke_suite_title, "n": data.smoke_n},
        "kld": {"reference": data.kld_reference, "corpus": data.kld_corpus,
                "positions": data.kld_positions},
        "bench": {"threads": data.bench_threads, **data.bench_settings},
        "environment": data.environment,
        "rows": rows,
        "imatrix_comparisons": [{**to_jsonable(c), "kld_change_pct": c.kld_change_pct,
                                 "accuracy_change_pp": c.accuracy_change_pp}
                                for c in data.imatrix_comparisons],
        "plots": {p.name: {"png": p.png.name, "svg": p.svg.name, "points": p.points,
                           "png_width": png_width()}
                  for p in plots},
        "sources": data.sources,
    }


def report_fingerprint(recipe: Recipe, layout: BuildLayout) -> Fingerprint:
    """What the build folder's report is made from: the recipe, every summary and GGUF
    it reads, and the mathq that renders them."""
    return report_inputs(recipe, layout), {"mathq": __version__}


def build_report(recipe_ref: str | Path, options: ReportOptions = ReportOptions(),
                 build_root: Path | None = None,
                 progress: ProgressCallback = no_progress) -> ReportResult:
    """Gather the build folder's summaries and write every report file."""
    recipe = load_recipe(recipe_ref)
    layout = BuildLayout.for_model(recipe.name, build_root)
    layout.require()
    out = options.out_dir or layout.report_dir
    steps = ("summaries", "plots", "pages")
    progress(Progress("report", 0, len(steps), "steps", item=steps[0]))
    data = with_advice(collect(recipe, layout, progress))
    advice = data.advice
    md, html, js = out / "report.md", out / "report.html", out / "report.json"
    # One set: a failure (a full disk, Ctrl-C) leaves the previous report or none, and a
    # second report into the same folder is refused instead of colliding file by file.
    with removing_new_dirs(out), atomic_outputs(*plot_files(out), md, html, js) as staged:
        progress(Progress("report", 1, len(steps), "steps", item=steps[1]))
        plots = write_plots(data, out, staged)
        progress(Progress("report", 2, len(steps), "steps", item=steps[2]))
        staged[md].write_text(render_markdown(data, advice, plots), encoding="utf-8")
        drawn = tuple(dataclasses.replace(p, svg=staged[p.svg]) for p in plots)  # inlined
        staged[html].write_text(render_html(data, advice, drawn), encoding="utf-8")
        staged[js].write_text(json.dumps(report_json(data, advice, plots), indent=2,
                                         ensure_ascii=False) + "\n", encoding="utf-8")
    if options.out_dir is None:
        fingerprint = report_fingerprint(recipe, layout)
        Manifest(layout.manifest).record(layout.key(html), "report", *fingerprint)
    progress(Progress("report", 3, len(steps), "steps"))
    return ReportResult(md, html, js, plots, advice, data)
