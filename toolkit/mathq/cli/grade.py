"""``mathq grade``: re-grade a stored per-problem results file without running a model."""

from __future__ import annotations

from pathlib import Path

import click

from mathq.cli.common import echo_json, json_option, quiet_option
from mathq.cli.types import MAX_SECONDS, FileOrName, Float, InputFile, Int, OutputPath
from mathq.evaluate.grading.equivalence import DEFAULT_TIMEOUT_S


@click.command()
@click.argument("results", type=InputFile())
@click.option("--out", type=OutputPath(folder=False), default=None,
              help="Write the re-graded file here instead of replacing RESULTS.")
@click.option("--problems", "problem_set", metavar="SUITE|FILE", type=FileOrName(),
              default=None,
              help="Take gold answers from this problem set, by id (for results "
                   "without an 'answer' field, or to override it).")
@click.option("--workers", type=Int(0, 1024), default=0, show_default=True,
              help="Compare in this many worker processes in parallel (0: in this "
                   "process); at most one per result and four per core are started.")
@click.option("--timeout", "timeout_s", type=Float(0.1, MAX_SECONDS), default=DEFAULT_TIMEOUT_S,
              show_default=True, help="Seconds one answer comparison may take; "
              "an overrun counts as wrong (verdict 'timeout').")
@json_option
@quiet_option
def grade(results: Path, out: Path | None, problem_set: str | None, workers: int,
          timeout_s: float, as_json: bool, quiet: bool) -> None:
    """Re-grade a results file: extract each answer again and judge it again.

    RESULTS is the per-problem JSONL a smoke run writes (each line needs id, completion
    and the gold answer). Answers are found in DeepSeek-Math's evaluation order (final
    answer is $...$, last \\boxed{}, "the answer is", last number) and compared with
    math-verify after MATH's normalisations. The file is rewritten in place (atomically)
    unless --out is given; fields other than extracted/rule/verdict/method are kept.

    \b
    Examples:
      mathq grade build/deepseek-math-7b-rl/smoke/Q4_K_M.jsonl
      mathq grade results.jsonl --out regraded.jsonl --json
      mathq grade old.jsonl --problems math500 --workers 2
    """
    from mathq.cli.render import progress_for
    from mathq.datasets.problems import gold_answers
    from mathq.evaluate.grading.grade import regrade_file

    gold = gold_answers(problem_set, progress_for(quiet)) if problem_set is not None else None
    report = regrade_file(results, out=out, gold=gold, workers=workers, timeout_s=timeout_s,
                          progress=progress_for(quiet))
    if as_json:
        echo_json(report)
        return
    s = report.summary
    where = "in place" if report.out == report.path else f"to {report.out}"
    click.echo(f"Re-graded {s.total} results from {report.path} (written {where})")
    verdicts = ", ".join(f"{k} {v}" for k, v in s.verdicts.items())
    click.echo(f"accuracy {s.accuracy:.1f}% ({s.correct}/{s.total}); {verdicts}")
    if report.changes:
        shown = ", ".join(f"{i} {a}->{b}" for i, a, b in report.changes[:5])
        more = f" and {len(report.changes) - 5} more" if len(report.changes) > 5 else ""
        click.echo(f"changed verdicts: {len(report.changes)} ({shown}{more})")
    else:
        click.echo("changed verdicts: 0")
    for title, table in (("subject", s.by_subject), ("level", s.by_level)):
        if len(table) > 1:
            click.echo(f"{title:<24} {'correct':>7} {'total':>6} {'accuracy':>9}")
            for name, t in table.items():
                click.echo(f"{name:<24} {t.correct:>7} {t.total:>6} {t.accuracy:>8.1f}%")
    click.echo("rules: " + ", ".join(f"{k} {v}" for k, v in s.by_rule.items()))
