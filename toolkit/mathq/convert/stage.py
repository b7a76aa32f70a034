"""The convert stage of a recipe build: paths from the build layout, a manifest record.

``convert_recipe`` converts ``build/<model>/hf`` (or the recipe's ``local_dir``) into
``build/<model>/<model>-BF16.gguf`` and records in ``manifest.json`` what it was made
from: size and SHA-256 of the config and tokenizer files, size and header hash of each
safetensors shard (the header fixes names, dtypes, shapes and offsets; hashing all weights
again would double the stage's time, and the download stage checks them against the
Hub's hashes) and the settings (outtype, pre-tokenizer).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

from mathq.convert.checkpoint import INDEX_NAME, find_shards
from mathq.convert.converter import OUTTYPES, ConvertOptions, ConvertResult, convert_checkpoint
from mathq.errors import InputFileError
from mathq.fsutil import sha256_file
from mathq.inputs import file_problem
from mathq.layout import BuildLayout
from mathq.manifest import Manifest
from mathq.progress import ProgressCallback, no_progress
from mathq.recipes.recipe import Recipe

SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    INDEX_NAME,
)


def _header_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return hashlib.sha256(f.read(n)).hexdigest()


def checkpoint_inputs(hf_dir: Path) -> dict[str, Any]:
    """What a conversion of ``hf_dir`` depends on, cheap to recompute and compare."""
    hf_dir = Path(hf_dir)
    files: dict[str, Any] = {}
    for name in SMALL_FILES:
        p = hf_dir / name
        if p.is_file():
            files[name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    for shard in find_shards(hf_dir):
        files[shard.name] = {"size": shard.stat().st_size, "header_sha256": _header_sha256(shard)}
    return {"hf_dir": str(hf_dir), "files": files}


def recipe_hf_dir(recipe: Recipe, layout: BuildLayout) -> Path:
    """The checkpoint folder a recipe converts: its ``local_dir``, else the download."""
    return recipe.model.local_dir or layout.hf_dir


def recipe_convert_options(recipe: Recipe, options: ConvertOptions) -> ConvertOptions:
    """``options`` with the recipe's pre-tokenizer (unless they name one) and its name."""
    if options.pre_tokenizer is None and recipe.model.pre_tokenizer:
        options = replace(
            options, pre_tokenizer=recipe.model.pre_tokenizer, pre_tokenizer_source="recipe"
        )
    if options.model_name is None:
        options = replace(options, model_name=recipe.name)
    return options


def convert_recipe(
    recipe: Recipe,
    options: ConvertOptions,
    build_root: Path | None = None,
    out: Path | None = None,
    progress: ProgressCallback = no_progress,
) -> ConvertResult:
    """Convert a recipe's checkpoint into its build folder and record it in the manifest.

    The recipe's ``pre_tokenizer`` is used unless ``options`` names one.
    """
    layout = BuildLayout.for_model(recipe.name, build_root)
    hf_dir = recipe_hf_dir(recipe, layout)
    if not hf_dir.is_dir():
        what = file_problem(hf_dir) or "is a file"
        raise InputFileError(
            f"no checkpoint at {hf_dir}: it {what.replace('a regular file', 'a folder')}",
            f"run `mathq download {recipe.name}` first",
        )
    out = Path(out) if out is not None else layout.gguf(OUTTYPES[options.outtype].label)
    options = recipe_convert_options(recipe, options)
    inputs = checkpoint_inputs(hf_dir)
    result = convert_checkpoint(hf_dir, out, options, progress)
    try:
        key = str(out.resolve().relative_to(layout.root.resolve()))
    except ValueError:
        key = str(out.resolve())
    Manifest(layout.manifest).record(
        key,
        "convert",
        inputs,
        settings={
            "outtype": result.outtype,
            "pre_tokenizer": result.pre_tokenizer,
            "verified": result.verification is not None,
        },
        size=result.file_size,
    )
    return result
