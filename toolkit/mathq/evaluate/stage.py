"""The evaluate stage's build steps: smoke, bench and kld over ``build/<model>/``.

Each step has a fingerprint function (what its summary is made from, so ``build`` can skip
a finished measurement) and a ``run_*`` entry point that reads the recipe's GGUFs from the
build folder, measures with the cores (:mod:`mathq.evaluate.smoke`,
:mod:`mathq.evaluate.bench`, :mod:`mathq.evaluate.kld.measure`), writes the summaries and
records them in the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mathq.convert.gguf_info import gguf_imatrix, read_gguf_header
from mathq.datasets.corpus import Corpus, load_corpus
from mathq.datasets.problems import ProblemSet, load_problem_set, select_problems
from mathq.errors import InputFileError, MathqError, SmokeError
from mathq.evaluate.backends import open_backend
from mathq.evaluate.backends.base import Backend, BackendSpec
from mathq.evaluate.bench import (
    BenchOptions,
    BenchOutcome,
    bench_gguf,
    bench_isolated,
    memory_contexts,
)
from mathq.evaluate.environment import measurement_environment
from mathq.evaluate.kld.measure import (
    KldOptions,
    KldRun,
    check_headers,
    ensure_reference,
    ensure_reference_file,
    measure_gguf,
    measure_variant,
    reference_key,
    require_gguf,
)
from mathq.evaluate.smoke import (
    SmokeOptions,
    SmokeOutcome,
    answer_problems,
    build_summary,
    describe_backend,
    draft_off_reason,
    ollama_model_name,
    read_reference,
    read_results_log,
)
from mathq.evaluate.summaries import (
    BenchSummary,
    SmokeSummary,
    load_summary,
    save_summary,
)
from mathq.fsutil import (
    Debris,
    exclusive_lock,
    make_dirs,
    output_lock,
    removing_new_dirs,
    write_text_atomic,
)
from mathq.inputs import file_problem, parse_json, read_text
from mathq.layout import BuildLayout
from mathq.llama.devices import ParallelChoice
from mathq.llama.runtime import PARALLEL_AUTO
from mathq.manifest import Fingerprint, Manifest, file_identity
from mathq.progress import ProgressCallback, no_progress
from mathq.recipes.prompt import stop_strings
from mathq.recipes.quants import get_quant, making_command
from mathq.recipes.recipe import Recipe, load_recipe


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


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Refuse a second smoke run writing the same results file."""
    make_dirs(path.parent)
    with exclusive_lock(path.with_name(path.name + ".lock"),
                        SmokeError(f"another mathq smoke is writing {path}",
                                   "wait for it to finish, or use --out-dir")):
        yield


def _target(recipe: Recipe, quant: str, spec: BackendSpec, gguf: Path | None,
            backend: Backend | None = None) -> dict[str, Any]:
    if spec.kind == "llama":
        assert gguf is not None
        identity = file_identity(gguf)
        return {"gguf": identity.pop("name"), **identity}
    if spec.kind == "ollama":
        return {"ollama_model": ollama_model_name(recipe, quant, spec.model)}
    return {"served_model": getattr(backend, "model", spec.model)}


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


def smoke_fingerprint(recipe: Recipe, quant: str, options: SmokeOptions,
                      layout: BuildLayout) -> Fingerprint | None:
    """What an in-process smoke summary in the build folder is made from.

    None for other backends or folders (nothing of theirs is recorded) and while the GGUF
    is missing. ``build`` compares it with the manifest's record to skip a finished test.
    """
    gguf = layout.gguf(quant)
    if options.backend.kind != "llama" or options.out_dir is not None or not gguf.is_file():
        return None
    settings = {"suite": options.suite or recipe.smoke.suite,
                "n": recipe.smoke.n if options.n is None else options.n, "seed": options.seed,
                "subjects": list(options.subjects), "levels": list(options.levels),
                "max_tokens": options.max_tokens or recipe.smoke.max_tokens,
                "prompt": dataclasses.asdict(recipe.prompt)}
    if options.backend.ignore_eos:  # only when set, so earlier records stay current
        settings["ignore_eos"] = True
    return {"gguf": file_identity(gguf)}, settings


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
                  options: SmokeOptions, progress: ProgressCallback = no_progress,
                  gguf_path: Path | None = None) -> SmokeOutcome:
    """Answer and grade every problem not yet answered for ``quant``; write the summary.

    ``gguf_path`` tests that file (named ``quant``) instead of the build folder's; it needs
    ``options.out_dir``, since nothing about it is recorded in the build folder.
    """
    spec = options.backend
    if gguf_path is not None and options.out_dir is None:
        raise SmokeError("a GGUF outside the build folder needs an output folder",
                         "pass --out-dir")
    paths = _paths(layout, quant, options.out_dir)
    gguf = (gguf_path or layout.gguf(quant)) if spec.kind == "llama" else None
    if gguf is not None and not gguf.is_file():
        raise InputFileError(f"no {quant} GGUF at {gguf}",
                             f"make it first: {making_command(recipe.name, quant)}")
    ollama_model = ollama_model_name(recipe, quant, spec.model) if spec.kind == "ollama" else None

    fingerprint = smoke_fingerprint(recipe, quant, options, layout)
    manifest = Manifest(layout.manifest)
    # A run that fails before its first answer (server unreachable, model unloadable)
    # leaves nothing behind; one that recorded answers keeps them to resume from.
    debris = Debris(paths.results.parent, paths.results, paths.settings,
                    paths.results.with_name(paths.results.name + ".lock"),
                    layout.manifest.with_name(layout.manifest.name + ".lock"))
    try:
        return _smoke_variant(recipe, quant, problems, layout, options, progress, paths,
                              gguf, ollama_model, fingerprint, manifest)
    except BaseException:
        answered = paths.results.is_file() and paths.results.stat().st_size > 0
        debris.remove(keep=(paths.results, paths.settings) if answered else ())
        raise


