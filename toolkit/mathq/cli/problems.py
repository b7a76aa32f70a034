"""``mathq problems``: the problem sets mathq knows, and deterministic subsets of them."""

from __future__ import annotations

from pathlib import Path

import click

from mathq.cli.common import echo_json, json_option, quiet_option
from mathq.cli.render import progress_for
from mathq.cli.types import MAX_PROBLEMS, SEED, FileOrName, Int, OutputPath
from mathq.datasets.problems import SUITES


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
def problems(ctx: click.Context, as_json: bool) -> None:
    """List the problem sets (suites) mathq can fetch from the Hugging Face Hub.

    A suite is downloaded once into the Hugging Face cache (~/.cache/huggingface, or
    HF_HOME) and read from there afterwards, also with HF_HUB_OFFLINE=1. Wherever a
    command takes a SUITE it also takes the path of a local JSONL file in MATH's format
    (problem, solution, answer, subject, level, unique_id) or GSM8K's (question, answer
    ending '#### n').

    \b
    Examples:
      mathq problems
      mathq problems show math500 --n 100 --seed 0
      mathq problems show math500 --subject algebra --level 5 --out hard-algebra.jsonl
    """
    if ctx.invoked_subcommand is not None:
        return
    from huggingface_hub import try_to_load_from_cache

    rows = []
    for s in SUITES:
        cached = try_to_load_from_cache(s.repo_id, s.filename, revision=s.revision,
                                        repo_type="dataset")
        rows.append({"name": s.name, "repo_id": s.repo_id, "filename": s.filename,
                     "revision": s.revision, "size": s.size, "license": s.license,
                     "description": s.description, "cached": isinstance(cached, str)})
    if as_json:
        echo_json(rows)
        return
    click.echo(f"{'SUITE':<9} {'SIZE':>5}  {'CACHED':<6}  {'SOURCE':<48} DESCRIPTION")
    for r in rows:
        source = f"{r['repo_id']}/{r['filename']}"
        click.echo(f"{r['name']:<9} {r['size']:>5}  {'yes' if r['cached'] else 'no':<6}  "
                   f"{source:<48} {r['description']}")


@problems.command()
@click.argument("suite", type=FileOrName())
@click.option("--n", "n", type=Int(1, MAX_PROBLEMS), default=None,
              help="Take this many problems, keeping the subject and level proportions.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the subset; the same seed picks the same problems everywhere.")
@click.option("--subject", "subjects", multiple=True,
              help="Only this subject (repeatable; 'number_theory' or 'Number Theory').")
@click.option("--level", "levels", type=Int(1, 5), multiple=True,
              help="Only this MATH level, 1-5 (repeatable).")
@click.option("--out", type=OutputPath(folder=False), default=None,
              help="Write the chosen problems as MATH-style JSONL here.")
@json_option
@quiet_option
def show(suite: str, n: int | None, seed: int, subjects: tuple[str, ...],
         levels: tuple[int, ...], out: Path | None, as_json: bool, quiet: bool) -> None:
    """Print (or save) a problem set, or a filtered, stratified subset of it.

    SUITE is a suite name (see `mathq problems`) or a JSONL file. The table lists id,
    subject, level and gold answer; --json prints whole problems; --out writes them.
    Subsets keep the subject and level mix and depend only on --seed.

    \b
    Examples:
      mathq problems show math500 --n 100 --seed 0
      mathq problems show math --subject "Number Theory" --level 4 --level 5
      mathq problems show gsm8k --n 200 --out gsm8k-200.jsonl
    """
    from mathq.datasets.problems import load_problem_set, select_problems, write_problems_jsonl

    pset = load_problem_set(suite, progress=progress_for(quiet))
    chosen = select_problems(pset, n=n, seed=seed, subjects=subjects, levels=levels)
    if out is not None:
        write_problems_jsonl(out, chosen.problems)
    if as_json:
        echo_json({"name": chosen.name, "source": chosen.source,
                   "problems": list(chosen.problems)})
        return
    if out is None:
        click.echo(f"{'ID':<38} {'SUBJECT':<24} {'LVL':>3}  ANSWER")
        for p in chosen.problems:
            level = str(p.level) if p.level is not None else "-"
            click.echo(f"{p.id:<38} {p.subject:<24} {level:>3}  {p.answer}")
    counts: dict[str, int] = {}
    for p in chosen.problems:
        counts[p.subject or "(none)"] = counts.get(p.subject or "(none)", 0) + 1
    mix = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    where = f" -> {out}" if out is not None else ""
    click.echo(f"{len(chosen)} of {len(pset)} problems from {chosen.source}{where}: {mix}")
