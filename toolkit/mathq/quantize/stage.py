"""The quantize stage's build steps: quantized variants and the importance matrix.

Both steps resolve ``RECIPE|GGUF`` into an input file and output names and record what they
made in the build manifest (with the fingerprint ``build`` compares) when the input is a
recipe's build folder.

:mod:`mathq.quantize.core` quantizes one file and :mod:`mathq.quantize.imatrix` computes a
matrix; this module runs several variants and the recipe's matrix step. A variant quantized
with an importance matrix is named ``<QUANT>-imat`` (:class:`mathq.recipes.quants.Variant`),
so it never takes the plain variant's place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from mathq.convert.gguf_info import read_gguf_header
from mathq.datasets.problems import ProblemSet, load_problem_set
from mathq.errors import GGUFError, MissingImatrixError
from mathq.fsutil import (
    check_writable,
    output_lock,
    removing_new_dirs,
    sha256_file,
    write_text_atomic,
)
from mathq.inputs import file_problem
from mathq.layout import BuildLayout
from mathq.manifest import Fingerprint, Manifest
from mathq.progress import ProgressCallback, no_progress
from mathq.quantize.calibration import CalibrationText, build_calibration_text, load_calibration
from mathq.quantize.core import (
    QuantizeOptions,
    QuantizeResult,
    output_name,
    preflight,
    quantize_gguf,
)
from mathq.quantize.imatrix import INPUT_TYPES, ImatrixOptions, ImatrixResult, compute_imatrix
from mathq.quantize.imatrix_file import load_imatrix
from mathq.recipes.prompt import PromptSpec
from mathq.recipes.quants import QuantType, UnknownQuantError, Variant, get_quant
from mathq.recipes.recipe import Recipe, load_recipe


@dataclass(frozen=True)
class QuantizeJob:
    """The input file, where outputs go, and the build folder (None for a bare GGUF)."""

    source: Path
    default_quants: tuple[QuantType, ...]
    layout: BuildLayout | None = None


def resolve_quantize_input(ref: str, build_root: Path | None = None) -> QuantizeJob:
    """A ``.gguf`` path is used as is; anything else is a recipe whose BF16 file is used."""
    path = Path(ref)
    if path.suffix.lower() == ".gguf" or (path.is_file() and not ref.endswith(".toml")):
        return QuantizeJob(source=path, default_quants=(get_quant("Q4_K_M"),))
    recipe = load_recipe(ref)
    layout = BuildLayout.for_model(recipe.name, build_root)
    return QuantizeJob(source=layout.gguf("BF16"),
                       default_quants=tuple(get_quant(q) for q in recipe.quants.variants),
                       layout=layout)


def variant_of(opts: QuantizeOptions) -> Variant:
    """The variant a quantization makes: its type, and whether a matrix was used."""
    return Variant(opts.quant, opts.imatrix is not None)


def variant_imatrix(variant: Variant, job: QuantizeJob, given: Path | None,
                    ref: str) -> Path | None:
    """The matrix to quantize ``variant`` with: the one given (which makes any variant an
    ``-imat`` one), else for an ``-imat`` name the build folder's own (``mathq imatrix``).
    A ``-tuned`` name is refused: its types are chosen by ``mathq tune``, not a mix."""
    if variant.tuned:
        raise UnknownQuantError(f"{variant.name} is made by `mathq tune`, not by quantize",
                                f"run `mathq tune {ref} --match {variant.quant.name}`")
    if given is not None or not variant.imatrix:
        return given
    if job.layout is None or not job.layout.imatrix.is_file():
        hint = (f"run `mathq imatrix {ref}` first, or pass --imatrix FILE"
                if job.layout is not None else "pass --imatrix FILE")
        raise MissingImatrixError(f"{variant.name} needs an importance matrix", hint)
    return job.layout.imatrix


def quantize_variants(job: QuantizeJob, options: list[QuantizeOptions],
                      out_dir: Path | None = None,
                      progress: ProgressCallback = no_progress) -> list[QuantizeResult]:
    """Quantize ``job.source`` once per options entry, in order; record each in the manifest."""
    folder = out_dir or (job.layout.root if job.layout else job.source.parent)
    for opts in options:  # every variant's input checks first: bad input costs no work
        preflight(job.source, opts)
    results = []
    with removing_new_dirs(folder):
        for opts in options:
            name = variant_of(opts).name
            dest = (job.layout.gguf(name) if job.layout and out_dir is None
                    else folder / output_name(job.source, name))
            result = quantize_gguf(job.source, dest, opts, progress)
            if job.layout is not None and out_dir is None:
                _record(job, opts, result)
            results.append(result)
    return results


def quantize_fingerprint(source: Path, opts: QuantizeOptions) -> Fingerprint | None:
    """What a quantized GGUF is made from: its source, its importance matrix and the
    options; None while either file is missing. ``build`` compares it with the record."""
    if not source.is_file() or (opts.imatrix is not None and not opts.imatrix.is_file()):
        return None
    stat = source.stat()
    inputs = {"source": source.name, "source_size": stat.st_size,
              "source_mtime_ns": stat.st_mtime_ns}
    if opts.imatrix:
        inputs["imatrix_sha256"] = sha256_file(opts.imatrix)
    settings = {"quant": opts.quant.name, "output_tensor_type": opts.output_tensor_type,
                "token_embedding_type": opts.token_embedding_type,
                "overrides": [list(o) for o in opts.overrides],
                "allow_requantize": opts.allow_requantize}
    return inputs, settings


def _record(job: QuantizeJob, opts: QuantizeOptions, result: QuantizeResult) -> None:
    assert job.layout is not None
    fingerprint = quantize_fingerprint(job.source, opts)
    assert fingerprint is not None  # both were just read
    Manifest(job.layout.manifest).record(result.path.name, "quantize", *fingerprint,
                                         size=result.size)


DEFAULT_SMOKE_SUITE = "math500"
CHARS_PER_TOKEN_BOUND = 8  # math text runs 2-4 characters a token; 8 leaves a wide margin


@dataclass(frozen=True)
class ImatrixJob:
    """Model in, matrix out, the smoke suite to keep out of the text (a suite name or an
    absolute JSONL path, as recipes give it), and the prompt format (None: plain text)."""

    model: Path
    dest: Path
    smoke_suite: str
    prompt: PromptSpec | None = None
    layout: BuildLayout | None = None


@dataclass(frozen=True)
class ImatrixRun:
    """What ``mathq imatrix`` did: the matrix, the text, and what the overlap check dropped."""

    result: ImatrixResult
    text_path: Path
    calibration_items: int
    excluded: tuple[str, ...]
    smoke_suite: str
    reused: bool = False


def text_path_for(dest: Path) -> Path:
    """``x.imatrix.gguf`` -> ``x.imatrix.txt``: the calibration text beside its matrix."""
    return dest.with_name(dest.name.removesuffix(".gguf") + ".txt")


def resolve_imatrix_input(ref: str, build_root: Path | None = None, *, out: Path | None = None,
                          smoke_suite: str | None = None, plain: bool = False) -> ImatrixJob:
    """A ``.gguf`` path is used as is (plain text layout); anything else is a recipe."""
    path = Path(ref)
    if path.suffix.lower() == ".gguf" or (path.is_file() and not ref.endswith(".toml")):
        if (problem := file_problem(path)) is not None:
            raise GGUFError(f"model file {path} {problem}",
                            "give a GGUF path or a recipe name (see `mathq recipes`)")
        stem = path.stem
        for t in INPUT_TYPES:
            stem = stem.removesuffix(f"-{t}")
        return ImatrixJob(model=path, dest=out or path.with_name(f"{stem}.imatrix.gguf"),
                          smoke_suite=smoke_suite or DEFAULT_SMOKE_SUITE)
    recipe = load_recipe(ref)
    layout = BuildLayout.for_model(recipe.name, build_root)
    model = next((layout.gguf(t) for t in ("BF16", "Q8_0") if layout.gguf(t).is_file()), None)
    if model is None:
        raise GGUFError(f"{layout.gguf('BF16')} does not exist",
                        f"run `mathq convert {ref}` first (or `mathq quantize {ref} -Q Q8_0`)")
    return ImatrixJob(model=model, dest=out or layout.imatrix,
                      smoke_suite=smoke_suite or recipe.smoke.suite,
                      prompt=None if plain else recipe.prompt,
                      layout=layout if out is None else None)


def recipe_imatrix_job(recipe: Recipe, layout: BuildLayout) -> ImatrixJob:
    """The build's matrix: the BF16 model (which need not exist yet), the recipe's prompt
    format and smoke suite, written to and recorded in the build folder."""
    return ImatrixJob(model=layout.gguf("BF16"), dest=layout.imatrix,
                      smoke_suite=recipe.smoke.suite, prompt=recipe.prompt, layout=layout)


def _calibration(job: ImatrixJob, calibration: str, options: ImatrixOptions, seed: int,
                 progress: ProgressCallback) -> tuple[ProblemSet, CalibrationText]:
    """The smoke set and the calibration text cleaned of it, cut to what the run reads.
    The model and the calibration source are checked first: bad input is named before
    the smoke set is loaded (which may need the Hub)."""
    read_gguf_header(job.model)
    preloaded = load_calibration(calibration, progress)
    smoke = load_problem_set(job.smoke_suite, progress=progress)
    budget = (options.chunks * options.n_ctx * CHARS_PER_TOKEN_BOUND
              if options.chunks is not None else None)
    text = build_calibration_text(calibration, smoke, spec=job.prompt, max_chars=budget,
                                  seed=seed, progress=progress, preloaded=preloaded)
    return smoke, text


def imatrix_fingerprint(job: ImatrixJob, calibration: str, options: ImatrixOptions, *,
                        seed: int = 0,
                        progress: ProgressCallback = no_progress) -> Fingerprint | None:
    """What the matrix of ``job`` must have been made from (the record :func:`run_imatrix`
    writes); None while the model is missing. Builds the calibration text to hash it."""
    if not job.model.is_file():
        return None
    _smoke, text = _calibration(job, calibration, options, seed, progress)
    return _record_fields(job, text, options, seed)


def run_imatrix(job: ImatrixJob, calibration: str, options: ImatrixOptions, *, seed: int = 0,
                force: bool = False, progress: ProgressCallback = no_progress) -> ImatrixRun:
    """Make the calibration text, compute the matrix, save both, record them."""
    smoke, text = _calibration(job, calibration, options, seed, progress)
    text_path = text_path_for(job.dest)
    inputs, settings = _record_fields(job, text, options, seed)
    if job.layout is not None and not force:
        reused = _reuse(job, text, inputs, settings, text_path, smoke.name)
        if reused is not None:
            return reused
    with output_lock(job.dest):  # a second run is refused now, not after the computation
        check_writable(job.dest)
        result = compute_imatrix(job.model, text.text, job.dest, options, text.dataset,
                                 progress)
        write_text_atomic(text_path, text.text)
    if job.layout is not None:
        manifest = Manifest(job.layout.manifest)
        manifest.record(job.dest.name, "imatrix", inputs, settings, size=job.dest.stat().st_size)
    return ImatrixRun(result, text_path, text.n_items, text.excluded, smoke.name)


def _record_fields(job: ImatrixJob, text: CalibrationText, options: ImatrixOptions,
                   seed: int) -> tuple[dict, dict]:
    stat = job.model.stat()
    inputs = {"model": job.model.name, "model_size": stat.st_size,
              "model_mtime_ns": stat.st_mtime_ns, "dataset": text.dataset,
              "text_sha256": text.sha256}
    settings = {**asdict(options), "seed": seed,
                "format": job.prompt.template if job.prompt else "plain"}
    settings.pop("threads")  # neither changes what is measured
    settings.pop("gpu_layers")
    return inputs, settings


def _reuse(job: ImatrixJob, text: CalibrationText, inputs: dict, settings: dict,
           text_path: Path, smoke_name: str) -> ImatrixRun | None:
    assert job.layout is not None
    record = Manifest(job.layout.manifest).get(job.dest.name)
    if record is None or not record.same_recipe(inputs, settings) or not job.dest.is_file():
        return None
    done = load_imatrix(job.dest)
    chunk_size = int(settings["n_ctx"])
    result = ImatrixResult(path=job.dest, model=job.model, dataset=text.dataset,
                           n_entries=len(done.entries), chunks=done.chunk_count,
                           n_ctx=chunk_size, n_tokens=done.chunk_count * chunk_size,
                           seconds=0.0)
    return ImatrixRun(result, text_path, text.n_items, text.excluded, smoke_name, reused=True)
