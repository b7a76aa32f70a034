"""The evaluate stage's build steps: smoke, bench and kld over ``build/<model>/``.

Each step has a fingerprint function (what its summary is made from, so ``build`` can skip
a finished measurement) and a ``run_*`` entry point that reads the recipe's GGUFs from the
build folder, measures with the cores (:mod:`mathq.evaluate.smoke`,
:mod:`mathq.evaluate.bench`, :mod:`mathq.evaluate.kld.measure`), writes the summaries and
records them in the manifest. The ``run_*_files`` entry points measure GGUF files outside a
build folder the same way and record nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mathq.convert.gguf_info import gguf_imatrix, read_gguf_header
from mathq.datasets.corpus import Corpus, load_corpus
from mathq.datasets.problems import ProblemSet
from mathq.errors import InputFileError, MathqError
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
    SmokeFiles,
    SmokeOptions,
    SmokeOutcome,
    SmokeTarget,
    ollama_model_name,
    run_smoke_target,
    select_smoke_problems,
)
from mathq.evaluate.summaries import BenchSummary, KldSummary, save_summary
from mathq.fsutil import Debris, output_lock, removing_new_dirs
from mathq.inputs import file_problem
from mathq.layout import BuildLayout
from mathq.manifest import Fingerprint, Manifest, file_identity
from mathq.progress import ProgressCallback, no_progress
from mathq.recipes.quants import get_quant, making_command
from mathq.recipes.recipe import Recipe, load_recipe


def _files(layout: BuildLayout, quant: str, out_dir: Path | None) -> SmokeFiles:
    files = (layout.smoke_results(quant), layout.smoke_settings(quant),
             layout.smoke_summary(quant))
    if out_dir is not None:
        files = tuple(Path(out_dir) / f.name for f in files)
    return SmokeFiles(*files)


def _draft_references(layout: BuildLayout, options: SmokeOptions,
                      results: Path) -> tuple[Path, ...]:
    """Where a variant's draft reference may be: ``options.draft_reference``, else BF16's
    results beside this run's (``--out-dir``), then in the build folder."""
    if options.draft_reference is not None:
        return (options.draft_reference,)
    bf16 = layout.smoke_results("BF16")
    return (results.with_name(bf16.name), bf16)


@dataclass(frozen=True)
class _ManifestRecord:
    """The manifest's record of a smoke summary in the build folder, made from
    ``fingerprint``, with its results file (``results``, a key), which the report reads."""

    manifest: Manifest
    key: str
    fingerprint: Fingerprint
    results: str

    def forget(self) -> None:
        self.manifest.forget(self.key)

    def record(self, summary: Path) -> None:
        self.manifest.record(self.key, "smoke", *self.fingerprint,
                             size=summary.stat().st_size, outputs=(self.results,))


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
    """Smoke-test the build folder's ``quant`` (in process, or its Ollama tag, or a
    server's model) with :func:`mathq.evaluate.smoke.run_smoke_target`; an in-process
    summary in the build folder is recorded in the manifest."""
    spec = options.backend
    files = _files(layout, quant, options.out_dir)
    gguf = layout.gguf(quant) if spec.kind == "llama" else None
    if gguf is not None and not gguf.is_file():
        raise InputFileError(f"no {quant} GGUF at {gguf}",
                             f"make it first: {making_command(recipe.name, quant)}")
    target = SmokeTarget(
        quant=quant, files=files, gguf=gguf,
        ollama_model=(ollama_model_name(recipe, quant, spec.model) if spec.kind == "ollama"
                      else None),
        draft_references=_draft_references(layout, options, files.results))
    fingerprint = smoke_fingerprint(recipe, quant, options, layout)
    if fingerprint is None:
        return run_smoke_target(recipe, target, problems, options, progress)
    record = _ManifestRecord(Manifest(layout.manifest), layout.key(files.summary), fingerprint,
                             layout.key(files.results))
    # The run removes its own files if it fails; the manifest's lock, if it made it, too.
    debris = Debris(files.results.parent,
                    layout.manifest.with_name(layout.manifest.name + ".lock"))
    try:
        return run_smoke_target(recipe, target, problems, options, progress, record)
    except BaseException:
        debris.remove()
        raise


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


def record_kld_summary(layout: BuildLayout, quant: str, summary: KldSummary,
                       options: KldOptions, corpus: Corpus) -> Path:
    """Save a variant's KLD summary where the kld stage keeps it and record it in the build
    manifest with its fingerprint (what ``build`` compares to skip measuring it again)."""
    out = layout.kld_summary(quant)
    save_summary(out, summary)
    fingerprint = kld_fingerprint(layout, quant, options, corpus)
    assert fingerprint is not None  # both files were just read
    Manifest(layout.manifest).record(layout.key(out), "kld", *fingerprint,
                                     size=out.stat().st_size)
    return out


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
            out = record_kld_summary(layout, q, summary, options, corpus)
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


def run_smoke_files(paths: Sequence[Path], recipe: Recipe, options: SmokeOptions,
                    build_root: Path | None = None,
                    progress: ProgressCallback = no_progress) -> list[SmokeOutcome]:
    """:func:`run_smoke` for GGUF files outside a build folder (as ``llama-bench -m``),
    in process with ``recipe``'s prompt format, problems and token limit: each named after
    its file, its results and summary in ``options.out_dir`` (default: a ``smoke/``
    folder beside the file). Nothing is recorded in the build folder (``build_root``),
    but BF16's results there are drafted from when the output folder has none."""
    for path in paths:  # every file checked before the first (long) run
        if not Path(path).is_file():
            raise InputFileError(f"{path} not found", "give the path of an existing GGUF")
    layout = BuildLayout.for_model(recipe.name, build_root)
    problems = select_smoke_problems(recipe, options, progress)
    outcomes = []
    for path in paths:
        path = Path(path)
        file_options = dataclasses.replace(options,
                                           out_dir=options.out_dir or path.parent / "smoke")
        name = gguf_variant_name(path)
        files = _files(layout, name, file_options.out_dir)
        target = SmokeTarget(quant=name, files=files, gguf=path,
                             draft_references=_draft_references(layout, file_options,
                                                                files.results))
        outcomes.append(run_smoke_target(recipe, target, problems, file_options, progress))
    return outcomes
