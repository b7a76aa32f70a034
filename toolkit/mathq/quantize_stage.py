"""The quantize stage: which BF16 file a command means, and recording what was made.

:mod:`mathq.quantize` quantizes one file; this module resolves ``RECIPE|GGUF`` into an input
and output names, runs several variants, and records each in the build manifest when the
input is a recipe's build folder. A variant quantized with an importance matrix is named
``<QUANT>-imat`` (:class:`mathq.quants.Variant`), so it never takes the plain variant's place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mathq.errors import MissingImatrixError
from mathq.fsutil import sha256_file
from mathq.layout import BuildLayout
from mathq.manifest import Fingerprint, Manifest
from mathq.progress import ProgressCallback, no_progress
from mathq.quantize import QuantizeOptions, QuantizeResult, output_name, quantize_gguf
from mathq.quants import QuantType, Variant, get_quant
from mathq.recipes import load_recipe


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
    ``-imat`` one), else for an ``-imat`` name the build folder's own (``mathq imatrix``)."""
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
    results = []
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
