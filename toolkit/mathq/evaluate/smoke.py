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

Results are only resumed under the settings that made them (backend, model file, prompt,
token limit, stop strings, problem source): a ``.settings.json`` beside the JSONL records
them, and a rerun with other settings is refused until ``restart`` discards the old results.
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
from typing import Any

from mathq.convert.gguf_info import gguf_imatrix
from mathq.datasets.problems import Problem, ProblemSet, load_problem_set, select_problems
from mathq.errors import InputFileError, ProblemSetError, SmokeError
from mathq.evaluate.backends import Backend, BackendSpec, Completion, Request, open_backend
from mathq.evaluate.grading.equivalence import DEFAULT_TIMEOUT_S
from mathq.evaluate.grading.grade import ProblemResult, result_for, summarize
from mathq.evaluate.grading.isolation import judge
from mathq.evaluate.summaries import SmokeSummary, save_summary, wilson_rate
from mathq.fsutil import exclusive_lock, write_text_atomic
from mathq.layout import BuildLayout
from mathq.manifest import Fingerprint, Manifest, file_identity
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


@dataclass(frozen=True)
class SmokeOutcome:
    """One variant's smoke test: where its files are, its summary, and what this run did."""

    quant: str
    results: Path
    summary_path: Path
    summary: SmokeSummary
    resumed: int
    answered: int


@dataclass(frozen=True)
class _Paths:
    results: Path
    settings: Path
    summary: Path


def _paths(layout: BuildLayout, quant: str, out_dir: Path | None) -> _Paths:
    files = (layout.smoke_results(quant), layout.smoke_settings(quant),
             layout.smoke_summary(quant))
    if out_dir is not None:
        files = tuple(Path(out_dir) / f.name for f in files)
    return _Paths(*files)


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
            row = json.loads(raw.decode("utf-8")) if raw.strip() else None
            result = (ProblemResult.from_json(row, f"{path}:{lineno}")
                      if isinstance(row, dict) else None)
        except (UnicodeDecodeError, json.JSONDecodeError, ProblemSetError, TypeError) as e:
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


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Refuse a second smoke run writing the same results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.with_name(path.name + ".lock"),
                        SmokeError(f"another mathq smoke is writing {path}",
                                   "wait for it to finish, or use --out-dir")):
        yield


# ---------------------------------------------------------------------------------------
# Settings that results are valid for


def _target(recipe: Recipe, quant: str, spec: BackendSpec, gguf: Path | None,
            backend: Backend | None = None) -> dict[str, Any]:
    if spec.kind == "llama":
        assert gguf is not None
        identity = file_identity(gguf)
        return {"gguf": identity.pop("name"), **identity}
    if spec.kind == "ollama":
        return {"ollama_model": ollama_model_name(recipe, quant, spec.model)}
    return {"served_model": getattr(backend, "model", spec.model)}


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


def _settings_conflict(path: Path, settings: dict[str, Any]) -> SmokeError | None:
    """Why results recorded beside ``path`` cannot be resumed under ``settings``, if so."""
    if not path.exists():
        return SmokeError(f"{path} is missing, so the results beside it cannot be trusted",
                          "pass --restart to discard them")
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
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


def smoke_fingerprint(recipe: Recipe, quant: str, options: SmokeOptions,
                      layout: BuildLayout) -> Fingerprint | None:
    """What an in-process smoke summary in the build folder is made from.

    None for other backends or folders (nothing of theirs is recorded) and while the GGUF
    is missing. ``build`` compares it with the manifest's record to skip a finished test.
    """
    gguf = layout.gguf(quant)
    if options.backend.kind != "llama" or options.out_dir is not None or not gguf.is_file():
        return None
    return ({"gguf": file_identity(gguf)},
            {"suite": options.suite or recipe.smoke.suite,
             "n": recipe.smoke.n if options.n is None else options.n, "seed": options.seed,
             "subjects": list(options.subjects), "levels": list(options.levels),
             "max_tokens": options.max_tokens or recipe.smoke.max_tokens,
             "prompt": dataclasses.asdict(recipe.prompt)})


# ---------------------------------------------------------------------------------------
# Running


def select_smoke_problems(recipe: Recipe, options: SmokeOptions,
                          progress: ProgressCallback = no_progress) -> ProblemSet:
    """The problem set a smoke run uses: suite, subset and filters (recipe defaults)."""
    pset = load_problem_set(options.suite or recipe.smoke.suite, progress=progress)
    n = recipe.smoke.n if options.n is None else options.n
    return select_problems(pset, n=n or None, seed=options.seed, subjects=options.subjects,
                           levels=options.levels)


def run_smoke(recipe: Recipe, quants: Sequence[str], options: SmokeOptions,
              build_root: Path | None = None,
              progress: ProgressCallback = no_progress) -> list[SmokeOutcome]:
    """Smoke-test each variant in turn on the same problems."""
    layout = BuildLayout.for_model(recipe.name, build_root)
    problems = select_smoke_problems(recipe, options, progress)
    return [smoke_variant(recipe, q, problems, layout, options, progress) for q in quants]


