"""What ``publish`` sends, whichever the destination: the tags' GGUF files, checked and hashed.

Both destinations (an Ollama server and its registry, a Hugging Face repo) start here: the
names are checked against the registry's rules before any request, each selected tag's GGUF
must exist in the build folder and hold the quantization its tag promises, and each file's
SHA-256 comes from the build's digest cache (:func:`mathq.fsutil.sha256_cached`), so a rerun
does not read multi-GB files again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathq.convert.gguf_info import read_gguf_header
from mathq.errors import GGUFError, InputFileError, InvalidNameError
from mathq.fsutil import forget_digest as forget  # noqa: F401 (publish's name)
from mathq.fsutil import sha256_cached, sha256_file, write_text_atomic
from mathq.layout import BuildLayout, overrides_file
from mathq.manifest import Manifest, file_identity
from mathq.modelfile.write import select_tags
from mathq.progress import ProgressCallback, no_progress
from mathq.recipes.quants import making_command, parse_variant
from mathq.recipes.recipe import Recipe, name_problem
from mathq.report.advice import with_advice
from mathq.report.table import ReportData, collect, recipe_ref

#: The header keys under which ``mathq tune`` describes a tuned file.
TUNED_KEY = "quantize.tuned."


@dataclass(frozen=True)
class GGUFFile:
    """One GGUF to publish: where it is, what it holds, and the tags that use it."""

    quant: str
    path: Path
    size: int
    sha256: str
    bits_per_weight: float
    n_params: int
    tags: tuple[str, ...]
    # What ``mathq tune`` recorded in a tuned file's header (``quantize.tuned.*`` keys).
    tuned: tuple[tuple[str, str], ...] = ()
    # A tuned file's ``.overrides.txt``, published beside it: None when there is none.
    overrides: Path | None = None
    # The context the model was trained for (``<arch>.context_length``), when recorded.
    context_length: int | None = None


def check_names(tags: Sequence[str] = (), namespace: str | None = None) -> None:
    """Refuse a namespace or tag that Ollama's naming rules reject, before anything is sent."""
    if namespace is not None and (problem := name_problem(namespace, "namespace")):
        raise InvalidNameError(problem, "Ollama names are 1-80 letters, digits, '_', '.', '-'")
    for tag in tags:
        if problem := name_problem(tag, "tag"):
            raise InvalidNameError(problem, "Ollama names are 1-80 letters, digits, '_', '.', '-'")


def tag_files(recipe: Recipe, tags: Sequence[str] = (), build_root: Path | None = None,
              progress: ProgressCallback = no_progress, *, dry_run: bool = False,
              before_hashing: Callable[[], None] | None = None,
              ) -> tuple[list[tuple[str, str]], dict[str, GGUFFile]]:
    """The ``(tag, quant)`` pairs to publish and each quant's checked, hashed GGUF.

    With ``dry_run`` the digest cache is read but never written: a dry run writes nothing.
    ``before_hashing`` runs once every name and file is checked and before any file is
    hashed (publishing asks its server there: an unreachable one costs no hashing).

    Raises InvalidNameError (a tag name Ollama refuses), RecipeError (a tag the recipe does
    not have), InputFileError (a GGUF not built yet) and GGUFError (a GGUF that holds another
    quantization than its name says, or changed since it was measured).
    """
    check_names(tags)
    pairs = select_tags(recipe, tags)
    layout = BuildLayout.for_model(recipe.name, build_root)
    files: dict[str, GGUFFile] = {}
    quants = list(dict.fromkeys(q for _, q in pairs))
    for quant in quants:  # check every file before hashing any
        path = layout.gguf(quant)
        if not path.is_file():
            raise InputFileError(f"{path} not found", f"make it with {_making(recipe, quant)}")
    summaries, tuned, overrides, contexts = {}, {}, {}, {}
    for quant in quants:
        path = layout.gguf(quant)
        header = read_gguf_header(path)
        summary = summaries[quant] = header.summary
        tuned[quant] = tuple((k.removeprefix(TUNED_KEY), str(v))
                             for k, v in header.values.items() if k.startswith(TUNED_KEY))
        overrides[quant] = _overrides(recipe, quant, path, dict(tuned[quant]))
        context = header.values.get(f"{summary.architecture}.context_length")
        contexts[quant] = int(context) if isinstance(context, int) else None
        variant = parse_variant(quant)
        if variant.bpw is not None:  # the tune chose its types, and so its file type
            if not tuned[quant]:
                raise GGUFError(f"{path} was not made by `mathq tune` (no {TUNED_KEY}* keys)",
                                f"make it with {_making(recipe, quant)}")
        elif summary.file_type_name != variant.quant.name:
            raise GGUFError(f"{path} holds {summary.file_type_name}, not {variant.quant.name}",
                            f"rebuild it with {_making(recipe, quant)}")
    _check_current(recipe, layout, quants)
    if before_hashing is not None:
        before_hashing()
    for quant in quants:
        path, summary = layout.gguf(quant), summaries[quant]
        files[quant] = GGUFFile(
            quant=quant, path=path, size=summary.size,
            sha256=sha256_cached(path, layout.digest_cache, progress, save=not dry_run),
            bits_per_weight=summary.bits_per_weight, n_params=summary.n_params,
            tags=tuple(t for t, q in pairs if q == quant), tuned=tuned[quant],
            overrides=overrides[quant], context_length=contexts[quant])
    return pairs, files


