"""Download a checkpoint from the Hugging Face Hub into a folder, verified and resumable.

The stage asks the Hub once for the repo's file list with sizes and hashes at the requested
revision, which also resolves the revision to a commit. Every file is then fetched from that
commit, so a branch moving during the download cannot mix two versions. Before any large
transfer it refuses what mathq cannot or must not use (a pickle-only repo, an index naming a
shard the repo lacks) and checks the free disk space against what is still missing.

Why not ``snapshot_download``: huggingface_hub 2.x writes each file to a temporary name that
is unique to the process and deletes it on any failure, so a rerun after Ctrl-C or a dropped
connection starts every unfinished shard again from byte zero, and a 7B checkpoint's shards
are ~10 GB each. mathq instead fetches each file with huggingface_hub's own resumable GET
(``file_download.http_get``: Range requests, retries of cut transfers, size check, token and
endpoint handling) into ``<file>.partial`` beside its final name. That file survives a crash,
the next run resumes it with a Range request, and it is renamed into place only after its
bytes match the Hub's hash (SHA-256 for LFS files, the git blob SHA-1 for the others).

A small state file (``.mathq-download.json``) remembers which finished files were verified
at which size and mtime, so a rerun does not hash 14 GB again; the build manifest records
the repo, the resolved commit and every file's hash once the whole snapshot is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathq import __version__
from mathq.download.hub import hub_endpoint, hub_errors
from mathq.errors import CheckpointError, DownloadError, IntegrityError
from mathq.fsutil import (
    PARTIAL_SUFFIX,
    Debris,
    ensure_free_space,
    exclusive_lock,
    make_dirs,
    partial_path,
    write_text_atomic,
)
from mathq.manifest import Manifest
from mathq.progress import Progress, ProgressCallback, no_progress

STAGE = "download"
VERIFY_STAGE = "verify"
MANIFEST_KEY = "hf"
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_SUFFIX = ".safetensors"
# Weights mathq refuses to load: they are Python pickles, which can run code when read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Besides the weights, what convert and the prompt need; each is fetched when the repo has it.
SIDE_FILES = (
    CONFIG_FILE,
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
STATE_FILE = ".mathq-download.json"
LOCK_FILE = ".mathq-download.lock"
# Hashing a file smaller than this takes milliseconds: no "verify" progress for it.
VERIFY_PROGRESS_MIN = 64 << 20
_HASH_CHUNK = 4 << 20


@dataclass(frozen=True)
class DownloadRequest:
    """Which repo to fetch, at which branch, tag or commit."""

    repo_id: str
    revision: str = "main"


@dataclass(frozen=True)
class HubFile:
    """One file of a repo at one commit, with the size and hashes the Hub lists for it."""

    path: str
    size: int
    git_sha1: str
    sha256: str | None = None

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` for LFS files, ``git-sha1:<hex>`` (git blob id) for the others."""
        return f"sha256:{self.sha256}" if self.sha256 else f"git-sha1:{self.git_sha1}"


@dataclass(frozen=True)
class DownloadResult:
    """What a download left in ``dest``, and how much of it this run transferred."""

    repo_id: str
    revision: str
    commit: str
    dest: Path
    files: tuple[HubFile, ...]
    total_bytes: int
    fetched_bytes: int






def download_checkpoint(request: DownloadRequest, dest: Path, *, endpoint: str | None = None,
                        manifest: Manifest | None = None, manifest_key: str = MANIFEST_KEY,
                        progress: ProgressCallback = no_progress) -> DownloadResult:
    """Fetch config, tokenizer files and safetensors weights of ``request`` into ``dest``.

    Raises DownloadError (Hub unreachable, repo/revision missing, access refused),
    CheckpointError (pickle-only repo, no config, index naming a missing shard),
    DiskSpaceError (not enough room for what is still missing) and IntegrityError (bytes
    that do not match the Hub's hash; the bad copy is deleted so a rerun fetches it again).
    """
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    dest = Path(dest)
    debris = Debris(dest, dest / LOCK_FILE)  # a failed start leaves no empty folder behind
    try:
        make_dirs(dest)
        return _download(request, dest, endpoint, manifest, manifest_key, progress)
    except BaseException:
        debris.remove()
        raise


