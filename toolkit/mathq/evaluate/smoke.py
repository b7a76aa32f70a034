"""The smoke stage: MATH problems through each variant, graded, resumable, summarised.

For every variant the recipe's exact prompt (:func:`mathq.recipes.prompt.render_prompt`) is
completed greedily, up to the token limit, ending at EOS or a stop string, by a backend
(:mod:`mathq.evaluate.backends`: llama.cpp in process with continuous batching, Ollama, or
OpenAI-compatible servers). Each answer is graded in this thread as soon as it arrives
(the grader's time limits use signals, which work only here) and appended to the variant's
JSONL file (:mod:`mathq.evaluate.results_log`), flushed to disk, before the next one is
taken: a run killed at any moment loses at most the problems in flight. A rerun reads the
finished ids and asks only for the rest; a line cut short by the kill is dropped. The
summary is computed from the file, one record per problem, so a problem is never counted
twice.

In process, a variant drafts from BF16's answers to the same problems (its results file,
the *draft reference*) and from prompt lookup, and checks the drafts in batches
(:mod:`mathq.llama.drafts`): same greedy answers, fewer decode steps. The drafts never
decide an answer, so they are not part of the settings results are resumed under.

Results are only resumed under the settings that made them (backend, model file, prompt,
token limit, stop strings, problem source): a ``.settings.json`` beside the JSONL records
them, and a rerun with other settings is refused until ``restart`` discards the old results.

:func:`run_smoke_target` is one variant's run, all of the above. What it tests and where its
files go is a :class:`SmokeTarget`, which the stage (:mod:`mathq.evaluate.stage`) makes
from the build folder or a GGUF path; a :class:`SummaryRecord` (the build manifest) hears
when the summary goes stale and when it is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mathq.convert.gguf_info import gguf_imatrix
from mathq.datasets.problems import Problem, ProblemSet, load_problem_set, select_problems
from mathq.errors import MathqError, SmokeError
from mathq.evaluate.backends import open_backend
from mathq.evaluate.backends.base import Backend, BackendSpec, Completion, Request
from mathq.evaluate.environment import measurement_environment
from mathq.evaluate.grading.equivalence import DEFAULT_TIMEOUT_S
from mathq.evaluate.grading.grade import ProblemResult, result_for, summarize
from mathq.evaluate.grading.isolation import judge
from mathq.evaluate.results_log import append_result, read_draft_reference, read_results_log
from mathq.evaluate.summaries import SmokeSummary, load_summary, save_summary, wilson_rate
from mathq.fsutil import Debris, exclusive_lock, make_dirs, write_text_atomic
from mathq.inputs import parse_json, read_text
from mathq.llama.devices import ParallelChoice
from mathq.llama.drafts import draft_off_reason as engine_draft_off
from mathq.llama.runtime import PARALLEL_AUTO
from mathq.manifest import file_identity
from mathq.progress import Progress, ProgressCallback, no_progress
from mathq.recipes.prompt import render_prompt, stop_strings
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
    #: Results file to draft from instead of BF16's (the draft reference).
    draft_reference: Path | None = None


@dataclass(frozen=True)
class SmokeFiles:
    """One variant's smoke files: the results log, the settings its results were made
    with, and the summary."""

    results: Path
    settings: Path
    summary: Path

    @property
    def lock(self) -> Path:
        """Held while a run writes the results, so that two runs never interleave them."""
        return self.results.with_name(self.results.name + ".lock")


@dataclass(frozen=True, kw_only=True)
class SmokeTarget:
    """One variant to smoke-test and where its files go.

    ``quant`` names it in results and progress. The backend runs ``gguf`` in process or
    asks Ollama for ``ollama_model`` (``name:tag``); OpenAI-compatible servers name their
    own model. ``draft_references`` are results files to draft from, best first: the first
    one there that is not this run's own is the draft reference.
    """

    quant: str
    files: SmokeFiles
    gguf: Path | None = None
    ollama_model: str | None = None
    draft_references: tuple[Path, ...] = ()


@dataclass(frozen=True)
class SmokeOutcome:
    """One variant's smoke test: where its files are, its summary, and what this run did."""

    quant: str
    results: Path
    summary_path: Path
    summary: SmokeSummary
    resumed: int
    answered: int


class SummaryRecord(Protocol):
    """Whoever keeps account of a summary (a build folder's manifest, so that ``build``
    skips a finished test)."""

    def forget(self) -> None:
        """New answers are about to make the summary out of date."""

    def record(self, summary: Path) -> None:
        """``summary`` has just been written."""


# ---------------------------------------------------------------------------------------
# Drafting


