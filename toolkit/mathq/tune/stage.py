"""The tune stage's build step: where a tuned file of ``RECIPE|GGUF`` goes, what it is made
from (the fingerprint ``build`` compares), and its record in the build manifest.

For a recipe the tuned GGUF is a variant of the build folder (``<model>-Q4_K_M-tuned.gguf``),
its work files live in ``tune/`` (shared by every budget: a probe measured for one is reused by
the next) and the held-out reference pass is the kld stage's own cache (``kld/``), so
``mathq build`` computes it once for both. For a bare GGUF everything goes beside the input
(or into ``--out-dir``), the work files into ``<input stem>.tune/``.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from mathq.convert.gguf_info import read_gguf_summary
from mathq.datasets.problems import load_problem_set
from mathq.errors import InputFileError, RecipeError, TuneError, shorten
from mathq.fsutil import sha256_file
from mathq.inputs import file_problem
from mathq.layout import BuildLayout
from mathq.manifest import Fingerprint, Manifest, file_identity
from mathq.progress import ProgressCallback, no_progress
from mathq.quantize.core import output_name
from mathq.quantize.stage import DEFAULT_SMOKE_SUITE
from mathq.recipes.quants import tensor_type_bpw
from mathq.recipes.recipe import Recipe, load_recipe
from mathq.tune.probes import PROBE_LAYERS, PROBE_RELATIVE_SE
from mathq.tune.search import TuneJob, TuneOptions, TuneResult, run_tune


def _name(source: Path, options: TuneOptions) -> str:
    """The tuned file's variant name; only a ``--size`` budget needs the model's weight
    count for it (a build plans ``T<bpw>`` names before the BF16 file exists). A ``--bpw``
    budget below every candidate type is refused here, when the tune is planned."""
    _check_bpw(options)
    n_params = read_gguf_summary(source).n_params if options.budget.size is not None else 0
    return options.budget.variant(options.imatrix is not None, n_params).name


def _check_bpw(options: TuneOptions) -> None:
    """Refuse bits per weight below the smallest candidate type's: every tensor at that
    type, and the norms at 32 bits, is already more (the exact check, against the model's
    tensors, runs when the tune starts)."""
    bpw = options.budget.bits_per_weight(0) if options.budget.size is None else None
    assert options.types is not None  # with_defaults ran
    smallest = min(options.types, key=tensor_type_bpw)
    if bpw is not None and bpw < tensor_type_bpw(smallest):
        raise TuneError(f"a budget of {bpw:g} bits per weight is below the smallest "
                        "candidate type "
                        f"({smallest}, {tensor_type_bpw(smallest):.4g} bits per weight)",
                        "raise the budget or add smaller types to --types")


def resolve_tune(ref: str, options: TuneOptions, build_root: Path | None = None,
                 out_dir: Path | None = None, smoke_suite: str | None = None
                 ) -> tuple[TuneJob, TuneOptions, BuildLayout | None]:
    """A ``.gguf`` path is tuned where it lies; anything else is a recipe whose BF16 file is
    tuned into its build folder, measured on the recipe's ``[kld] corpus``."""
    path = Path(ref)
    if path.suffix.lower() == ".gguf" or (path.is_file() and not ref.endswith(".toml")):
        if (problem := file_problem(path)) is not None:
            raise InputFileError(f"model file {path} {problem}",
                                 "give a BF16 GGUF path or a recipe name (see `mathq recipes`)")
        options = options.with_defaults()
        name = _name(path, options)
        dest = (out_dir or path.parent) / output_name(path, name)
        work = dest.parent / f"{path.stem}.tune"
        suite = smoke_suite or DEFAULT_SMOKE_SUITE
        match = options.budget.match
        return (TuneJob(source=path, name=name, dest=dest, work_dir=work, heldout_cache=work,
                        smoke=lambda: load_problem_set(suite),
                        stock=dest.with_name(output_name(path, match)) if match else None),
                options, None)
    recipe = load_recipe(ref)
    layout = BuildLayout.for_model(recipe.name, build_root)
    if not layout.gguf("BF16").is_file():
        raise InputFileError(f"{layout.gguf('BF16')} not found",
                             f"run `mathq convert {ref}` first")
    job, options = recipe_tune_job(recipe, layout, options, smoke_suite)
    return job, options, layout


