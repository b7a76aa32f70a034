"""The smoke stage: MATH problems through each variant, graded, resumable, summarised.

For every variant the recipe's exact prompt (:func:`mathq.recipes.prompt.render_prompt`) is
completed greedily, up to the token limit, ending at EOS or a stop string, by a backend
(:mod:`mathq.evaluate.backends`: llama.cpp in process with continuous batching, Ollama, or
OpenAI-compatible servers). Each answer is graded in this thread as soon as it arrives
(the grader's time limits use signals, which work only here) and appended to the variant's
JSONL file, flushed to disk, before the next one is taken: a run killed at any moment
loses at most the problems in flight. A rerun reads the finished ids and asks only for the
rest; a line cut short by the kill is dropped. The summary is computed from the file, one
record per problem, so a problem is never counted twice.

In process, a variant drafts from BF16's answers to the same problems (its results file,
the *reference*) and from prompt lookup, and checks the drafts in batches
(:mod:`mathq.llama.drafts`): same greedy answers, fewer decode steps. The drafts never
decide an answer, so they are not part of the settings results are resumed under.

Results are only resumed under the settings that made them (backend, model file, prompt,
token limit, stop strings, problem source): a ``.settings.json`` beside the JSONL records
them, and a rerun with other settings is refused until ``restart`` discards the old results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathq.datasets.problems import Problem, ProblemSet
from mathq.errors import ProblemSetError, SmokeError
from mathq.evaluate.backends.base import Backend, BackendSpec, Completion, Request
from mathq.evaluate.environment import measurement_environment
from mathq.evaluate.grading.equivalence import DEFAULT_TIMEOUT_S
from mathq.evaluate.grading.grade import ProblemResult, result_for, summarize
from mathq.evaluate.grading.isolation import judge
from mathq.evaluate.summaries import SmokeSummary, wilson_rate
from mathq.inputs import UnreadableInput, parse_json
from mathq.llama.devices import ParallelChoice
from mathq.llama.drafts import draft_off_reason as engine_draft_off
from mathq.progress import Progress, ProgressCallback
from mathq.recipes.prompt import render_prompt
from mathq.recipes.recipe import Recipe


@dataclass(frozen=True)
class SmokeOptions:
    """What to run. None means the recipe's ``[smoke]`` value; ``n`` 0 means every problem.

    ``out_dir`` puts results and summaries there instead of ``build/<model>/smoke/``
    (to keep, say, an Ollama run beside the in-process one). Results made with other
    settings are refused, unless ``restart`` discards them up front or
    ``restart_if_changed`` discards them only if they differ (what ``build`` does: a
    rebuilt GGUF makes them stale, an interrupted run of the same GGUF is resumed).
    """

    suite: str | None = None
    n: int | None = None
    seed: int = 0
    subjects: tuple[str, ...] = ()
    levels: tuple[int, ...] = ()
    max_tokens: int | None = None
    backend: BackendSpec = dataclasses.field(default_factory=BackendSpec)
    restart: bool = False
    restart_if_changed: bool = False
    grade_timeout_s: float = DEFAULT_TIMEOUT_S
    out_dir: Path | None = None
    #: Results file to draft from instead of BF16's (see :func:`draft_reference`).
    draft_reference: Path | None = None


@dataclass(frozen=True)
class SmokeOutcome:
    """One variant's smoke test: where its files are, its summary, and what this run did."""

    quant: str
    results: Path
    summary_path: Path
    summary: SmokeSummary
    resumed: int
    answered: int






# ---------------------------------------------------------------------------------------
# The results file: appended record by record, repaired after a kill


