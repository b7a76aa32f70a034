"""``mathq build``: download, convert, quantize, Modelfiles, measurements and report in one go."""

from __future__ import annotations

from pathlib import Path

import click

from mathq.cli.common import (
    build_dir_option,
    echo_json,
    json_option,
    quiet_option,
)
from mathq.cli.render import progress_for
from mathq.cli.types import MAX_PROBLEMS, FileOrName, Int, Parallel
from mathq.quantize.calibration import DEFAULT_CALIBRATION


@click.command()
@click.argument("recipe", type=FileOrName())
@click.option("--quant", "-Q", "quant_list", metavar="TYPES",
              help="Comma-separated variants, e.g. Q5_K_M,Q8_0 (default: the recipe's).")
@click.option("--n", type=Int(1, MAX_PROBLEMS), default=None,
              help="Problems per smoke test (default: the recipe's [smoke] n).")
@click.option("--parallel", "-P", type=Parallel(), default="auto", show_default=True,
              help="Sequences decoded together in the smoke test (1-256). auto: as many as "
                   "the free GPU memory holds KV caches for (at most 128), 8 on the CPU.")
@click.option("--skip-smoke", is_flag=True,
              help="Leave out the smoke test (the longest step); still bench, KLD and report.")
@click.option("--files-only", is_flag=True,
              help="Stop after the GGUFs and Modelfiles: measure nothing, write no report.")
@click.option("--imatrix", "use_imatrix", is_flag=True,
              help="Also compute the recipe's importance matrix and build a <QUANT>-imat variant "
                   "of each type it helps (Q2_K-Q4_K, IQ*), measured beside the plain one.")
@click.option("--calibration", "-c", metavar="FILE|SET", type=FileOrName(),
              help="With --imatrix: the calibration text, as for `mathq imatrix` [default: "
                   f"{DEFAULT_CALIBRATION}]; for tuned variants, the text of the tune's KLD "
                   "probes [default: the recipe's [tune] calibration, else "
                   f"{DEFAULT_CALIBRATION}].")
@click.option("--tune", "tune_list", metavar="BUDGETS",
              help="Also make tuned variants (`mathq tune`): a type makes <QUANT>-tuned at "
                   "its stock file's size, T<bpw> a bits-per-weight budget, e.g. "
                   "Q4_K_M,Q3_K_M,T4.85; with --imatrix also their -imat siblings [default: "
                   "the recipe's [tune] budgets]. --tune '' makes none.")
@click.option("--no-draft", "no_draft", is_flag=True,
              help="Smoke tests decode one token per step instead of also checking drafted "
                   "tokens (BF16's answers, prompt text) in batches; same answers.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (each step: would run, or current) and a summary line; "
                   "do nothing.")
@build_dir_option
@quiet_option
@json_option
def build(recipe: str, quant_list: str | None, n: int | None, parallel: int, skip_smoke: bool,
          files_only: bool, use_imatrix: bool, calibration: str | None, tune_list: str | None,
          no_draft: bool, dry_run: bool,
          build_dir: Path | None, quiet: bool, as_json: bool) -> None:
    """Run the whole pipeline for a recipe into build/<model>/, redoing only what changed.

    Chains download, convert, quantize, Modelfiles, smoke test, speed bench, KL divergence
    and the report. Every artifact is recorded in build/<model>/manifest.json with what it
    was made from; a rerun skips artifacts that are still current, and a run that was
    killed restarts the interrupted step cleanly. Disk needs are checked before starting.

    --imatrix adds one step, `mathq imatrix` on the BF16 model with that command's
    defaults (100 chunks of 512 tokens of --calibration in the recipe's prompt format,
    smoke problems left out), and makes each requested type that a matrix helps (`mathq
    quants`: Q2_K to Q4_K, IQ*) twice: plain, and with the matrix as <QUANT>-imat. Types
    that need a matrix (IQ2_XXS, ...) are made only as -imat. Both are smoke-tested,
    benched and KLD-measured, and the report compares them; Ollama tags keep pointing at
    the plain files.

    \b
    Examples:
      mathq build deepseek-math-7b-rl --quant Q5_K_M
      mathq build tiny-demo --quant Q2_K,Q4_K_M,Q8_0 --n 50
      mathq build deepseek-math-7b-rl --quant Q4_K_M,IQ3_XXS --imatrix
      mathq build deepseek-math-7b-rl --quant Q4_K_M --tune Q4_K_M,Q3_K_M
      mathq build deepseek-math-7b-rl --dry-run
    """
    from dataclasses import replace

    from mathq.fsutil import format_bytes
    from mathq.layout import BuildLayout
    from mathq.manifest import Manifest
    from mathq.pipeline import (
        check_disk,
        default_options,
        plan_build,
        plan_outcomes,
        run_steps,
    )
    from mathq.recipes.quants import parse_tune_list
    from mathq.recipes.recipe import load_recipe

    loaded = load_recipe(recipe)
    options = replace(default_options(loaded, quant_list), n=n, parallel=parallel,
                      skip_smoke=skip_smoke, measure=not files_only, imatrix=use_imatrix,
                      calibration=calibration, draft=not no_draft)
    if tune_list is not None:  # the recipe's [tune] budgets otherwise; '' makes none
        options = replace(options, tune=parse_tune_list(tune_list) if tune_list.strip()
                          else ())
    layout = BuildLayout.for_model(loaded.name, build_dir)
    manifest = Manifest(layout.manifest)
    steps = plan_build(loaded, options, build_dir)
    if dry_run:
        outcomes = plan_outcomes(steps, manifest)
        if as_json:
            echo_json(outcomes)
            check_disk(steps, manifest, layout.root)  # the plan, then what the run would say
            return
        words = {"planned": "would run", "skipped": "current"}
        for o in outcomes:
            size = f"~{format_bytes(o.needs_bytes)}" if o.needs_bytes else ""
            click.echo(f"{words[o.status]:<9} {o.name:<22} {size:>12}  {o.artifact}")
        due = [o for o in outcomes if o.status == "planned"]
        need = sum(o.needs_bytes for o in due)
        disk = f", needing about {format_bytes(need)} of disk" if need else ""
        click.echo(f"{len(due)} of {len(outcomes)} steps would run, "
                   f"{len(outcomes) - len(due)} are current{disk}; nothing was done "
                   "(--dry-run).")
        check_disk(steps, manifest, layout.root)
        return

    def show(outcome: object) -> None:
        if not quiet and not as_json:
            o = outcome
            took = f" in {o.seconds:.1f}s" if o.status == "done" else " (up to date)"
            click.echo(f"{o.status:<8} {o.name}{took}", err=True)

    result = run_steps(loaded.name, layout.root, steps, manifest, progress_for(quiet), show)
    if as_json:
        echo_json(result)
        return
    report = layout.report_dir / "report.html"
    if options.measure and report.is_file():
        from mathq.report.advice import with_advice
        from mathq.report.table import collect
        from mathq.report.text import render_text

        data = with_advice(collect(loaded, layout))
        click.echo(render_text(data, data.advice))
        click.echo(f"\nReport: {report}\n        {report.with_suffix('.md')}")
    click.echo(f"Build of {loaded.name} finished in {layout.root}")
