"""The imatrix stage: which model and smoke set a command means, and recording what was made.

:mod:`mathq.imatrix` computes a matrix from a GGUF and a text; :mod:`mathq.calibration`
makes the text. This module resolves ``RECIPE|GGUF`` (the recipe's BF16 GGUF, else its
Q8_0), picks the smoke suite to keep out of the text, writes the matrix and the exact text
it was computed on (so ``llama-imatrix -f`` can reproduce it), and, in a build folder,
records both in the manifest and skips a run whose inputs and settings are unchanged.
:func:`imatrix_fingerprint` says what that record must hold, so ``mathq build --imatrix``
can tell a current matrix before it plans the quantizations that read it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from mathq.calibration import CalibrationText, build_calibration_text
from mathq.errors import GGUFError
from mathq.fsutil import write_text_atomic
from mathq.imatrix import INPUT_TYPES, ImatrixOptions, ImatrixResult, compute_imatrix
from mathq.imatrix_file import load_imatrix
from mathq.layout import BuildLayout
from mathq.manifest import Fingerprint, Manifest
from mathq.problems import ProblemSet, load_problem_set
from mathq.progress import ProgressCallback, no_progress
from mathq.recipes import PromptSpec, Recipe, load_recipe

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
        if not path.is_file():
            raise GGUFError(f"model file not found: {path}",
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
    """The smoke set and the calibration text cleaned of it, cut to what the run reads."""
    smoke = load_problem_set(job.smoke_suite, progress=progress)
    budget = (options.chunks * options.n_ctx * CHARS_PER_TOKEN_BOUND
              if options.chunks is not None else None)
    text = build_calibration_text(calibration, smoke, spec=job.prompt, max_chars=budget,
                                  seed=seed, progress=progress)
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
    result = compute_imatrix(job.model, text.text, job.dest, options, text.dataset, progress)
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
    settings.pop("threads")  # does not change the result
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