def draft_off_reason(spec: BackendSpec) -> str | None:
    """Why a run with ``spec`` does not draft, or None when it does."""
    if spec.kind != "llama":
        return f"the {spec.kind} backend decodes on its own"
    return engine_draft_off(spec.draft, spec.ignore_eos)


def _draft_reference(target: SmokeTarget, spec: BackendSpec) -> Path | None:
    """The results file ``target`` drafts from: the first of its draft references there
    that is not its own results. None when drafting is off, and for BF16 itself (it drafts
    by prompt lookup only)."""
    if draft_off_reason(spec) is not None:
        return None
    own = target.files.results
    return next((path for path in target.draft_references
                 if path.is_file() and path.resolve() != own.resolve()), None)


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


def select_smoke_problems(recipe: Recipe, options: SmokeOptions,
                          progress: ProgressCallback = no_progress) -> ProblemSet:
    """The problem set a smoke run uses: suite, subset and filters (recipe defaults)."""
    pset = load_problem_set(options.suite or recipe.smoke.suite, progress=progress)
    n = recipe.smoke.n if options.n is None else options.n
    return select_problems(pset, n=n or None, seed=options.seed, subjects=options.subjects,
                           levels=options.levels)


@dataclass(frozen=True)
class _Run:
    """One variant's run: what it tests, with which problems and options, and the draft
    reference found for it."""

    recipe: Recipe
    target: SmokeTarget
    problems: ProblemSet
    options: SmokeOptions
    draft_reference: Path | None

    @property
    def max_tokens(self) -> int:
        return self.options.max_tokens or self.recipe.smoke.max_tokens

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.options.backend.ignore_eos else stop_strings(self.recipe.prompt)


def _settings(run: _Run, backend: Backend | None) -> dict[str, Any]:
    """What the results are valid for: backend, model, prompt, token limit, stop strings
    and problem source. ``backend`` is the OpenAI one already opened to name its model."""
    spec = run.options.backend
    gguf = run.target.gguf
    if spec.kind == "llama":
        assert gguf is not None
        identity = file_identity(gguf)
        model: dict[str, Any] = {"gguf": identity.pop("name"), **identity}
    elif spec.kind == "ollama":
        model = {"ollama_model": run.target.ollama_model}
    else:
        model = {"served_model": backend.model if backend is not None else spec.model}
    settings = {"backend": spec.kind, **model, "prompt": dataclasses.asdict(run.recipe.prompt),
                "max_tokens": run.max_tokens, "stop": list(run.stops),
                "problems": run.problems.source}
    if spec.ignore_eos:
        settings["ignore_eos"] = True
    return settings


def _settings_conflict(path: Path, settings: dict[str, Any]) -> SmokeError | None:
    """Why results recorded beside ``path`` cannot be resumed under ``settings``, if so."""
    if not path.exists():
        return SmokeError(f"{path} is missing, so the results beside it cannot be trusted",
                          "pass --restart to discard them")
    try:
        old = parse_json(read_text(path))
    except (OSError, ValueError) as e:
        return SmokeError(f"cannot read {path}: {e}", "pass --restart")
    changed = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if not changed:
        return None
    first = changed[0]
    return SmokeError(
        f"results in {path.parent} were made with other settings "
        f"({first}: {json.dumps(old.get(first))} -> {json.dumps(settings.get(first))})",
        "pass --restart to discard them, or --out-dir to keep both")