def read_results_log(path: Path) -> dict[str, ProblemResult]:
    """Finished records by id (a later line wins), repairing a last line cut by a kill.

    A final line without its newline is kept if it is a whole record (its newline is
    added) and cut off otherwise. A broken line anywhere else is an error: the file was
    damaged by something other than an interrupted append.
    """
    if not path.exists():
        return {}
    data = path.read_bytes()
    records: dict[str, ProblemResult] = {}
    offset = 0
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        last = lineno == len(lines)
        if last and not raw:
            break
        try:
            row = parse_json(raw.decode("utf-8")) if raw.strip() else None
            result = (ProblemResult.from_json(row, f"{path}:{lineno}")
                      if isinstance(row, dict) else None)
        except (UnicodeDecodeError, UnreadableInput, ProblemSetError, TypeError) as e:
            if last:  # torn by a kill mid-append: drop it
                with open(path, "r+b") as f:
                    f.truncate(offset)
                break
            raise ProblemSetError(f"{path}:{lineno}: damaged results line ({e})",
                                  "pass --restart to discard these results",
                                  path=str(path), line=lineno) from e
        if result is None and raw.strip():
            raise ProblemSetError(f"{path}:{lineno}: expected a JSON object",
                                  "pass --restart to discard these results",
                                  path=str(path), line=lineno)
        if result is not None:
            records[result.id] = result
        offset += len(raw) + 1
        if last:  # a whole record without its newline
            with open(path, "ab") as f:
                f.write(b"\n")
    return records


def append_result(f: Any, result: ProblemResult) -> None:
    """Append one record as a line and force it to disk before going on."""
    f.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())




def read_reference(path: Path) -> dict[str, str]:
    """Completions by problem id from a results file, read only: drafts to check, so a
    damaged line is skipped rather than repaired or refused."""
    completions: dict[str, str] = {}
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError:
        return completions
    for raw in lines:
        try:
            row = parse_json(raw)
        except UnreadableInput:
            continue
        if isinstance(row, dict) and isinstance(row.get("completion"), str) \
                and isinstance(row.get("id"), (str, int)):
            completions[str(row["id"])] = row["completion"]
    return completions


def draft_off_reason(spec: BackendSpec) -> str | None:
    """Why a run with ``spec`` does not draft, or None when it does."""
    if spec.kind != "llama":
        return f"the {spec.kind} backend decodes on its own"
    return engine_draft_off(spec.draft, spec.ignore_eos)


# ---------------------------------------------------------------------------------------
# Settings that results are valid for




def ollama_model_name(recipe: Recipe, quant: str, model: str | None = None) -> str:
    """``name:tag`` of the recipe's Ollama tag for ``quant`` (the first in recipe order);
    ``model`` replaces the recipe's name (``me/deepseek-math-7b-rl``), or names the tag too
    (``me/deepseek-math-7b-rl:q4``)."""
    if model and ":" in model.rsplit("/", 1)[-1]:
        return model
    for tag, q in recipe.ollama.tags:
        if q == quant:
            return f"{model or recipe.ollama.model}:{tag}"
    tags = ", ".join(f"{t} ({q})" for t, q in recipe.ollama.tags)
    raise SmokeError(f"recipe {recipe.name} has no Ollama tag for {quant}",
                     f"its tags: {tags}")






# ---------------------------------------------------------------------------------------
# Running










def describe_backend(spec: BackendSpec) -> str:
    """How a summary names the backend: ``llama.cpp``, ``ollama URL``, ``openai URL ...``."""
    if spec.kind == "llama":
        return "llama.cpp"
    return " ".join((spec.kind, *spec.urls))


