"""The modelfile stage's build step: one Modelfile per Ollama tag of a recipe, in the build
folder (or the committed ``modelfiles/`` tree), recorded in the manifest with its
fingerprint."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from mathq import __version__
from mathq.fsutil import atomic_outputs, removing_new_dirs, sha256_file
from mathq.layout import BuildLayout
from mathq.manifest import Fingerprint, Manifest
from mathq.modelfile.write import (
    GENERATED_MARK,
    MODELFILE_SUFFIX,
    ModelfileResult,
    WrittenModelfile,
    from_path,
    render_modelfile,
    select_tags,
)
from mathq.progress import Progress, ProgressCallback, no_progress
from mathq.recipes.recipe import Recipe, bundled_recipe_names, load_recipe


def write_modelfiles(recipe: Recipe, out_dir: Path | None = None,
                     build_root: Path | None = None, tags: Sequence[str] = (),
                     progress: ProgressCallback = no_progress) -> ModelfileResult:
    """Write ``<out_dir>/<tag>.Modelfile`` for the recipe's tags (all, or ``tags``).

    ``out_dir`` defaults to the build folder's ``modelfiles/``; each FROM points at the
    tag's GGUF in ``<build_root>/<model>/``, relative to ``out_dir``.
    """
    layout = BuildLayout.for_model(recipe.name, build_root)
    out_dir = Path(out_dir) if out_dir is not None else layout.modelfiles_dir
    pairs = select_tags(recipe, tags)
    texts = [(tag, quant, from_path(layout.gguf(quant), out_dir)) for tag, quant in pairs]
    rendered = [(tag, quant, src, render_modelfile(recipe, tag, quant, src))
                for tag, quant, src in texts]  # all verified before the first write
    paths = [out_dir / f"{tag}{MODELFILE_SUFFIX}" for tag, *_ in rendered]
    written = []
    # One set: all of them or, on a failure (a full disk), none; a second run writing the
    # same Modelfiles is refused.
    with removing_new_dirs(out_dir), atomic_outputs(*paths) as staged:
        for i, ((tag, quant, src, text), path) in enumerate(zip(rendered, paths, strict=True)):
            staged[path].write_text(text, encoding="utf-8")
            written.append(WrittenModelfile(tag, quant, path, src))
            progress(Progress("modelfile", i + 1, len(rendered), "files", item=path.name))
    if out_dir == layout.modelfiles_dir:
        Manifest(layout.manifest).record(layout.key(out_dir), "modelfile",
                                         *modelfiles_fingerprint(recipe, tags))
    return ModelfileResult(recipe.name, recipe.ollama.model, tuple(written))


def modelfiles_fingerprint(recipe: Recipe, tags: Sequence[str] = ()) -> Fingerprint:
    """What a build folder's Modelfiles are made from: the recipe, the tags asked for
    (none: all) and the mathq that renders them (FROM lines follow from the layout)."""
    return ({"recipe_sha256": sha256_file(recipe.path)},
            {"tags": list(tags), "mathq": __version__})


def write_all_modelfiles(out_root: Path, build_root: Path,
                         progress: ProgressCallback = no_progress) -> tuple[ModelfileResult, ...]:
    """Regenerate ``<out_root>/<model>/<tag>.Modelfile`` for every bundled recipe.

    This is how the repository's ``modelfiles/`` folder is made: with ``out_root`` =
    ``modelfiles`` and ``build_root`` = ``build`` each FROM reads
    ``../../build/<model>/<model>-<QUANT>.gguf``. Generated Modelfiles of tags a recipe
    no longer has are removed; other files are left alone.
    """
    results = []
    for name in bundled_recipe_names():
        recipe = load_recipe(name)
        folder = Path(out_root) / recipe.ollama.model
        result = write_modelfiles(recipe, folder, build_root, progress=progress)
        keep = {f.path.name for f in result.files}
        removed = []
        for stale in sorted(folder.glob(f"*{MODELFILE_SUFFIX}")):
            if stale.name not in keep and stale.read_text(
                    encoding="utf-8", errors="replace").startswith(GENERATED_MARK):
                stale.unlink()
                removed.append(stale)
        results.append(replace(result, removed=tuple(removed)))
    return tuple(results)