def release_report(recipe: Recipe, build_root: Path | None = None) -> ReportData:
    """The build's report data with its advice, as ``mathq report`` computes them, so what
    publish recommends is the report's pick. Reads summaries and GGUF headers only: no file
    is hashed and nothing is written. The recipe is named by its name, not its path: what
    publish writes leaves this machine."""
    layout = BuildLayout.for_model(recipe.name, build_root)
    data = collect(recipe, layout, hash_files=False)
    return with_advice(dataclasses.replace(data, recipe_ref=recipe.name))


def _overrides(recipe: Recipe, variant: str, gguf: Path, tuned: dict[str, str]) -> Path | None:
    """A tuned file's overrides file, checked against the digest its header records (a file
    that does not match would publish types the GGUF does not hold); None if there is none."""
    path = overrides_file(gguf)
    if not tuned or not path.is_file():
        return None
    recorded = tuned.get("overrides_sha256")
    if recorded and sha256_file(path) != recorded:
        raise GGUFError(f"{path} is not the overrides file {gguf.name} was made with (its "
                        "header records another digest)",
                        f"remake both with {_making(recipe, variant)}")
    return path


def _making(recipe: Recipe, variant: str) -> str:
    return f"`{making_command(recipe_ref(recipe), variant)}`"


def _check_current(recipe: Recipe, layout: BuildLayout, variants: Sequence[str]) -> None:
    """Refuse a variant whose figures were measured on an earlier file than the one that
    would be published (the manifest records what each summary was made from): a release
    must not carry another file's measurements."""
    manifest = Manifest(layout.manifest)
    for variant in variants:
        gguf = layout.gguf(variant)
        for stage, summary in (("smoke", layout.smoke_summary(variant)),
                               ("kld", layout.kld_summary(variant)),
                               ("bench", layout.bench_summary(variant))):
            record = manifest.get(layout.key(summary))
            measured = record.inputs.get("gguf") if record else None
            if summary.is_file() and measured and measured != file_identity(gguf):
                raise GGUFError(
                    f"{gguf.name} changed after its {stage} figures were measured",
                    f"measure it again (`mathq build {recipe_ref(recipe)}`, or `mathq {stage} "
                    f"{recipe_ref(recipe)} -Q {variant}`) before publishing")


class PublishState:
    """``publish.json``: what was created and pushed where, read and written whole.

    Entries live under a destination kind and address (``ollama`` / base URL) and a name
    (``ns/model:tag``). A rerun trusts an entry only together with the server's own answer
    (the model still exists), so a stale file costs a redundant request, never a skipped one.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.data: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(self.data, dict):
                self.data = {}
        except (OSError, ValueError):
            self.data = {}

    def get(self, kind: str, where: str, name: str) -> dict[str, Any]:
        """The entry for ``name`` at ``where`` (empty if none)."""
        return dict(self.data.get(kind, {}).get(where, {}).get(name, {}))

    def put(self, kind: str, where: str, name: str, **fields: Any) -> None:
        """Update the entry for ``name`` at ``where`` and write the file atomically."""
        entry = self.data.setdefault(kind, {}).setdefault(where, {}).setdefault(name, {})
        entry.update(fields)
        write_text_atomic(self.path, json.dumps(self.data, indent=2, sort_keys=True,
                                                ensure_ascii=False) + "\n")
