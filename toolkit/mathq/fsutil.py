"""Crash-safe file writing and disk-space checks shared by every stage.

An artifact is always written under a temporary name in its final folder and renamed into
place only when complete and verified, so a killed process never leaves a file that a later
run could take for a finished one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mathq.errors import DiskSpaceError, MathqError
from mathq.progress import Progress, ProgressCallback, no_progress

PARTIAL_SUFFIX = ".partial"


def partial_path(final: Path) -> Path:
    """The temporary name used while ``final`` is being written."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temporary path; rename it to ``final`` if the block succeeds, else delete it.

    The temporary file lives in ``final``'s folder so the rename is atomic on one filesystem.
    A stale temporary file from an earlier, killed run is removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(final: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` through a temporary name."""
    with atomic_output(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_free_space(path: Path, needed: int, what: str) -> None:
    """Raise :class:`DiskSpaceError` unless ``needed`` bytes fit under ``path``."""
    free = free_bytes(path)
    if needed > free:
        raise DiskSpaceError(
            f"not enough disk space for {what}: needs {format_bytes(needed)}, "
            f"{format_bytes(free)} free under {path}",
            "free some space or choose another folder with --dir",
        )


def format_bytes(n: float) -> str:
    """Human-readable size in binary units, e.g. ``4.07 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks so memory stays flat on multi-GB files."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, busy: MathqError) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` for the block, or raise ``busy`` at once if
    another process holds it: two writers of the same files would interleave their output,
    and waiting silently behind a long run is worse than saying so."""
    from filelock import FileLock, Timeout

    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise busy from None
    try:
        yield
    finally:
        lock.release()


def to_jsonable(value: Any) -> Any:
    """Recursively turn dataclasses, paths, tuples and mappings into JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


_DIGEST_CHUNK = 1 << 22


def _digest_key(path: Path, cache: Path) -> str:
    """The file's name when it sits beside the cache (a build folder can move), else its path."""
    path = Path(path).absolute()
    return path.name if path.parent == Path(cache).absolute().parent else str(path)


def _load_digests(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(cache).read_text(encoding="utf-8"))
        return dict(data["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # a missing or damaged cache only costs a rehash


def _save_digests(cache: Path, entries: dict[str, Any]) -> None:
    write_text_atomic(Path(cache), json.dumps({"files": entries}, indent=1, sort_keys=True) + "\n")


def sha256_cached(path: Path, cache: Path, progress: ProgressCallback = no_progress) -> str:
    """Hex SHA-256 of ``path``, from ``cache`` when size and mtime still match, else computed.

    ``cache`` is a build folder's ``digests.json``, shared by the report (each file's hash)
    and publish (blob digests), so a multi-GB file is read once.

    Hashing streams the file in 4 MiB chunks (memory stays flat) and reports ``sha256``
    progress in bytes.
    """
    path = Path(path)
    st = path.stat()
    key = _digest_key(path, cache)
    entries = _load_digests(cache)
    entry = entries.get(key)
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return str(entry["sha256"])
    h = hashlib.sha256()
    done = 0
    progress(Progress("sha256", 0, st.st_size, "B", item=path.name))
    with open(path, "rb") as f:
        while block := f.read(_DIGEST_CHUNK):
            h.update(block)
            done += len(block)
            progress(Progress("sha256", done, st.st_size, "B", item=path.name))
    digest = h.hexdigest()
    after = path.stat()
    if (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
        entries = _load_digests(cache)  # another process may have added entries meanwhile
        entries[key] = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        _save_digests(cache, entries)
    return digest


def forget_digest(path: Path, cache: Path) -> None:
    """Drop ``path``'s entry, so the next :func:`sha256_cached` reads the file again."""
    entries = _load_digests(cache)
    if entries.pop(_digest_key(path, cache), None) is not None:
        _save_digests(cache, entries)