def _download(request: DownloadRequest, dest: Path, endpoint: str, manifest: Manifest | None,
              manifest_key: str, progress: ProgressCallback) -> DownloadResult:
    with _locked(dest), hub_errors(request.repo_id, request.revision, endpoint):
        fetcher = _Fetcher(request, dest, endpoint, progress)
        commit, listing = fetcher.list_repo()
        side, weights = _choose_files(request.repo_id, commit, listing)
        index = listing.get(INDEX_FILE)
        if index is not None:
            # Fetched first and silently (a few KB): it decides which shards to fetch.
            fetcher.ensure([index], manifest, manifest_key, report=False)
            weights = _shards_from_index(request.repo_id, commit, dest / INDEX_FILE, listing)
            side = [*side, index]
        files = [*side, *weights]
        fetcher.ensure(files, manifest, manifest_key)
        fetcher.remove_stale({f.path for f in files})
        total = sum(f.size for f in files)
        if manifest is not None:
            manifest.record(
                manifest_key, STAGE,
                inputs={"repo": request.repo_id, "commit": commit,
                        "files": {f.path: {"size": f.size, "digest": f.digest} for f in files}},
                settings={"revision": request.revision}, size=total)
        return DownloadResult(request.repo_id, request.revision, commit, dest, tuple(files),
                              total, fetcher.fetched)


@dataclass(frozen=True)
class CheckpointPlan:
    """What a download would bring, from the Hub's file list alone (nothing fetched)."""

    commit: str
    weights_bytes: int
    missing_bytes: int


def plan_download(request: DownloadRequest, dest: Path, *,
                  endpoint: str | None = None) -> CheckpointPlan:
    """Sizes for ``build --dry-run`` before anything is downloaded: the weights (which size
    the conversion and the variants) and what is not yet in ``dest``. One listing request;
    the same errors as a download (unreachable Hub, missing repo, pickle-only weights)."""
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    with hub_errors(request.repo_id, request.revision, endpoint):
        commit, listing = _Fetcher(request, Path(dest), endpoint, no_progress).list_repo()
    side, weights = _choose_files(request.repo_id, commit, listing)
    index = listing.get(INDEX_FILE)
    files = [*side, *weights, *([index] if index else [])]
    have = {f.path: (Path(dest) / f.path).stat().st_size
            for f in files if (Path(dest) / f.path).is_file()}
    missing = sum(f.size for f in files if have.get(f.path) != f.size)
    return CheckpointPlan(commit, sum(f.size for f in weights), missing)


def _choose_files(repo_id: str, commit: str,
                  listing: dict[str, HubFile]) -> tuple[list[HubFile], list[HubFile]]:
    """The side files and (without an index) the weights to fetch; refuse unusable repos."""
    where = f"{repo_id} at {commit[:12]}"
    weights = sorted(p for p in listing if "/" not in p and p.endswith(WEIGHTS_SUFFIX))
    if not weights:
        pickles = sorted(p for p in listing if p.endswith(PICKLE_SUFFIXES))
        if pickles:
            more = f" and {len(pickles) - 2} more" if len(pickles) > 2 else ""
            raise CheckpointError(
                f"{where} has only pickle weights ({', '.join(pickles[:2])}{more})",
                "mathq loads safetensors only, never pickle; choose a revision or repo "
                "with *.safetensors")
        raise CheckpointError(f"{where} has no *.safetensors weights",
                              "check hf_repo in the recipe and --revision")
    if CONFIG_FILE not in listing:
        raise CheckpointError(f"{where} has no {CONFIG_FILE}",
                              "mathq needs a transformers checkpoint (config.json + safetensors)")
    side = [listing[p] for p in SIDE_FILES if p in listing]
    return side, [listing[p] for p in weights]


def _shards_from_index(repo_id: str, commit: str, index_path: Path,
                       listing: dict[str, HubFile]) -> list[HubFile]:
    """The shards the index's weight_map names, each of which the repo must have."""
    where = f"{repo_id} at {commit[:12]}"
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{INDEX_FILE} of {where} has no valid weight_map ({e})",
                              "the checkpoint is broken at this revision; choose another "
                              "with --revision") from e
    if not shards or not all(isinstance(s, str) for s in shards):
        raise CheckpointError(f"{INDEX_FILE} of {where} names no shard files",
                              "the checkpoint is broken at this revision; choose another "
                              "with --revision")
    missing = [s for s in shards if s not in listing or "/" in s]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{INDEX_FILE} names {missing[0]}{more}, which {where} does not have",
            "the checkpoint is incomplete at this revision; choose another with --revision")
    return [listing[s] for s in shards]


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """One download per folder at a time: two writers would interleave the same partials."""
    with exclusive_lock(dest / LOCK_FILE,
                        DownloadError(f"another download is writing to {dest}",
                                      "wait for it to finish, or use another --dir")):
        yield


