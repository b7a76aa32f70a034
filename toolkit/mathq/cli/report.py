"""``mathq report``: the quality-versus-size table, plots and pages of a build."""

from __future__ import annotations

from pathlib import Path

import click

from mathq.cli.common import build_dir_option, echo_json, json_option, quiet_option
from mathq.cli.render import progress_for
from mathq.cli.types import FileOrName, OutputPath


@click.command()
@click.argument("recipe", type=FileOrName())
@click.option("--out-dir", type=OutputPath(folder=True),
              help="Where to write the report (default: build/<model>/report/).")
@build_dir_option
@quiet_option
@json_option
def report(recipe: str, out_dir: Path | None, build_dir: Path | None,
           quiet: bool, as_json: bool) -> None:
    """Write the quality-versus-size report of a build: table, plots and pages.

    Answers "which file do I publish?": for each size class (2-bit, 4-bit, ...) the
    frontier variant, i.e. the smallest file whose paired accuracy loss against BF16 is
    not significant (McNemar's exact test on the same problems) with the lowest KL
    divergence at its size, with one sentence of why and the `mathq publish` line that
    ships it. Beside it: every variant's size, accuracy with the paired difference from
    BF16 (from `mathq smoke`), KL divergence (from `mathq kld`), speed and memory (from
    `mathq bench`), accuracy by subject and level, each file's SHA-256 and the versions,
    CPU and dates of the measurements. A figure that was not measured shows as missing,
    never as zero; rerun the report after any stage.

    Writes report.md (for a model card), report.html (one self-contained page),
    report.json, and accuracy/kld/speed plots as PNG and SVG.

    \b
    Examples:
      mathq report deepseek-math-7b-rl
      mathq report deepseek-math-7b-rl --out-dir site/ --json
    """
    from mathq.report.stage import ReportOptions, build_report
    from mathq.report.text import render_text

    render = progress_for(quiet)
    try:
        result = build_report(recipe, ReportOptions(out_dir=out_dir), build_dir, render)
    finally:
        render.close()
    if as_json:
        echo_json({"markdown": result.markdown, "html": result.html, "json": result.json,
                   "plots": {p.name: [p.png, p.svg] for p in result.plots},
                   "advice": result.advice, "variants": len(result.data.rows)})
        return
    click.echo(render_text(result.data, result.advice))
    click.echo(f"{len(result.data.rows)} variants: {result.markdown}, {result.html}, "
               f"{result.json}")