def _smoke_variant(recipe: Recipe, quant: str, problems: ProblemSet, layout: BuildLayout,
                   options: SmokeOptions, progress: ProgressCallback, paths: _Paths,
                   gguf: Path | None, ollama_model: str | None,
                   fingerprint: Fingerprint | None, manifest: Manifest) -> SmokeOutcome:
    spec = options.backend
    max_tokens = options.max_tokens or recipe.smoke.max_tokens
    stops = () if spec.ignore_eos else stop_strings(recipe.prompt)
    few_shot = recipe.prompt.template == "few-shot"
    with _exclusive(paths.results):
        if options.restart:
            _discard(paths)
        done = read_results_log(paths.results)
        backend = None
        choice = None
        try:
            if spec.kind == "openai" and spec.model is None:
                backend = open_backend(spec)  # the served model's name is part of the settings
            settings = {"backend": spec.kind, **_target(recipe, quant, spec, gguf, backend),
                        "prompt": dataclasses.asdict(recipe.prompt), "max_tokens": max_tokens,
                        "stop": list(stops), "problems": problems.source}
            if spec.ignore_eos:
                settings["ignore_eos"] = True
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
            reference = draft_reference(layout, quant, options, paths.results)
            if todo:
                if fingerprint is not None:  # the summary is about to be out of date
                    manifest.forget(layout.key(paths.summary))
                if backend is None:
                    backend = open_backend(spec, gguf=gguf, ollama_model=ollama_model)
                done.update(answer_problems(
                    backend, todo, recipe, quant, max_tokens, stops, few_shot,
                    options.grade_timeout_s, paths.results, done_before=resumed,
                    total=len(wanted),
                    correct_before=sum(done[i].correct for i in wanted if i in done),
                    progress=progress,
                    references=read_reference(reference) if reference is not None else None))
                choice = _parallel_choice(spec, backend)
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
                                imatrix=gguf_imatrix(gguf) if gguf else None,
                                parallel_choice=choice or _earlier_choice(paths.summary, spec),
                                draft_reference=str(reference) if reference else None)
        save_summary(paths.summary, summary)
        if fingerprint is not None:
            manifest.record(layout.key(paths.summary), "smoke", *fingerprint,
                            size=paths.summary.stat().st_size)
    return SmokeOutcome(quant=quant, results=paths.results, summary_path=paths.summary,
                        summary=summary, resumed=resumed, answered=len(todo))


def draft_reference(layout: BuildLayout, quant: str, options: SmokeOptions,
                    results: Path) -> Path | None:
    """The results file a variant drafts from: ``options.draft_reference``, else BF16's
    results beside this run's (``--out-dir``) or in the build folder. None for BF16 itself
    (it drafts by prompt lookup only) and when drafting is off."""
    if draft_off_reason(options.backend) is not None:
        return None
    found = [options.draft_reference] if options.draft_reference is not None else [
        results.with_name(layout.smoke_results("BF16").name), layout.smoke_results("BF16")]
    for path in found:
        if path is not None and path.is_file() and path.resolve() != results.resolve():
            return path
    return None


