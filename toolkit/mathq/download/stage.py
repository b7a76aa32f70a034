"""The download stage's build step: a recipe's checkpoint into ``build/<model>/hf/``, recorded
in the manifest (the fetching itself is :mod:`mathq.download.fetch`)."""

from __future__ import annotations

from pathlib import Path

from mathq.download.fetch import DownloadRequest, DownloadResult, download_checkpoint
from mathq.errors import RecipeError
from mathq.layout import BuildLayout
from mathq.manifest import Manifest
from mathq.progress import ProgressCallback, no_progress
from mathq.recipes.recipe import Recipe


def request_for_recipe(recipe: Recipe, revision: str | None = None) -> DownloadRequest:
    """The Hub repo and revision a recipe names; ``revision`` overrides the recipe's."""
    if recipe.model.hf_repo is None:
        raise RecipeError(
            f"recipe {recipe.name} has no hf_repo: its checkpoint is the local folder "
            f"{recipe.model.local_dir}",
            "there is nothing to download; convert reads that folder directly",
            path=str(recipe.path), field="model.hf_repo")
    return DownloadRequest(recipe.model.hf_repo, revision or recipe.model.revision)


def download_recipe(recipe: Recipe, *, revision: str | None = None, dest: Path | None = None,
                    build_root: Path | None = None, endpoint: str | None = None,
                    progress: ProgressCallback = no_progress) -> DownloadResult:
    """Download a recipe's checkpoint into its build folder (or ``dest``) and record it.

    The record goes into the model's build manifest under the snapshot folder's path
    relative to the build folder (``hf`` by default), or its absolute path when ``dest``
    lies elsewhere.
    """
    request = request_for_recipe(recipe, revision)
    layout = BuildLayout.for_model(recipe.name, build_root)
    dest = Path(dest) if dest is not None else layout.hf_dir
    try:
        key = dest.resolve().relative_to(layout.root.resolve()).as_posix()
    except ValueError:
        key = str(dest.resolve())
    return download_checkpoint(request, dest, endpoint=endpoint,
                               manifest=Manifest(layout.manifest), manifest_key=key,
                               progress=progress)
