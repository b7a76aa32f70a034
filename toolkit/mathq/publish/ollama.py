"""Publish a recipe's tags to Ollama: blob, create, push, each only when needed.

For every tag the GGUF goes to the server as a blob (unless ``HEAD`` says it is there), the
model ``<namespace>/<model>:<tag>`` is created from the tag's generated Modelfile, and the
server pushes it to its registry. The Modelfile is the one ``mathq modelfile`` writes, made in
memory and checked by :mod:`mathq.modelfile.check` first; the create request is read from it
the way ``ollama create -f`` reads a Modelfile (``files`` for FROM, ``template``, typed
``parameters``, ``license``), so the file and the request cannot disagree.

A rerun sends nothing twice: blobs the server has are skipped, and ``publish.json`` in the
build folder remembers which exact create request each name got and whether it was pushed;
a name whose request is unchanged and that the server still has (``/api/show``) is neither
created nor pushed again. :func:`plan_ollama` makes no request at all (``--dry-run``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathq.errors import IntegrityError, InvalidNameError, ModelfileError
from mathq.layout import BuildLayout
from mathq.modelfile.check import check_modelfile_text, parse_modelfile
from mathq.modelfile.options import get_option, parse_go_bool, parse_go_float32
from mathq.modelfile.write import from_path, render_modelfile
from mathq.progress import ProgressCallback, no_progress
from mathq.publish.choice import recommended
from mathq.publish.ollama_api import OllamaAPI
from mathq.publish.plan import (
    GGUFFile,
    PublishState,
    check_names,
    forget,
    release_report,
    tag_files,
)
from mathq.recipes.recipe import Recipe

STATE_KIND = "ollama"


@dataclass(frozen=True)
class OllamaTagPlan:
    """One tag: the model name it becomes, its GGUF, its Modelfile and the create request."""

    tag: str
    quant: str
    name: str
    gguf: Path
    size: int
    digest: str
    modelfile: str
    request: dict[str, Any]
    recommended: bool = False


@dataclass(frozen=True)
class OllamaPlan:
    """Everything one publish to one Ollama server would send, and the report's pick among
    its files (``recommended``: the pick's label and why; None when it picks none)."""

    recipe: str
    base_url: str
    namespace: str | None
    push: bool
    tags: tuple[OllamaTagPlan, ...]
    recommended: str | None = None


@dataclass(frozen=True)
class OllamaTagResult:
    """What happened to one tag: blob ``uploaded``/``present``/``not needed``, create
    ``created``/``unchanged``, push ``pushed``/``unchanged``/``not pushed``."""

    tag: str
    name: str
    digest: str
    blob: str
    create: str
    push: str
    recommended: bool = False


@dataclass(frozen=True)
class OllamaResult:
    """The outcome of :func:`publish_ollama`."""

    base_url: str
    tags: tuple[OllamaTagResult, ...]
    uploaded_bytes: int
    recommended: str | None = None


def model_name(recipe: Recipe, tag: str, namespace: str | None) -> str:
    """``<namespace>/<model>:<tag>``, or ``<model>:<tag>`` for a local-only model."""
    base = recipe.ollama.model
    return f"{namespace}/{base}:{tag}" if namespace else f"{base}:{tag}"


def _typed(name: str, values: list[str]) -> Any:
    """A PARAMETER's text as the JSON value Ollama's client sends (``api.FormatParams``)."""
    option = get_option(name)
    if option is None:  # the validator has refused unknown names already
        raise ModelfileError(f"unknown parameter {name!r}", "check the recipe's parameters")
    if option.kind == "string_list":
        return list(values)
    text = values[0]
    if option.kind == "int":
        return int(text)
    if option.kind == "bool":
        return parse_go_bool(text)
    try:
        return float(text)
    except ValueError:  # Go syntax Python's float() does not read, e.g. hexadecimal
        return parse_go_float32(text)


def create_request(name: str, modelfile: str, files: dict[str, str]) -> dict[str, Any]:
    """The ``/api/create`` body for Modelfile text whose FROM is the blob(s) in ``files``.

    The Modelfile is validated first; a problem raises ModelfileError naming the line.
    """
    problems = check_modelfile_text(modelfile)
    if problems:
        p = problems[0]
        raise ModelfileError(f"the Modelfile for {name} has a problem on line {p.line}: "
                             f"{p.message}", "fix the recipe, then check it with "
                             "`mathq modelfile --check`")
    body: dict[str, Any] = {"model": name, "files": dict(files)}
    params: dict[str, list[str]] = {}
    for c in parse_modelfile(modelfile).commands:
        if c.instruction == "FROM":
            continue  # the file itself travels as a blob, named in ``files``
        if c.instruction == "PARAMETER":
            params.setdefault(c.name, []).append(c.value)
        elif c.instruction in ("TEMPLATE", "SYSTEM"):
            body[c.instruction.lower()] = c.value
        elif c.instruction == "LICENSE":
            body.setdefault("license", []).append(c.value)
        elif c.instruction == "MESSAGE":
            body.setdefault("messages", []).append({"role": c.name, "content": c.value})
        else:
            raise ModelfileError(f"the Modelfile for {name} uses {c.instruction} (line "
                                 f"{c.line}), which mathq publish does not send",
                                 "publish a Modelfile without it")
    if params:
        body["parameters"] = {k: _typed(k, v) for k, v in params.items()}
    return body


def request_fingerprint(body: dict[str, Any]) -> str:
    """A digest of a create request: equal requests create equal models."""
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def plan_ollama(recipe: Recipe, *, namespace: str | None, base_url: str,
                tags: Sequence[str] = (), push: bool = True, build_root: Path | None = None,
                progress: ProgressCallback = no_progress, dry_run: bool = False,
                before_hashing: Callable[[], None] | None = None) -> OllamaPlan:
    """Check names and files, hash the GGUFs, and build each tag's Modelfile and request.

    Reads only local files: nothing is sent. A push needs a namespace (the registry's user
    or organisation); without push the models are created under the bare model name.
    """
    check_names(tags, namespace)
    if push and not namespace:
        raise InvalidNameError("pushing needs a namespace", "pass --namespace, or --no-push")
    pairs, files = tag_files(recipe, tags, build_root, progress, dry_run=dry_run,
                             before_hashing=before_hashing)
    layout = BuildLayout.for_model(recipe.name, build_root)
    pick = recommended(release_report(recipe, build_root), list(files))
    plans = []
    for tag, quant in pairs:
        f: GGUFFile = files[quant]
        name = model_name(recipe, tag, namespace)
        text = render_modelfile(recipe, tag, quant, from_path(f.path, layout.modelfiles_dir))
        request = create_request(name, text, {f.path.name: f"sha256:{f.sha256}"})
        plans.append(OllamaTagPlan(tag, quant, name, f.path, f.size, f"sha256:{f.sha256}",
                                   text, request, pick is not None and quant == pick.quant))
    return OllamaPlan(recipe.name, base_url, namespace, push, tuple(plans),
                      f"the report's {pick.label} pick: {pick.reason}" if pick else None)


def publish_ollama(plan: OllamaPlan, *, build_root: Path | None = None, force: bool = False,
                   progress: ProgressCallback = no_progress) -> OllamaResult:
    """Send ``plan`` to its server, tag by tag: blob if missing, create, push.

    ``force`` ignores ``publish.json`` (blobs the server has are still not sent). Raises
    ServerError (unreachable server, refused create or push) and IntegrityError (the server
    hashed other bytes than the digest says; the cached digest is dropped so a rerun
    rehashes the file).
    """
    layout = BuildLayout.for_model(plan.recipe, build_root)
    state = PublishState(layout.publish_state)
    results: list[OllamaTagResult] = []
    present: set[str] = set()
    uploaded = 0
    with OllamaAPI(plan.base_url) as api:
        for t in plan.tags:
            fingerprint = request_fingerprint(t.request)
            record = state.get(STATE_KIND, plan.base_url, t.name)
            same = not force and record.get("request") == fingerprint
            if same and api.has_model(t.name):
                blob, create = "not needed", "unchanged"
            else:
                if t.digest in present or api.has_blob(t.digest):
                    blob = "present"
                else:
                    try:
                        api.upload_blob(t.gguf, t.digest, progress)
                    except IntegrityError:
                        forget(t.gguf, layout.digest_cache)
                        raise
                    uploaded += t.size
                    blob = "uploaded"
                present.add(t.digest)
                api.create(t.request, progress)
                state.put(STATE_KIND, plan.base_url, t.name, request=fingerprint, pushed=None)
                record, create = {"request": fingerprint}, "created"
            if not plan.push:
                pushed = "not pushed"
            elif not force and create == "unchanged" and record.get("pushed") == fingerprint:
                pushed = "unchanged"
            else:
                api.push(t.name, progress)
                state.put(STATE_KIND, plan.base_url, t.name, pushed=fingerprint)
                pushed = "pushed"
            results.append(OllamaTagResult(t.tag, t.name, t.digest, blob, create, pushed,
                                           t.recommended))
    return OllamaResult(plan.base_url, tuple(results), uploaded, plan.recommended)
