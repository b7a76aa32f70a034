"""Publish a recipe's GGUF files to a Hugging Face model repo, with a generated model card.

The repo gets each selected GGUF, one ``<QUANT>.Modelfile`` per GGUF (FROM the file beside
it, so ``ollama create -f`` works on a download), a tuned GGUF's ``.overrides.txt`` (its tensor
types, for ``llama-quantize --tensor-type-file``) and ``README.md`` from
:mod:`mathq.publish.model_card`. huggingface_hub does the transfer: ``create_repo`` (kept if it
exists), then ``preupload_lfs_files`` one GGUF at a time (so progress can be reported per
file; the Hub's LFS batch answer skips bytes it already stores) and one ``create_commit``
with every changed file.

A rerun compares the repo's listing with the local files first (LFS sha256 for GGUFs, git blob
ids for text) and sends only what differs; when nothing does, it makes no commit. SHA-256s
come from the build's digest cache and are handed to huggingface_hub, which would otherwise
read every multi-GB file again. :func:`plan_hub` makes no request (``--dry-run``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mathq import __version__
from mathq.download.hub import (
    OFFLINE_ENV,
    TOKEN_ENV,
    hub_endpoint,
    token_configured,
    transport_error,
)
from mathq.errors import InvalidNameError, UploadError
from mathq.modelfile.write import MODELFILE_SUFFIX, render_modelfile
from mathq.progress import Progress, ProgressCallback, no_progress
from mathq.publish.model_card import card_files, render_model_card
from mathq.publish.plan import release_report, tag_files
from mathq.recipes.recipe import Recipe

README = "README.md"
TOKENS_URL = "https://huggingface.co/settings/tokens"
_RERUN_HINT = "rerun; files already uploaded are not sent again"


@dataclass(frozen=True)
class HubFile:
    """One file of the repo: a local GGUF (``local``) or generated UTF-8 text (``text``)."""

    path_in_repo: str
    size: int
    sha256: str
    local: Path | None = None
    text: str | None = None

    @property
    def data(self) -> bytes:
        """A text file's bytes (empty for a GGUF, which is read from disk as it is sent)."""
        return (self.text or "").encode()

    @property
    def git_blob_id(self) -> str | None:
        """Git's id of a text file's blob, which the Hub lists for non-LFS files."""
        if self.text is None:
            return None
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass(frozen=True)
class HubPlan:
    """Everything one publish to one Hub repo would send."""

    recipe: str
    repo_id: str
    private: bool
    endpoint: str
    files: tuple[HubFile, ...]

    @property
    def card(self) -> str:
        """The README.md text."""
        return next(f.text or "" for f in self.files if f.path_in_repo == README)


@dataclass(frozen=True)
class HubResult:
    """The outcome: the repo's URL, the commit made (None if nothing changed), per file
    ``uploaded`` or ``unchanged``, and the bytes of GGUF that went into the commit."""

    repo_id: str
    url: str
    commit: str | None
    files: tuple[tuple[str, str], ...]
    committed_bytes: int


