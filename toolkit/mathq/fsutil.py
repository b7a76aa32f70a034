"""Crash-safe file writing and disk-space checks shared by every stage.

An artifact is always written under a temporary name in its final folder and renamed into
place only when complete and verified, so a killed process never leaves a file that a later
run could take for a finished one. Also here: the exclusive locks on folders two
processes must not write at once, human-readable sizes, and the plain-JSON view of result
dataclasses that ``--json`` output and JSON artifacts share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mathq.errors import DiskSpaceError, MathqError

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