def answer_problems(backend: Backend, todo: list[Problem], recipe: Recipe, quant: str,
            max_tokens: int, stops: tuple[str, ...], few_shot: bool, timeout_s: float,
            results: Path, *, done_before: int, total: int, correct_before: int,
            progress: ProgressCallback,
            references: Mapping[str, str] | None = None) -> dict[str, ProblemResult]:
    """Run ``todo`` through the backend; grade and append each answer as it arrives.

    ``references`` are other completions of the same problems, by id, to draft from."""
    by_id = {p.id: p for p in todo}
    references = references or {}
    requests = [Request(id=p.id, prompt=render_prompt(recipe.prompt, p.problem),
                        question=p.problem, max_tokens=max_tokens, stop=stops,
                        reference=references.get(p.id, "")) for p in todo]
    run_id = uuid.uuid4().hex[:12]
    stage = f"smoke {quant}"
    state = {"done": done_before, "correct": correct_before, "tokens": 0}
    # The first comparison imports SymPy and math-verify (about 2 s): pay it before the
    # clock starts, not in the middle of the run.
    judge("\\frac{1}{2}", "0.5", timeout_s)
    started = time.perf_counter()

    def report(item: str = "") -> None:
        elapsed = time.perf_counter() - started
        rate = state["tokens"] / elapsed if elapsed > 0 else 0.0
        acc = 100.0 * state["correct"] / state["done"] if state["done"] else 0.0
        drafted, kept = getattr(backend, "draft_totals", (0, 0))
        drafts = f", {100.0 * kept / drafted:.0f}% of {drafted} drafts kept" if drafted else ""
        progress(Progress(stage, state["done"], total, "problems", item=item,
                          info=f"{acc:.1f}% correct, {rate:.1f} tok/s{drafts}"))

    def on_tokens(n: int) -> None:
        state["tokens"] = n
        report()

    def grade(c: Completion) -> ProblemResult:
        return result_for(by_id[c.id], c.text, few_shot=few_shot,
                          judge=lambda g, p: judge(g, p, timeout_s),
                          prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                          seconds=round(c.seconds, 3), finish_reason=c.finish_reason,
                          run=run_id, run_seconds=round(time.perf_counter() - started, 3),
                          steps=c.steps, drafted=c.drafted, accepted=c.accepted)

    new: dict[str, ProblemResult] = {}
    report()
    with open(results, "a", encoding="utf-8") as f:
        for completion in backend.complete(requests, on_tokens):
            result = grade(completion)
            append_result(f, result)
            new[result.id] = result
            state["done"] += 1
            state["correct"] += result.correct
            report(result.id)
    return new


def build_summary(recipe: Recipe, quant: str, problems: ProblemSet,
                  records: Sequence[ProblemResult], options: SmokeOptions, max_tokens: int,
                  *, target: str, backend: str, imatrix: str | None = None,
                  parallel_choice: ParallelChoice | None = None,
                  draft_reference: str | None = None) -> SmokeSummary:
    """The variant's summary from its results, one record per problem.

    ``parallel`` is the number of sequences decoded together (``parallel_choice``, which
    also says why), or the option's value when no choice is known. Drafting figures are
    summed over the records that carry them (None when none does).
    """
    stepped = [r for r in records if r.steps is not None]
    steps = sum(r.steps or 0 for r in stepped) if stepped else None
    stepped_tokens = sum(r.completion_tokens or 0 for r in stepped)
    g = summarize(records)
    # Wall time: each run's last record marks how long it ran; runs add up.
    runs: dict[str, float] = {}
    for r in records:
        key = r.run or "?"
        runs[key] = max(runs.get(key, 0.0), r.run_seconds or 0.0)
    wall = sum(runs.values())
    completion_tokens = sum(r.completion_tokens or 0 for r in records)
    known = {k: v for k, v in runs.items() if k != "?"}
    return SmokeSummary(
        model=recipe.name, quant=quant, gguf=target, suite=problems.name,
        suite_source=problems.source, backend=backend,
        parallel=(parallel_choice.parallel if parallel_choice is not None
                  else options.backend.parallel),
        max_tokens=max_tokens,
        accuracy=wilson_rate(g.correct, g.total),
        by_subject={k: wilson_rate(t.correct, t.total) for k, t in g.by_subject.items()},
        by_level={k: wilson_rate(t.correct, t.total) for k, t in g.by_level.items()},
        prompt_tokens=sum(r.prompt_tokens or 0 for r in records),
        completion_tokens=completion_tokens,
        generation_tokens_per_second=(round(completion_tokens / wall, 3) if wall > 0 else None),
        wall_seconds=round(wall, 3),
        reference_accuracy=recipe.smoke.reference_accuracy,
        reference_source=recipe.smoke.reference_source, imatrix=imatrix,
        verdicts=dict(g.verdicts), seed=options.seed, runs=max(1, len(known)),
        parallel_choice=parallel_choice,
        environment=measurement_environment(
            (options.backend.threads or os.cpu_count() or 1)
            if options.backend.kind == "llama" else None),
        draft_reference=draft_reference, draft_off=draft_off_reason(options.backend),
        drafted_tokens=sum(r.drafted or 0 for r in stepped) if stepped else None,
        accepted_tokens=sum(r.accepted or 0 for r in stepped) if stepped else None,
        decode_steps=steps,
        tokens_per_step=round(stepped_tokens / steps, 3) if steps else None)