def check_repo_id(repo_id: str) -> None:
    """Refuse anything but a valid ``owner/name`` before a request is made."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise InvalidNameError(f"Hub repo {repo_id!r} is not of the form owner/name",
                               "pass --hf-repo USER/NAME (your user or an organisation)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InvalidNameError(f"Hub repo {repo_id!r} is not a valid repo id",
                               "use letters, digits, '-', '_', '.' (no '--' or '..'), "
                               "at most 96 characters") from e


def plan_hub(recipe: Recipe, repo_id: str, *, private: bool = False, tags: Sequence[str] = (),
             namespace: str | None = None, build_root: Path | None = None,
             endpoint: str | None = None, progress: ProgressCallback = no_progress,
             dry_run: bool = False) -> HubPlan:
    """Check the repo id and files, hash the GGUFs, write the Modelfiles and the card.

    Reads only local files: nothing is sent. ``namespace`` (where the same tags are pushed
    to Ollama's registry, if they are) adds ``ollama run`` lines to the card.
    """
    check_repo_id(repo_id)
    _pairs, files = tag_files(recipe, tags, build_root, progress, dry_run=dry_run)
    ggufs = list(files.values())
    modelfiles = {f.quant: f"{f.quant}{MODELFILE_SUFFIX}" for f in ggufs}
    data = release_report(recipe, build_root)
    card = render_model_card(recipe, repo_id, data, card_files(data, ggufs, modelfiles),
                             namespace=namespace, build_root=build_root)
    out = [HubFile(f.path.name, f.size, f.sha256, local=f.path) for f in ggufs]
    for f in ggufs:
        text = render_modelfile(recipe, f.tags[0], f.quant, f"./{f.path.name}")
        out.append(_text_file(modelfiles[f.quant], text))
        if f.overrides is not None:
            out.append(_text_file(f.overrides.name, f.overrides.read_text(encoding="utf-8")))
    out.append(_text_file(README, card))
    return HubPlan(recipe.name, repo_id, private, (endpoint or hub_endpoint()).rstrip("/"),
                   tuple(out))


def _text_file(path: str, text: str) -> HubFile:
    data = text.encode()
    return HubFile(path, len(data), hashlib.sha256(data).hexdigest(), text=text)


def require_online() -> None:
    """Refuse an upload at once while huggingface_hub is told to stay offline."""
    import os

    from huggingface_hub import constants

    said = os.environ.get(OFFLINE_ENV, "").strip().upper() in ("1", "ON", "YES", "TRUE")
    if constants.HF_HUB_OFFLINE or said:
        raise UploadError(f"{OFFLINE_ENV} is set, so nothing can be uploaded to the Hub",
                          f"unset {OFFLINE_ENV} to publish, or use --dry-run to see the plan")


def publish_hub(plan: HubPlan, progress: ProgressCallback = no_progress) -> HubResult:
    """Create the repo if needed and commit the files that differ from the repo's.

    Raises UploadError (offline, no or insufficient token, unreachable endpoint, refused
    upload).
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.hf_api import RepoFile

    require_online()
    api = HfApi(endpoint=plan.endpoint, library_name="mathq", library_version=__version__)
    with _upload_errors(plan.repo_id, plan.endpoint), _hub_bars_off():
        url = str(api.create_repo(plan.repo_id, private=plan.private, exist_ok=True))
        remote = {e.path: e for e in api.list_repo_tree(plan.repo_id, recursive=True)
                  if isinstance(e, RepoFile)}
        todo = [f for f in plan.files if not _same(f, remote.get(f.path_in_repo))]
        outcome = tuple((f.path_in_repo, "uploaded" if f in todo else "unchanged")
                        for f in plan.files)
        if not todo:
            return HubResult(plan.repo_id, url, None, outcome, 0)
        ops = []
        for f in todo:
            if f.local is not None:
                op = CommitOperationAdd(f.path_in_repo, str(f.local))
                op.upload_info.sha256 = bytes.fromhex(f.sha256)  # known: no second read
            else:
                op = CommitOperationAdd(f.path_in_repo, f.data)
            ops.append(op)
        large = [(f, op) for f, op in zip(todo, ops, strict=True) if f.local is not None]
        total, done = sum(f.size for f, _ in large), 0
        for f, op in large:
            progress(Progress("hub upload", done, total, "B", item=f.path_in_repo))
            api.preupload_lfs_files(plan.repo_id, additions=[op])
            done += f.size
            progress(Progress("hub upload", done, total, "B", item=f.path_in_repo))
        names = ", ".join(f.path_in_repo for f in todo)
        info = api.create_commit(plan.repo_id, ops, commit_message=f"mathq publish {plan.recipe}",
                                 commit_description=f"Files: {names}")
    return HubResult(plan.repo_id, url, info.oid, outcome, total)


def _same(local: HubFile, remote: object) -> bool:
    if remote is None:
        return False
    lfs = getattr(remote, "lfs", None)
    if local.local is not None:
        return lfs is not None and lfs.sha256 == local.sha256
    return lfs is None and getattr(remote, "blob_id", None) == local.git_blob_id


@contextlib.contextmanager
def _hub_bars_off() -> Iterator[None]:
    """huggingface_hub draws its own tqdm bars; mathq reports progress through its callback."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            enable_progress_bars()


@contextlib.contextmanager
def _upload_errors(repo_id: str, endpoint: str) -> Iterator[None]:
    """Re-raise Hub and network failures of an upload as one-line UploadErrors.

    Messages are built from the failure's kind and HTTP status, never the server's text, so
    they stay short and cannot echo headers or the token.
    """
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled as e:
        raise UploadError(f"{OFFLINE_ENV} is set, so nothing can be uploaded to the Hub",
                          f"unset {OFFLINE_ENV} to publish") from e
    except HfHubHTTPError as e:
        raise _http_error(e, repo_id, endpoint) from e
    except json.JSONDecodeError as e:  # a server that is not the Hub answered
        raise UploadError(f"{endpoint} answered something that is not the Hub's JSON",
                          "check HF_ENDPOINT: it must name the Hub or a mirror of its API") from e
    except ValueError as e:  # the Hub's check of README.md metadata failed
        if not isinstance(e.__cause__, HfHubHTTPError):
            raise
        raise UploadError(f"{endpoint} refused the model card's metadata for {repo_id}",
                          "the card is generated: please report this as a mathq bug") from e
    except RuntimeError as e:  # huggingface_hub wraps a failed LFS transfer in RuntimeError
        cause = e.__cause__
        if isinstance(cause, HfHubHTTPError):
            raise _http_error(cause, repo_id, endpoint) from e
        if isinstance(cause, httpx2.TransportError):
            raise UploadError(f"the transfer to {endpoint} failed ({type(cause).__name__})",
                              _RERUN_HINT) from e
        raise
    except httpx2.TransportError as e:
        raise transport_error(e, endpoint, UploadError, timeout_hint=_RERUN_HINT,
                              failed_hint=_RERUN_HINT) from e


def _http_error(e: object, repo_id: str, endpoint: str) -> UploadError:
    response = getattr(e, "response", None)
    status = response.status_code if response is not None else 0
    if status == 401:
        hint = (f"the token in {TOKEN_ENV} (or your stored login) was refused; use a write "
                f"token from {TOKENS_URL}" if token_configured()
                else f"set {TOKEN_ENV} to a write token from {TOKENS_URL}")
        return UploadError(f"{endpoint} refused to let mathq write to {repo_id} "
                           f"(HTTP 401: not logged in)", hint)
    if status == 403:
        owner = repo_id.split("/")[0]
        return UploadError(f"{endpoint} refused to let mathq write to {repo_id} (HTTP 403)",
                           f"use a write token of {owner}, or of a member of that "
                           "organisation with write access")
    if status == 404:
        return UploadError(f"{endpoint} has no repo {repo_id} that this token can write to",
                           f"check --hf-repo and that {TOKEN_ENV} is a write token")
    return UploadError(f"{endpoint} answered HTTP {status} while mathq uploaded to {repo_id}",
                       "rerun later; files already uploaded are not sent again")