def _parallel_choice(spec: BackendSpec, backend: Backend) -> ParallelChoice:
    """What this run's backend decoded together: the engine's choice (``--parallel auto``
    or given), or a server backend's requests in flight."""
    chosen = getattr(backend, "parallel_choice", None)
    if chosen is not None:
        return chosen
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


def _discard(paths: _Paths) -> None:
    for p in (paths.results, paths.settings, paths.summary):
        p.unlink(missing_ok=True)


def recipe_bench_options(recipe: Recipe, options: BenchOptions | None = None
                         ) -> BenchOptions:
    """``options`` (default: llama-bench's) with memory also stated at the context the
    recipe's Modelfiles set."""
    options = options or BenchOptions()
    return dataclasses.replace(options, memory_contexts=memory_contexts(recipe.ollama.num_ctx))


def bench_fingerprint(layout: BuildLayout, quant: str,
                      options: BenchOptions) -> Fingerprint | None:
    """What a variant's bench summary is made from (None while its GGUF is missing), so
    ``build`` can skip a variant already measured this way."""
    gguf = layout.gguf(quant)
    if not gguf.is_file():
        return None
    settings = asdict(options)
    settings["parallel"] = list(options.parallel)
    settings["memory_contexts"] = list(options.memory_contexts)
    return {"gguf": file_identity(gguf)}, settings


def _bench_summary(model: str, quant: str, gguf: Path, options: BenchOptions,
                   progress: ProgressCallback) -> BenchSummary:
    """Measure one GGUF (in its own process unless ``options.isolate`` is off)."""
    from mathq.convert.gguf_info import read_gguf_summary

    info = read_gguf_summary(gguf)
    measure = bench_isolated if options.isolate else bench_gguf
    result = measure(gguf, options, progress)
    return BenchSummary(
        model=model, quant=quant, gguf=gguf.name, file_size=info.size,
        bits_per_weight=round(info.bits_per_weight, 4), threads=result.threads,
        load_seconds=result.load_seconds, peak_rss_bytes=result.peak_rss_bytes,
        prompt_tokens_per_second=result.prompt,
        generation_tokens_per_second=result.generation,
        throughput_by_parallel=result.throughput_by_parallel,
        imatrix=gguf_imatrix(gguf), n_prompt=options.n_prompt, n_gen=options.n_gen,
        repetitions=options.repetitions, device=result.device,
        gpu_layers=result.gpu_layers, offloadable_layers=result.offloadable_layers,
        vram_bytes=result.vram_bytes, baseline_rss_bytes=result.baseline_rss_bytes,
        llama_buffers=dict(result.llama_buffers), buffers_context=result.buffers_context,
        buffers_by_context={k: dict(v) for k, v in result.buffers_by_context.items()},
        environment=measurement_environment(result.threads))


def run_bench(recipe: Recipe, quants: Sequence[str], options: BenchOptions,
              build_root: Path | None = None,
              progress: ProgressCallback = no_progress) -> list[BenchOutcome]:
    """Measure each variant of ``recipe`` in turn and write its summary."""
    layout = BuildLayout.for_model(recipe.name, build_root)
    for q in quants:  # every variant checked before the first (long) measurement
        gguf = layout.gguf(q)
        if not gguf.is_file():
            raise InputFileError(f"no {q} GGUF at {gguf}",
                                 f"make it first: {making_command(recipe.name, q)}")
        read_gguf_header(gguf)
    outcomes = []
    with removing_new_dirs(layout.bench_dir):  # a run stopped early leaves no empty folder
        for q in quants:
            path = layout.bench_summary(q)
            with output_lock(path):  # two benchmarks at once would also slow each other
                summary = _bench_summary(recipe.name, q, layout.gguf(q), options, progress)
                save_summary(path, summary)
            fingerprint = bench_fingerprint(layout, q, options)
            assert fingerprint is not None  # the GGUF was just measured
            Manifest(layout.manifest).record(layout.key(path), "bench", *fingerprint,
                                             size=path.stat().st_size)
            outcomes.append(BenchOutcome(q, path, summary))
    return outcomes


def kld_fingerprint(layout: BuildLayout, quant: str, options: KldOptions,
                    corpus: Corpus) -> Fingerprint | None:
    """What a variant's KLD summary is made from; None while either model is missing.

    ``build`` compares it with the manifest's record to skip a variant already measured
    against this very reference pass.
    """
    variant, reference = layout.gguf(quant), layout.gguf(options.reference)
    if not (variant.is_file() and reference.is_file()):
        return None
    return ({"gguf": file_identity(variant),
             "reference_key": reference_key(reference, corpus, options)},
            {"reference": options.reference, "n_ctx": options.n_ctx,
             "max_chunks": options.max_chunks, "corpus_sha256": corpus.sha256})