class _VerifiedFiles:
    """The state file: finished files known to match a digest at a given size and mtime."""

    def __init__(self, dest: Path) -> None:
        self.path = dest / STATE_FILE
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries: dict[str, dict[str, Any]] = dict(data["verified"])
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = {}

    def knows(self, f: HubFile, st: os.stat_result) -> bool:
        entry = self.entries.get(f.path)
        return entry == {"digest": f.digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def mark(self, f: HubFile, final: Path) -> None:
        st = final.stat()
        self.entries[f.path] = {"digest": f.digest, "size": st.st_size,
                                "mtime_ns": st.st_mtime_ns}
        self._save()

    def forget(self, path: str) -> None:
        if self.entries.pop(path, None) is not None:
            self._save()

    def _save(self) -> None:
        write_text_atomic(self.path, json.dumps({"verified": self.entries}, indent=1,
                                                sort_keys=True) + "\n")


class _Fetcher:
    """Lists one repo at one commit and brings files of it into ``dest``."""

    def __init__(self, request: DownloadRequest, dest: Path, endpoint: str,
                 progress: ProgressCallback) -> None:
        self.request, self.dest, self.endpoint, self.progress = request, dest, endpoint, progress
        self.commit = ""
        self.fetched = 0
        self.state = _VerifiedFiles(dest)

    def list_repo(self) -> tuple[str, dict[str, HubFile]]:
        """Resolve the revision and list every file with its size and hashes."""
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, library_name="mathq", library_version=__version__)
        info = api.model_info(self.request.repo_id, revision=self.request.revision,
                              files_metadata=True)
        listing: dict[str, HubFile] = {}
        for s in info.siblings or []:
            if s.size is None or s.blob_id is None or info.sha is None:
                raise DownloadError(
                    f"{self.endpoint} listed {self.request.repo_id} without commit, sizes "
                    "and hashes", "HF_ENDPOINT must point at a Hugging Face Hub or a mirror")
            listing[s.rfilename] = HubFile(
                s.rfilename, s.lfs.size if s.lfs else s.size, s.blob_id,
                s.lfs.sha256 if s.lfs else None)
        self.commit = info.sha or ""
        return self.commit, listing

    def ensure(self, files: list[HubFile], manifest: Manifest | None, key: str,
               report: bool = True) -> None:
        """Make each file present and verified, transferring only what is missing."""
        todo = [f for f in files if not self._complete(f)]
        if not todo:
            return
        if manifest is not None:
            manifest.forget(key)  # the folder is about to change: no record may vouch for it
        have = {f.path: self._partial_size(f) for f in todo}
        total = sum(f.size for f in todo)
        ensure_free_space(self.dest, total - sum(have.values()),
                          f"{self.request.repo_id} at {self.commit[:12]}")
        done = sum(have.values())
        progress, self.progress = self.progress, (self.progress if report else no_progress)
        try:
            for f in todo:
                done = self._fetch(f, have[f.path], done, total)
        finally:
            self.progress = progress

    def remove_stale(self, keep: set[str]) -> None:
        """Delete files this stage wrote for another revision, and their partials."""
        for path in list(self.state.entries):
            if path not in keep:
                (self.dest / path).unlink(missing_ok=True)
                self.state.forget(path)
        for partial in self.dest.glob(f"*{PARTIAL_SUFFIX}"):
            name = partial.name[: -len(PARTIAL_SUFFIX)]
            ours = name in SIDE_FILES or name.endswith((WEIGHTS_SUFFIX, ".index.json"))
            if ours and name not in keep:
                partial.unlink(missing_ok=True)

    def _complete(self, f: HubFile) -> bool:
        final = self.dest / f.path
        if not final.is_file():
            return False
        st = final.stat()
        if st.st_size != f.size:
            return False
        if self.state.knows(f, st):
            return True
        if self._digest(final, f) == f.digest:
            self.state.mark(f, final)
            return True
        return False

    def _partial_size(self, f: HubFile) -> int:
        partial = partial_path(self.dest / f.path)
        size = partial.stat().st_size if partial.is_file() else 0
        if size > f.size:  # cannot be a prefix of this file
            partial.unlink()
            return 0
        return size

    def _fetch(self, f: HubFile, have: int, done: int, total: int) -> int:
        """Transfer the rest of one file, verify it, rename it into place; return ``done``."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        final = self.dest / f.path
        partial = partial_path(final)
        url = hf_hub_url(self.request.repo_id, f.path, revision=self.commit,
                         endpoint=self.endpoint)
        # The token (if any) goes in this header; httpx2 drops it when the Hub redirects
        # to a storage host. Compressed bodies cannot be resumed by byte offset: ask for none.
        headers = build_hf_headers(library_name="mathq", library_version=__version__)
        headers["Accept-Encoding"] = "identity"
        base = done - have  # bytes of earlier files, so the bar counts the whole download
        for attempt in (1, 2):
            with open(partial, "ab") as out:
                self._http_get(http_get, url, out, have, headers, f, base, total)
            got = self._digest(partial, f)
            if got == f.digest:
                os.replace(partial, final)
                self.state.mark(f, final)
                return base + f.size
            partial.unlink()
            if have == 0 or attempt == 2:
                raise IntegrityError(
                    f"{f.path} from {self.request.repo_id} at {self.commit[:12]} does not "
                    f"match its hash: got {got}, the Hub lists {f.digest}",
                    "the bad copy was deleted; rerun to fetch it again")
            # The resumed bytes came from another version of the file: fetch it whole.
            have = 0
        raise AssertionError("unreachable")

    def _http_get(self, http_get: Callable[..., None], url: str, out: Any, have: int,
                  headers: dict[str, str], f: HubFile, base: int, total: int) -> None:
        counter = _byte_counter(self, f, base, total, have)
        try:
            http_get(url, out, resume_size=have, headers=headers, expected_size=f.size,
                     displayed_filename=f.path, tqdm_class=counter)
        except OSError as e:
            from huggingface_hub.errors import HfHubHTTPError

            if isinstance(e, HfHubHTTPError) or e.errno is not None:
                raise  # HTTP errors are mapped by hub_errors; disk errors stay what they are
            # http_get's size check: the server sent fewer or more bytes than it announced.
            raise DownloadError(
                f"the transfer of {f.path} ended at the wrong size ({e.__class__.__name__})",
                "rerun to resume it") from e

    def _digest(self, path: Path, f: HubFile) -> str:
        """The digest of ``path`` in the form ``f.digest`` uses, reporting progress if big."""
        size = path.stat().st_size
        if f.sha256:
            h, kind = hashlib.sha256(), "sha256"
        else:
            h, kind = hashlib.sha1(), "git-sha1"
            h.update(b"blob %d\0" % size)
        report = size >= VERIFY_PROGRESS_MIN
        done = 0
        with open(path, "rb") as fh:
            while block := fh.read(_HASH_CHUNK):
                h.update(block)
                done += len(block)
                if report:
                    self.progress(Progress(VERIFY_STAGE, done, size, "B", item=f.path))
        return f"{kind}:{h.hexdigest()}"


def _byte_counter(fetcher: _Fetcher, f: HubFile, base: int, total: int, have: int) -> type:
    """A tqdm stand-in for http_get that turns its byte updates into Progress events.

    http_get creates it with ``initial`` = bytes already on disk, calls ``update(n)`` per
    chunk (negative when a server ignored the Range request and the file restarts) and uses
    it as a context manager. ``base`` is what earlier files of this run already count, so the
    bar shows the whole download; bytes received are added to ``fetcher.fetched``.
    """

    class _Counter:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.offset = have

        def __enter__(self) -> _Counter:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def update(self, n: float | None = 1) -> None:
            n = int(n or 0)
            self.offset += n
            fetcher.fetched += max(n, 0)
            fetcher.progress(Progress(STAGE, base + self.offset, total, "B", item=f.path))

        def close(self) -> None:
            return None

    return _Counter