def smoke_variant(recipe: Recipe, quant: str, problems: ProblemSet, layout: BuildLayout,
                  options: SmokeOptions,
                  progress: ProgressCallback = no_progress) -> SmokeOutcome:
    """Answer and grade every problem not yet answered for ``quant``; write the summary."""
    spec = options.backend
    paths = _paths(layout, quant, options.out_dir)
    max_tokens = options.max_tokens or recipe.smoke.max_tokens
    gguf = layout.gguf(quant) if spec.kind == "llama" else None
    if gguf is not None and not gguf.is_file():
        raise InputFileError(f"no {quant} GGUF at {gguf}",
                             f"make it first: mathq quantize {recipe.name} --quant {quant}")
    ollama_model = ollama_model_name(recipe, quant, spec.model) if spec.kind == "ollama" else None
    stops = stop_strings(recipe.prompt)
    few_shot = recipe.prompt.template == "few-shot"

    fingerprint = smoke_fingerprint(recipe, quant, options, layout)
    manifest = Manifest(layout.manifest)
    with _exclusive(paths.results):
        if options.restart:
            _discard(paths)
        done = read_results_log(paths.results)
        backend = None
        try:
            if spec.kind == "openai" and spec.model is None:
                backend = open_backend(spec)  # the served model's name is part of the settings
            settings = {"backend": spec.kind, **_target(recipe, quant, spec, gguf, backend),
                        "prompt": dataclasses.asdict(recipe.prompt), "max_tokens": max_tokens,
                        "stop": list(stops), "problems": problems.source}
            conflict = _settings_conflict(paths.settings, settings) if done else None
            if conflict is not None and not options.restart_if_changed:
                raise conflict
            if conflict is not None:
                _discard(paths)
                done = {}
            write_text_atomic(paths.settings,
                              json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
            wanted = {p.id for p in problems.problems}
            todo = [p for p in problems.problems if p.id not in done]
            resumed = len(wanted) - len(todo)
            if todo:
                if fingerprint is not None:  # the summary is about to be out of date
                    manifest.forget(layout.key(paths.summary))
                if backend is None:
                    backend = open_backend(spec, gguf=gguf, ollama_model=ollama_model)
                done.update(_answer(backend, todo, recipe, quant, max_tokens, stops, few_shot,
                                    options.grade_timeout_s, paths.results,
                                    done_before=resumed, total=len(wanted),
                                    correct_before=sum(done[i].correct for i in wanted
                                                       if i in done),
                                    progress=progress))
        finally:
            if backend is not None:
                backend.close()
        # Records of problems outside this selection (another --n) stay in the file but
        # are not counted.
        records = [done[p.id] for p in problems.problems if p.id in done]
        summary = build_summary(recipe, quant, problems, records, options, max_tokens,
                                target=gguf.name if gguf else str(ollama_model or
                                                                  settings.get("served_model")),
                                backend=describe_backend(spec),
                                imatrix=gguf_imatrix(gguf) if gguf else None)
        save_summary(paths.summary, summary)
        if fingerprint is not None:
            manifest.record(layout.key(paths.summary), "smoke", *fingerprint,
                            size=paths.summary.stat().st_size)
    return SmokeOutcome(quant=quant, results=paths.results, summary_path=paths.summary,
                        summary=summary, resumed=resumed, answered=len(todo))


def _discard(paths: _Paths) -> None:
    for p in (paths.results, paths.settings, paths.summary):
        p.unlink(missing_ok=True)


def describe_backend(spec: BackendSpec) -> str:
    """How a summary names the backend: ``llama.cpp``, ``ollama URL``, ``openai URL ...``."""
    if spec.kind == "llama":
        return "llama.cpp"
    return " ".join((spec.kind, *spec.urls))


def _answer(backend: Backend, todo: list[Problem], recipe: Recipe, quant: str,
            max_tokens: int, stops: tuple[str, ...], few_shot: bool, timeout_s: float,
            results: Path, *, done_before: int, total: int, correct_before: int,
            progress: ProgressCallback) -> dict[str, ProblemResult]:
    """Run ``todo`` through the backend; grade and append each answer as it arrives."""
    by_id = {p.id: p for p in todo}
    requests = [Request(id=p.id, prompt=render_prompt(recipe.prompt, p.problem),
                        question=p.problem, max_tokens=max_tokens, stop=stops) for p in todo]
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
        progress(Progress(stage, state["done"], total, "problems", item=item,
                          info=f"{acc:.1f}% correct, {rate:.1f} tok/s"))

    def on_tokens(n: int) -> None:
        state["tokens"] = n
        report()

    def grade(c: Completion) -> ProblemResult:
        return result_for(by_id[c.id], c.text, few_shot=few_shot,
                          judge=lambda g, p: judge(g, p, timeout_s),
                          prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                          seconds=round(c.seconds, 3), finish_reason=c.finish_reason,
                          run=run_id, run_seconds=round(time.perf_counter() - started, 3))

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
                  *, target: str, backend: str, imatrix: str | None = None) -> SmokeSummary:
    """The variant's summary from its results, one record per problem."""
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
        parallel=options.backend.parallel, max_tokens=max_tokens,
        accuracy=wilson_rate(g.correct, g.total),
        by_subject={k: wilson_rate(t.correct, t.total) for k, t in g.by_subject.items()},
        by_level={k: wilson_rate(t.correct, t.total) for k, t in g.by_level.items()},
        prompt_tokens=sum(r.prompt_tokens or 0 for r in records),
        completion_tokens=completion_tokens,
        generation_tokens_per_second=(round(completion_tokens / wall, 3) if wall > 0 else None),
        wall_seconds=round(wall, 3),
        reference_accuracy=recipe.smoke.reference_accuracy,
        reference_source=recipe.smoke.reference_source, imatrix=imatrix,
        verdicts=dict(g.verdicts), seed=options.seed, runs=max(1, len(known)))