def run_kld(recipe_ref: str | Path, quants: tuple[str, ...] | None = None,
            options: KldOptions | None = None, build_root: Path | None = None,
            progress: ProgressCallback = no_progress) -> KldRun:
    """Measure ``quants`` (default: the recipe's variants) of a recipe's build folder.

    Each summary is written to ``BuildLayout.kld_summary(quant)`` as soon as it is measured
    and recorded in the build manifest.
    """
    options = options or KldOptions()
    recipe = load_recipe(recipe_ref)
    layout = BuildLayout.for_model(recipe.name, build_root)
    reference = get_quant(options.reference).name
    options = dataclasses.replace(options, reference=reference,
                                  corpus=options.corpus or recipe.kld.corpus)
    names = list(recipe.variant_names(",".join(quants) if quants else None))
    if reference in names:
        if quants:
            raise MathqError(f"{reference} is the reference; its divergence from itself is 0",
                             "leave it out of --quant, or pick another --reference")
        names.remove(reference)
    if not names:
        raise MathqError("no variant to measure", "name variants with --quant")
    # every input checked before the (long) reference pass, not after it
    ggufs = [require_gguf(layout, q, f"{q} model") for q in names]
    check_headers([*ggufs, require_gguf(layout, reference, "reference model")])
    corpus = load_corpus(options.corpus)
    with removing_new_dirs(layout.kld_dir):  # a run stopped early leaves no empty folder
        ref = ensure_reference(layout, corpus, options, progress)
        summaries, paths = [], []
        for q in names:
            summary = measure_variant(layout, q, ref, corpus, options, progress)
            out = layout.kld_summary(q)
            save_summary(out, summary)
            fingerprint = kld_fingerprint(layout, q, options, corpus)
            assert fingerprint is not None  # both files were just read
            Manifest(layout.manifest).record(layout.key(out), "kld", *fingerprint,
                                             size=out.stat().st_size)
            summaries.append(summary)
            paths.append(out)
    return KldRun(ref, tuple(summaries), tuple(paths))


def gguf_variant_name(path: Path) -> str:
    """How results name a bare GGUF: its file name without ``.gguf``."""
    return Path(path).name[: -len(".gguf")] if path.name.lower().endswith(".gguf") \
        else Path(path).name


def run_kld_files(variants: Sequence[Path], reference: Path, out_dir: Path,
                  options: KldOptions | None = None,
                  progress: ProgressCallback = no_progress) -> KldRun:
    """:func:`run_kld` for GGUF files outside a build folder (as ``llama-perplexity -m``):
    each of ``variants`` against ``reference``, the reference pass cached in ``out_dir``
    and one ``<name>.json`` summary per variant written there."""
    options = options or KldOptions()
    for path in (reference, *variants):
        if (problem := file_problem(path)) is not None:
            raise InputFileError(f"{path} {problem}", "give the path of an existing GGUF")
    check_headers((reference, *variants))
    corpus = load_corpus(options.corpus)
    ref_name = gguf_variant_name(Path(reference))
    with removing_new_dirs(Path(out_dir)):
        ref = ensure_reference_file(Path(reference), ref_name, out_dir, corpus, options,
                                    progress)
        summaries, paths = [], []
        for path in variants:
            name = gguf_variant_name(Path(path))
            summary = measure_gguf(Path(path), name, name, ref, corpus, options, progress)
            out = Path(out_dir) / f"{name}.json"
            save_summary(out, summary)
            summaries.append(summary)
            paths.append(out)
    return KldRun(ref, tuple(summaries), tuple(paths))


def run_bench_files(paths: Sequence[Path], options: BenchOptions,
                    out_dir: Path | None = None,
                    progress: ProgressCallback = no_progress) -> list[BenchOutcome]:
    """:func:`run_bench` for GGUF files outside a build folder (as ``llama-bench -m``);
    summaries go to ``out_dir/<name>.json`` when it is given."""
    for path in paths:  # every file checked before the first (long) measurement
        if not Path(path).is_file():
            raise InputFileError(f"{path} not found", "give the path of an existing GGUF")
        read_gguf_header(Path(path))
    outcomes = []
    for path in paths:
        path = Path(path)
        name = gguf_variant_name(path)
        summary = _bench_summary(name, name, path, options, progress)
        out = Path(out_dir) / f"{name}.json" if out_dir is not None else path
        if out_dir is not None:
            save_summary(out, summary)
        outcomes.append(BenchOutcome(name, out, summary))
    return outcomes