def _resumable(run: _Run, settings: dict[str, Any],
               done: dict[str, ProblemResult]) -> dict[str, ProblemResult]:
    """``done`` if it was made under ``settings``; nothing if other settings made it and
    ``restart_if_changed`` discards it (else the conflict is raised). ``settings`` are
    written beside the results for the next run."""
    files = run.target.files
    conflict = _settings_conflict(files.settings, settings) if done else None
    if conflict is not None and not run.options.restart_if_changed:
        raise conflict
    if conflict is not None:
        _discard(files)
        done = {}
    write_text_atomic(files.settings, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    return done


def _discard(files: SmokeFiles) -> None:
    for p in (files.results, files.settings, files.summary):
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(files: SmokeFiles) -> Iterator[None]:
    """Refuse a second smoke run writing the same results file."""
    make_dirs(files.results.parent)
    with exclusive_lock(files.lock,
                        SmokeError(f"another mathq smoke is writing {files.results}",
                                   "wait for it to finish, or use --out-dir")):
        yield


# ---------------------------------------------------------------------------------------
# Running


def describe_backend(spec: BackendSpec) -> str:
    """How a summary names the backend: ``llama.cpp``, ``ollama URL``, ``openai URL ...``."""
    if spec.kind == "llama":
        return "llama.cpp"
    return " ".join((spec.kind, *spec.urls))


def run_smoke_target(recipe: Recipe, target: SmokeTarget, problems: ProblemSet,
                     options: SmokeOptions, progress: ProgressCallback = no_progress,
                     record: SummaryRecord | None = None) -> SmokeOutcome:
    """Answer and grade every problem of ``problems`` not yet answered for ``target``;
    write its summary (and tell ``record``).

    A run that fails before its first answer (server unreachable, model unloadable) leaves
    nothing behind; one that recorded answers keeps them to resume from.
    """
    files = target.files
    debris = Debris(files.results.parent, files.results, files.settings, files.lock)
    try:
        with _exclusive(files):
            if options.restart:
                _discard(files)
            run = _Run(recipe, target, problems, options,
                       _draft_reference(target, options.backend))
            return _answer_and_summarize(run, progress, record)
    except BaseException:
        answered = files.results.is_file() and files.results.stat().st_size > 0
        debris.remove(keep=(files.results, files.settings) if answered else ())
        raise


def _answer_and_summarize(run: _Run, progress: ProgressCallback,
                          record: SummaryRecord | None) -> SmokeOutcome:
    """The run, inside its lock: finished results resumed if their settings match, the
    rest answered and graded, the summary written from them all."""
    target, spec = run.target, run.options.backend
    files, problems = target.files, run.problems.problems
    done = read_results_log(files.results)
    backend: Backend | None = None
    choice = None
    try:
        if spec.kind == "openai" and spec.model is None:
            backend = open_backend(spec)  # the served model's name is part of the settings
        settings = _settings(run, backend)
        done = _resumable(run, settings, done)
        wanted = {p.id for p in problems}
        todo = [p for p in problems if p.id not in done]
        resumed = len(wanted) - len(todo)
        if todo:
            if record is not None:  # the summary is about to be out of date
                record.forget()
            if backend is None:
                backend = open_backend(spec, gguf=target.gguf, ollama_model=target.ollama_model)
            tally = _Tally(done=resumed, total=len(wanted),
                           correct=sum(done[i].correct for i in wanted if i in done))
            done.update(_answer_problems(run, backend, todo, tally, progress))
            choice = _parallel_choice(spec, backend)
    finally:
        if backend is not None:
            backend.close()
    # Records of problems outside this selection (another --n) stay in the file but
    # are not counted.
    records = [done[p.id] for p in problems if p.id in done]
    target_name = (target.gguf.name if target.gguf
                   else str(target.ollama_model or settings.get("served_model")))
    summary = _build_summary(run, records, target_name=target_name,
                             parallel_choice=choice or _earlier_choice(files.summary, spec))
    save_summary(files.summary, summary)
    if record is not None:
        record.record(files.summary)
    return SmokeOutcome(quant=target.quant, results=files.results, summary_path=files.summary,
                        summary=summary, resumed=resumed, answered=len(todo))


@dataclass
class _Tally:
    """Problems done and correct so far of ``total`` (resumed ones included), and the
    tokens this run has generated."""

    done: int
    correct: int
    total: int
    tokens: int = 0


def _answer_problems(run: _Run, backend: Backend, todo: Sequence[Problem], tally: _Tally,
                     progress: ProgressCallback) -> dict[str, ProblemResult]:
    """Run ``todo`` through the backend; grade and append each answer as it arrives."""
    by_id = {p.id: p for p in todo}
    recipe, timeout_s = run.recipe, run.options.grade_timeout_s
    few_shot = recipe.prompt.template == "few-shot"
    drafts = (read_draft_reference(run.draft_reference)
              if run.draft_reference is not None else {})
    requests = [Request(id=p.id, prompt=render_prompt(recipe.prompt, p.problem),
                        question=p.problem, max_tokens=run.max_tokens, stop=run.stops,
                        draft_reference=drafts.get(p.id, ("", ()))[0],
                        draft_reference_ids=drafts.get(p.id, ("", ()))[1]) for p in todo]
    run_id = uuid.uuid4().hex[:12]
    stage = f"smoke {run.target.quant}"
    # The first comparison imports SymPy and math-verify (about 2 s): pay it before the
    # clock starts, not in the middle of the run.
    judge("\\frac{1}{2}", "0.5", timeout_s)
    started = time.perf_counter()

    def report(item: str = "") -> None:
        elapsed = time.perf_counter() - started
        rate = tally.tokens / elapsed if elapsed > 0 else 0.0
        acc = 100.0 * tally.correct / tally.done if tally.done else 0.0
        drafted, kept = backend.draft_totals
        drafts = f", {100.0 * kept / drafted:.0f}% of {drafted} drafts kept" if drafted else ""
        progress(Progress(stage, tally.done, tally.total, "problems", item=item,
                          info=f"{acc:.1f}% correct, {rate:.1f} tok/s{drafts}"))

    def on_tokens(n: int) -> None:
        tally.tokens = n
        report()

    def grade(c: Completion) -> ProblemResult:
        # Kept drafts: ``accepted`` is their name in results files.
        return result_for(by_id[c.id], c.text, few_shot=few_shot,
                          judge=lambda g, p: judge(g, p, timeout_s),
                          prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                          seconds=round(c.seconds, 3), finish_reason=c.finish_reason,
                          run=run_id, run_seconds=round(time.perf_counter() - started, 3),
                          steps=c.steps, drafted=c.drafted, accepted=c.kept,
                          completion_ids=c.token_ids)

    new: dict[str, ProblemResult] = {}
    report()
    with open(run.target.files.results, "a", encoding="utf-8") as f:
        for completion in backend.complete(requests, on_tokens):
            result = grade(completion)
            append_result(f, result)
            new[result.id] = result
            tally.done += 1
            tally.correct += result.correct
            report(result.id)
    return new


def _parallel_choice(spec: BackendSpec, backend: Backend) -> ParallelChoice:
    """What this run's backend decoded together: the engine's choice (``--parallel auto``
    or given), or a server backend's requests in flight."""
    if backend.parallel_choice is not None:
        return backend.parallel_choice
    requested = str(spec.parallel) if spec.parallel != PARALLEL_AUTO else "auto"
    return ParallelChoice(backend.parallel, f"{backend.parallel} requests in flight per server",
                          requested=requested, device=describe_backend(spec))


def _earlier_choice(summary: Path, spec: BackendSpec) -> ParallelChoice | None:
    """A run that only resumed finished results answered nothing: keep the choice the
    results were made with, from the summary it replaces."""
    if summary.is_file():
        with contextlib.suppress(MathqError):
            old = load_summary(summary, SmokeSummary)
            return old.parallel_choice or ParallelChoice(
                old.parallel, "recorded without a reason", requested=str(old.parallel))
    if spec.parallel == PARALLEL_AUTO:
        return None
    return ParallelChoice(spec.parallel, f"--parallel {spec.parallel}",
                          requested=str(spec.parallel))


def _build_summary(run: _Run, records: Sequence[ProblemResult], *, target_name: str,
                   parallel_choice: ParallelChoice | None) -> SmokeSummary:
    """The variant's summary from its results, one record per problem; ``target_name``
    is what the backend ran (the GGUF's file name, the Ollama tag, the served model).

    ``parallel`` is the number of sequences decoded together (``parallel_choice``, which
    also says why), or the option's value when no choice is known. Drafting figures are
    summed over the records that carry them (None when none does).
    """
    options, recipe, gguf = run.options, run.recipe, run.target.gguf
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
        model=recipe.name, quant=run.target.quant, gguf=target_name, suite=run.problems.name,
        suite_source=run.problems.source, backend=describe_backend(options.backend),
        parallel=(parallel_choice.parallel if parallel_choice is not None
                  else options.backend.parallel),
        max_tokens=run.max_tokens,
        accuracy=wilson_rate(g.correct, g.total),
        by_subject={k: wilson_rate(t.correct, t.total) for k, t in g.by_subject.items()},
        by_level={k: wilson_rate(t.correct, t.total) for k, t in g.by_level.items()},
        prompt_tokens=sum(r.prompt_tokens or 0 for r in records),
        completion_tokens=completion_tokens,
        generation_tokens_per_second=(round(completion_tokens / wall, 3) if wall > 0 else None),
        wall_seconds=round(wall, 3),
        reference_accuracy=recipe.smoke.reference_accuracy,
        reference_source=recipe.smoke.reference_source,
        imatrix=gguf_imatrix(gguf) if gguf else None,
        verdicts=dict(g.verdicts), seed=options.seed, runs=max(1, len(known)),
        parallel_choice=parallel_choice,
        environment=measurement_environment(
            (options.backend.threads or os.cpu_count() or 1)
            if options.backend.kind == "llama" else None),
        draft_reference=str(run.draft_reference) if run.draft_reference else None,
        draft_off=draft_off_reason(options.backend),
        drafted_tokens=sum(r.drafted or 0 for r in stepped) if stepped else None,
        # Kept drafts: ``accepted_tokens`` is their name in saved summaries.
        accepted_tokens=sum(r.accepted or 0 for r in stepped) if stepped else None,
        decode_steps=steps,
        tokens_per_step=round(stepped_tokens / steps, 3) if steps else None)
