"""``mathq build``: chain the stages into one resumable run over ``build/<model>/``.

A build is a list of :class:`Step` s. Each step knows its artifact, the manifest key its
stage records, and how to compute *now* the inputs and settings that artifact must have
been made from. A step whose artifact exists with a matching manifest record is skipped, so
a rerun redoes only what changed, and a step killed half-way (its output still a
``.partial``, its record not written) simply runs again. The disk space the whole plan
needs is checked before the first step starts.

With ``imatrix`` set, the build also computes the recipe's importance matrix (one step, the
imatrix stage with its defaults) and makes a ``<QUANT>-imat`` variant of every requested
type the matrix helps (:attr:`mathq.recipes.quants.QuantType.imatrix_helps`), beside the plain one,
so every measurement and the report can compare the two.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mathq.errors import DiskSpaceError, MathqError, MissingImatrixError
from mathq.fsutil import format_bytes, free_bytes
from mathq.layout import BuildLayout
from mathq.llama.runtime import PARALLEL_AUTO
from mathq.manifest import Fingerprint, Manifest
from mathq.progress import ProgressCallback, no_progress
from mathq.quantize.calibration import DEFAULT_CALIBRATION
from mathq.recipes.quants import QuantType, Variant, get_quant
from mathq.recipes.recipe import Recipe

if TYPE_CHECKING:
    from mathq.download.fetch import CheckpointPlan
    from mathq.evaluate.kld.measure import KldOptions


@dataclass(frozen=True)
class BuildOptions:
    """What to build: the variants, and how much of the measuring to do.

    ``measure`` False stops after the files (GGUFs and Modelfiles); ``skip_smoke`` leaves
    out only the smoke test, the longest measurement. ``n`` and ``parallel`` are the smoke
    test's problem count (None: the recipe's) and batch width (0: ``--parallel auto``,
    see :func:`mathq.llama.devices.choose_parallel`). ``imatrix`` adds the
    importance matrix, computed on ``calibration`` (see :func:`build_variants`).
    ``draft`` lets each variant's smoke test draft from BF16's answers, which are smoke-tested
    first (:mod:`mathq.llama.drafts`). ``calibration`` None is the imatrix stage's default
    text for the matrix and the recipe's ``[tune]`` calibration for the tuned variants.
    """

    quants: tuple[QuantType, ...]
    n: int | None = None
    skip_smoke: bool = False
    measure: bool = True
    parallel: int = PARALLEL_AUTO
    imatrix: bool = False
    calibration: str | None = None
    draft: bool = True
    tune: tuple[Variant, ...] = ()


def tuned_variants(options: BuildOptions) -> tuple[Variant, ...]:
    """The ``mathq tune`` variants ``tune`` asks for (``<QUANT>-tuned``, ``T<bpw>``), and
    with ``imatrix`` also their ``-imat`` siblings where the matrix helps."""
    variants: list[Variant] = []
    for v in options.tune:
        variants.append(v)
        if options.imatrix and v.quant.imatrix_helps:
            variants.append(replace(v, imatrix=True))
    return tuple(variants)


def build_variants(options: BuildOptions) -> tuple[Variant, ...]:
    """The variants a build makes, in ``options.quants`` order.

    Without ``imatrix``, each type plain (a type that cannot be made without a matrix is
    refused). With it, each type plain (unless it requires a matrix) and, when the matrix
    helps it, also with the matrix.
    """
    variants: list[Variant] = []
    for q in options.quants:
        if q.requires_imatrix and not options.imatrix:
            raise MissingImatrixError(f"{q.name} needs an importance matrix",
                                      "add --imatrix: the build computes one and makes "
                                      f"{q.name}-imat")
        if not q.requires_imatrix:
            variants.append(Variant(q))
        if options.imatrix and (q.imatrix_helps or q.requires_imatrix):
            variants.append(Variant(q, imatrix=True))
    return tuple(variants)


@dataclass(frozen=True)
class Step:
    """One unit of a build.

    ``fingerprint`` returns the (inputs, settings) the artifact must have been made from,
    or None when that cannot be known before the step runs (then the step always runs).
    ``run`` does the work; stages record their artifacts in the manifest themselves, with
    the same fingerprint functions the build uses here. ``needs`` gives the disk the step
    may take at its high-water mark; it is asked only of steps that will run (an exact
    size may cost a llama.cpp dry run).
    """

    name: str
    stage: str
    artifact: Path
    key: str
    needs: Callable[[], int]
    run: Callable[[ProgressCallback], object]
    fingerprint: Callable[[], Fingerprint | None] = lambda: None
    # Artifacts of earlier steps this one reads: when one of them is due to be remade,
    # so is this step, even though its fingerprint still matches the old file.
    inputs: tuple[Path, ...] = ()

    @property
    def needs_bytes(self) -> int:
        return self.needs()


@dataclass(frozen=True)
class StepOutcome:
    """What happened to one step; for a plan, also the disk it is checked for."""

    name: str
    status: str  # "done", "skipped", "planned"
    artifact: Path
    seconds: float = 0.0
    needs_bytes: int = 0


@dataclass(frozen=True)
class BuildResult:
    """The outcome of every step, in order."""

    model: str
    root: Path
    steps: tuple[StepOutcome, ...] = field(default_factory=tuple)


def estimate_params(config: dict[str, Any]) -> int:
    """Weights of a LLaMA checkpoint from its config.json (embeddings, layers, head)."""
    h, ff, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    attn = 2 * h * h + 2 * h * (h * kv // heads)
    return 2 * config["vocab_size"] * h + n * (attn + 3 * h * ff + 2 * h) + h


class FileSizes:
    """The sizes of the GGUF files a build writes, by llama.cpp's own arithmetic.

    With the checkpoint here, exact: the BF16 file's skeleton (its header and index, data
    left a hole, :func:`mathq.convert.converter.write_skeleton`), then llama.cpp's quantize
    dry run of each variant on it (:func:`mathq.quantize.core.quantized_size`): the mixes'
    wider tensors, the tokenizer's metadata and the padding included, to within 64 KiB.
    Computed once, on first use (a second or so at 7B). Before the download, estimated from
    the Hub's weight sizes, and not kept: asked again after the download, they are exact.
    """

    def __init__(self, recipe: Recipe, hf_dir: Path, n_params: int,
                 variants: tuple[Variant, ...]) -> None:
        self._recipe, self._hf_dir, self._n_params = recipe, hf_dir, n_params
        self._variants = variants
        self._exact: dict[str, int] | None = None

    def bf16(self) -> int:
        """Bytes of the BF16 file."""
        return self._sizes()["BF16"]

    def variant(self, variant: Variant) -> int:
        """Bytes of a variant's file: a ``-tuned`` one takes its stock type's size, a
        ``T<bpw>`` one its budget (over every weight, as the tune counts it, plus 1 %: the
        weights are counted from config.json here, from the BF16 file there)."""
        if variant.bpw is not None:
            return int(variant.bpw * self._n_params / 8 * 1.01)
        return self._sizes()[variant.quant.name]

    def _sizes(self) -> dict[str, int]:
        if self._exact is not None:
            return self._exact
        if not (self._hf_dir / "config.json").is_file():
            # Two bytes a weight; the mixes keep some tensors wider than the nominal type.
            estimate = {q.name: int(self._n_params * q.bpw / 8 * 1.15)
                        for q in {v.quant for v in self._variants if v.bpw is None}}
            return {"BF16": 2 * self._n_params, **estimate}
        self._exact = self._measure()
        return self._exact

    def _measure(self) -> dict[str, int]:
        import tempfile

        from mathq.convert.converter import ConvertOptions, write_skeleton
        from mathq.convert.stage import recipe_convert_options
        from mathq.quantize.core import QuantizeOptions, quantized_size

        with tempfile.TemporaryDirectory(prefix="mathq-plan-") as tmp:
            skeleton = Path(tmp) / "skeleton-BF16.gguf"
            sizes = {"BF16": write_skeleton(
                self._hf_dir, skeleton, recipe_convert_options(self._recipe, ConvertOptions()))}
            for quant in {v.quant for v in self._variants if v.bpw is None}:
                sizes[quant.name] = quantized_size(skeleton, QuantizeOptions(quant=quant))
        return sizes


def is_current(step: Step, manifest: Manifest) -> bool:
    """True when the artifact exists and was made from what the step would use now."""
    if not step.artifact.exists():
        return False
    record = manifest.get(step.key)
    if record is None:
        return False
    fp = step.fingerprint()
    return (fp is not None and record.same_recipe(*fp)
            and record.outputs_intact(manifest.path.parent))


def due_steps(steps: list[Step], manifest: Manifest) -> set[str]:
    """Names of the steps a build would run: those not current, and those reading the
    artifact of a step that runs before them."""
    due: set[str] = set()
    remade: set[Path] = set()
    for step in steps:
        if not is_current(step, manifest) or remade.intersection(step.inputs):
            due.add(step.name)
            remade.add(step.artifact)
    return due


def check_disk(steps: list[Step], manifest: Manifest, root: Path) -> int:
    """Raise DiskSpaceError unless every step still to run fits; return the bytes needed."""
    due = due_steps(steps, manifest)
    needed = sum(s.needs_bytes for s in steps if s.name in due)
    free = free_bytes(root)
    if needed > free:
        raise DiskSpaceError(
            f"this build needs about {format_bytes(needed)} more; {format_bytes(free)} is free "
            f"under {root}", "free some space, build fewer variants, or use --build-dir")
    return needed


def run_steps(model: str, root: Path, steps: list[Step], manifest: Manifest,
              progress: ProgressCallback = no_progress,
              on_step: Callable[[StepOutcome], None] = lambda _o: None) -> BuildResult:
    """Run every step that is not current, in order, reporting each outcome."""
    import time

    check_disk(steps, manifest, root)
    outcomes = []
    for i, step in enumerate(steps):
        if is_current(step, manifest):
            outcome = StepOutcome(step.name, "skipped", step.artifact)
        else:
            started = time.perf_counter()
            step.run(progress)
            if step.stage == "download":  # the sizes were the Hub's; now they are exact
                check_disk(steps[i + 1:], manifest, root)
            outcome = StepOutcome(step.name, "done", step.artifact,
                                  time.perf_counter() - started)
        outcomes.append(outcome)
        on_step(outcome)
    return BuildResult(model, root, tuple(outcomes))


def plan_outcomes(steps: list[Step], manifest: Manifest) -> list[StepOutcome]:
    """For ``--dry-run``: which steps would run and which are already current."""
    due = due_steps(steps, manifest)
    return [StepOutcome(s.name, "planned", s.artifact, needs_bytes=s.needs_bytes)
            if s.name in due else StepOutcome(s.name, "skipped", s.artifact) for s in steps]


def _read_config(hf_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def plan_build(recipe: Recipe, options: BuildOptions, build_root: Path | None = None) -> list[Step]:
    """The steps of a build of ``recipe``, in order."""
    from mathq.convert.converter import ConvertOptions
    from mathq.convert.stage import checkpoint_inputs, convert_recipe, recipe_hf_dir
    from mathq.download.stage import download_recipe
    from mathq.quantize.core import QuantizeOptions
    from mathq.quantize.stage import QuantizeJob, quantize_fingerprint, quantize_variants

    layout = BuildLayout.for_model(recipe.name, build_root)
    hf_dir = recipe_hf_dir(recipe, layout)
    config = _read_config(hf_dir)
    n_params = estimate_params(config) if config else 0
    download_bytes = 0
    if recipe.model.hf_repo is not None and config is None:
        hub = _hub_plan(recipe, layout)
        if hub is not None:  # bf16 weights: two bytes a parameter
            n_params, download_bytes = hub.weights_bytes // 2, hub.missing_bytes
    steps: list[Step] = []
    if recipe.model.hf_repo is not None:
        steps.append(Step(
            "download", "download", layout.hf_dir, "hf", lambda: download_bytes,
            lambda p: download_recipe(recipe, build_root=build_root, progress=p),
            # The Hub may have moved the revision: offline, a finished download is current.
            lambda: _offline_download_fingerprint(layout)))
    bf16 = layout.gguf("BF16")
    pre = recipe.model.pre_tokenizer
    variants = build_variants(options)
    sizes = FileSizes(recipe, hf_dir, n_params, variants + tuned_variants(options))
    steps.append(Step(
        "convert", "convert", bf16, bf16.name, sizes.bf16,
        lambda p: convert_recipe(recipe, ConvertOptions(), build_root, progress=p),
        lambda: (checkpoint_inputs(hf_dir), {"outtype": "bf16", "pre_tokenizer": pre,
                                              "verified": True})
        if hf_dir.is_dir() else None))
    if any(v.imatrix for v in variants):
        steps.append(_imatrix_step(recipe, options, layout))
    job = QuantizeJob(source=bf16, default_quants=options.quants, layout=layout)
    for v in variants:
        opts = QuantizeOptions(quant=v.quant, imatrix=layout.imatrix if v.imatrix else None)
        out = layout.gguf(v.name)
        steps.append(Step(
            f"quantize {v.name}", "quantize", out, out.name, lambda v=v: sizes.variant(v),
            lambda p, o=opts: quantize_variants(job, [o], None, p),
            lambda o=opts: quantize_fingerprint(bf16, o),
            (bf16, layout.imatrix) if v.imatrix else (bf16,)))
    tuned = tuned_variants(options)
    steps += [_tune_step(recipe, options, layout, v, sizes) for v in tuned]
    steps += _modelfile_steps(recipe, variants, layout, build_root)
    if options.measure:
        steps += _measure_steps(recipe, options, variants + tuned, layout, build_root,
                                config["vocab_size"] if config else 0)
    return steps


def _tune_step(recipe: Recipe, options: BuildOptions, layout: BuildLayout, variant: Variant,
               sizes: FileSizes) -> Step:
    """``mathq tune --match QUANT`` into the build folder, probes calibrated on the build's
    ``calibration`` text; after the quantize steps, so a built stock file sets the budget."""
    from mathq.evaluate.kld.measure import KldOptions
    from mathq.tune.search import Budget, TuneOptions
    from mathq.tune.stage import recipe_tune_job, tune_and_record, tune_fingerprint

    imatrix = layout.imatrix if variant.imatrix else None
    job, opts = recipe_tune_job(recipe, layout, TuneOptions(
        Budget.of(variant), imatrix=imatrix, calibration=options.calibration,
        kld=KldOptions(corpus=recipe.kld.corpus)))
    bf16 = layout.gguf("BF16")
    # the tuned file (the stock file's size), and the probes' copy of BF16 in shards with one
    # probe's group shard beside it (up to 8 layers of one role at the probe type: a quarter
    # of BF16 bounds it unless one role is most of the model; 1.3 % of it at 7B)
    return Step(f"tune {variant.name}", "tune", job.dest, job.dest.name,
                lambda: sizes.variant(variant) + sizes.bf16() * 5 // 4,
                lambda p: tune_and_record(job, opts, layout, p),
                lambda: tune_fingerprint(job, opts),
                (bf16, imatrix) if imatrix else (bf16,))


def _imatrix_step(recipe: Recipe, options: BuildOptions, layout: BuildLayout) -> Step:
    """The recipe's importance matrix from its BF16 model, with the imatrix stage's
    defaults (100 chunks of 512 tokens, the recipe's prompt format, no smoke problem)."""
    from mathq.quantize.imatrix import ImatrixOptions
    from mathq.quantize.stage import imatrix_fingerprint, recipe_imatrix_job, run_imatrix

    job = recipe_imatrix_job(recipe, layout)
    opts = ImatrixOptions()
    calibration = options.calibration or DEFAULT_CALIBRATION
    # A matrix holds one float per input column of each weight: a few MB for a 7B model.
    return Step("imatrix", "imatrix", layout.imatrix, layout.key(layout.imatrix),
                lambda: 64 << 20,
                lambda p: run_imatrix(job, calibration, opts, progress=p),
                lambda: imatrix_fingerprint(job, calibration, opts),
                (job.model,))


def _modelfile_steps(recipe: Recipe, variants: tuple[Variant, ...], layout: BuildLayout,
                     build_root: Path | None) -> list[Step]:
    """One step writing the Modelfiles of the recipe's Ollama tags for the built variants."""
    from mathq.modelfile.stage import modelfiles_fingerprint, write_modelfiles

    names = {v.name for v in variants}
    tags = tuple(tag for tag, variant in recipe.ollama.tags if variant in names)
    if not tags:
        return []
    return [Step("modelfiles", "modelfile", layout.modelfiles_dir, layout.key(
        layout.modelfiles_dir), lambda: 0,
        lambda p: write_modelfiles(recipe, None, build_root, tags, p),
        lambda: modelfiles_fingerprint(recipe, tags))]


def _reference_bytes(layout: BuildLayout, kld: KldOptions, n_vocab: int) -> int:
    """Disk for the KLD reference pass, unless it is cached for the reference file as it is
    now (52 MB a chunk at 7B: gigabytes for a long corpus). 0 while the vocabulary is
    unknown (a plan made before the download): the kld stage then checks it itself."""
    from mathq.datasets.corpus import load_corpus
    from mathq.evaluate.kld.measure import (
        reference_bytes_bound,
        reference_cache_path,
        reference_key,
    )

    corpus = load_corpus(kld.corpus)
    reference = layout.gguf(kld.reference)
    if reference.is_file() and reference_cache_path(
            layout, kld.reference, reference_key(reference, corpus, kld)).is_file():
        return 0
    return reference_bytes_bound(corpus, n_vocab, kld) if n_vocab else 0


def _measure_steps(recipe: Recipe, options: BuildOptions, variants: tuple[Variant, ...],
                   layout: BuildLayout, build_root: Path | None, n_vocab: int) -> list[Step]:
    """Smoke tests, speed, KL divergence and the report, each with its stage's fingerprint."""
    from mathq.datasets.corpus import load_corpus
    from mathq.evaluate.backends.base import BackendSpec
    from mathq.evaluate.kld.measure import KldOptions
    from mathq.evaluate.smoke import SmokeOptions, select_smoke_problems
    from mathq.evaluate.stage import (
        bench_fingerprint,
        kld_fingerprint,
        recipe_bench_options,
        run_bench,
        run_kld,
        smoke_fingerprint,
        smoke_variant,
    )
    from mathq.report.stage import ReportOptions, build_report, report_fingerprint

    # The full-precision model is measured too: it is the reference the report compares
    # every variant's accuracy with, and its KLD is zero by definition.
    names = list(dict.fromkeys(["BF16", *(v.name for v in variants)]))
    steps: list[Step] = []
    if not options.skip_smoke:
        # Results of an interrupted run of the same GGUF are resumed; results of a GGUF
        # that has since been rebuilt are discarded.
        smoke = SmokeOptions(n=options.n, restart_if_changed=True,
                             backend=BackendSpec(parallel=options.parallel,
                                                 draft=options.draft))
        for q in names:
            steps.append(Step(
                f"smoke {q}", "smoke", layout.smoke_summary(q),
                layout.key(layout.smoke_summary(q)), lambda: 1 << 20,
                lambda p, q=q: smoke_variant(recipe, q, select_smoke_problems(recipe, smoke, p),
                                             layout, smoke, p),
                lambda q=q: smoke_fingerprint(recipe, q, smoke, layout), (layout.gguf(q),)))
    bench = recipe_bench_options(recipe)
    for q in names:
        steps.append(Step(
            f"bench {q}", "bench", layout.bench_summary(q), layout.key(layout.bench_summary(q)),
            lambda: 0, lambda p, q=q: run_bench(recipe, [q], bench, build_root, p),
            lambda q=q: bench_fingerprint(layout, q, bench), (layout.gguf(q),)))
    kld = KldOptions(corpus=recipe.kld.corpus)
    first = True  # the first kld step computes the reference pass for all
    for q in names:
        if q == kld.reference:
            continue
        steps.append(Step(
            f"kld {q}", "kld", layout.kld_summary(q), layout.key(layout.kld_summary(q)),
            (lambda: _reference_bytes(layout, kld, n_vocab)) if first else (lambda: 0),
            lambda p, q=q: run_kld(recipe.path, (q,), kld, build_root, p),
            lambda q=q: kld_fingerprint(layout, q, kld, load_corpus(kld.corpus)),
            (layout.gguf(q), layout.gguf(kld.reference))))
        first = False
    report = layout.report_dir / "report.html"
    steps.append(Step(
        "report", "report", report, layout.key(report), lambda: 0,
        lambda p: build_report(recipe.path, ReportOptions(), build_root, p),
        lambda: report_fingerprint(recipe, layout), tuple(s.artifact for s in steps)))
    return steps


def _hub_plan(recipe: Recipe, layout: BuildLayout) -> CheckpointPlan | None:
    """The checkpoint's sizes from the Hub's file list, so a plan made before the download
    has sizes; None offline or when the Hub cannot be asked (the download step will say
    why, with its own error)."""
    from mathq.download.fetch import plan_download
    from mathq.download.stage import request_for_recipe

    if os.environ.get("HF_HUB_OFFLINE"):
        return None
    try:
        return plan_download(request_for_recipe(recipe), layout.hf_dir)
    except MathqError:
        return None


def _offline_download_fingerprint(layout: BuildLayout) -> Fingerprint | None:
    if not os.environ.get("HF_HUB_OFFLINE"):
        return None
    record = Manifest(layout.manifest).get("hf")
    return (record.inputs, record.settings) if record else None


def default_options(recipe: Recipe, quants: str | None) -> BuildOptions:
    """The recipe's variants, or the ``--quant`` list; the recipe's tuned variants."""
    from mathq.recipes.quants import parse_quant_list

    chosen = (parse_quant_list(quants) if quants is not None
              else tuple(get_quant(q) for q in recipe.quants.variants))
    return BuildOptions(quants=chosen, tune=recipe.tune.budgets)