def recipe_tune_job(recipe: Recipe, layout: BuildLayout, options: TuneOptions,
                    smoke_suite: str | None = None) -> tuple[TuneJob, TuneOptions]:
    """The tune of a recipe's BF16 file (which a build may not have made yet for a
    ``--match`` budget) into its build folder, measured on its ``[kld] corpus``, with its
    ``[tune]`` calibration and types unless ``options`` name their own."""
    source = layout.gguf("BF16")
    if options.kld.corpus is None:
        options = replace(options, kld=replace(options.kld, corpus=recipe.kld.corpus))
    _check_calibration_set(recipe)
    options = options.with_defaults(recipe.tune.calibration, recipe.tune.types)
    name = _name(source, options)
    suite = smoke_suite or recipe.smoke.suite
    return (TuneJob(source=source, name=name, dest=layout.gguf(name),
                    work_dir=layout.root / "tune", heldout_cache=layout.kld_dir,
                    smoke=lambda: load_problem_set(suite), prompt=recipe.prompt,
                    stock=layout.gguf(options.budget.match) if options.budget.match else None),
            options)


def _check_calibration_set(recipe: Recipe) -> None:
    """A recipe's ``[tune] calibration`` that is no file must name a calibration set:
    refused when a tune is planned (a build's dry run included), not after its BF16 file
    and stock variants were made."""
    from mathq.quantize.calibration import CALIBRATION_SETS, get_calibration_set

    name = recipe.tune.calibration
    if name is None or Path(name).is_absolute() or get_calibration_set(name) is not None:
        return
    raise RecipeError(f"{recipe.path}: [tune.calibration] {shorten(repr(name), 60)} is neither "
                      "a calibration set nor a .jsonl, .txt or .md file",
                      f"name a file relative to the recipe, or a set: "
                      f"{', '.join(s.name for s in CALIBRATION_SETS)}",
                      field="tune.calibration")


def tune_fingerprint(job: TuneJob, options: TuneOptions) -> Fingerprint | None:
    """What a tuned file is made from; None while the BF16 file or the matrix is missing."""
    if not job.source.is_file() or (options.imatrix and not options.imatrix.is_file()):
        return None
    inputs = {"source": file_identity(job.source),
              "imatrix_sha256": sha256_file(options.imatrix) if options.imatrix else None}
    settings = {"budget": asdict(options.budget), "types": list(options.types),
                "calibration": options.calibration, "probe_chunks": options.probe_chunks,
                "seed": options.seed, "n_ctx": options.kld.n_ctx,
                "probe_layers": PROBE_LAYERS, "probe_se": PROBE_RELATIVE_SE,
                "corpus": str(options.kld.corpus) if options.kld.corpus else None}
    return inputs, settings


def tune_and_record(job: TuneJob, options: TuneOptions, layout: BuildLayout | None,
                    progress: ProgressCallback = no_progress) -> TuneResult:
    """Run the search; in a build folder, record the file with the search's figures."""
    result = run_tune(job, options, progress)
    if layout is not None:
        fingerprint = tune_fingerprint(job, options)
        assert fingerprint is not None  # both were just read
        Manifest(layout.manifest).record(
            layout.key(result.path), "tune", *fingerprint, size=result.size,
            result={"budget_bytes": result.budget, "stock_size": result.stock_size,
                    "predicted_kld": result.predicted_kld,
                    "kld": result.kld.mean_kld,
                    "kld_err": result.kld.mean_kld_err, "seconds": result.seconds,
                    "overrides": layout.key(result.overrides),
                    "record": layout.key(result.record)})
        _record_kld(layout, result, options)
    return result


def _record_kld(layout: BuildLayout, result: TuneResult, options: TuneOptions) -> None:
    """The tuned file's held-out measurement is the kld stage's measurement of that
    variant (the same reference pass and text): saved and recorded as ``mathq kld`` does,
    so ``build --tune`` measures the file once (at 7B, 8.5 minutes a file), and the report
    has it after a lone ``mathq tune``."""
    from mathq.datasets.corpus import load_corpus
    from mathq.evaluate.stage import record_kld_summary

    record_kld_summary(layout, result.name, replace(result.kld, model=layout.name),
                       options.kld, load_corpus(options.kld.corpus))
