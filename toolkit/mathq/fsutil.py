"""Crash-safe file writing and disk-space checks shared by every stage.

An artifact is always written under a temporary name in its final folder and renamed into
place only when complete and verified, so a killed process never leaves a file that a later
run could take for a finished one. Also here: the exclusive locks on folders two
processes must not write at once, human-readable sizes, and the plain-JSON view of result
dataclasses that ``--json`` output and JSON artifacts share.

:func:`output_error` is the one place where an ``OSError`` on an output path (read-only file
system, no permission, disk full) becomes a one-line :class:`~mathq.errors.OutputError`;
:func:`atomic_outputs`, :func:`make_dirs`, :func:`writing` and :func:`exclusive_lock` use it,
and the command line maps any such error that escapes elsewhere through it too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mathq.errors import DiskSpaceError, MathqError, OutputBusyError, OutputError
from mathq.progress import Progress, ProgressCallback, no_progress

PARTIAL_SUFFIX = ".partial"

#: OS errors that mean "this place cannot be written", with the words a message uses.
WRITE_ERRNOS: dict[int, str] = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EEXIST: "it is a file, not a folder",
    errno.ELOOP: "a loop of symbolic links",
}
#: Of those, the ones that can only come from writing, wherever they are raised.
WRITE_ONLY_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def output_error(err: OSError, path: Path | str | None = None) -> OutputError:
    """The one-line error for an OS error met while writing ``path`` (or ``err.filename``)."""
    target = err.filename if err.filename is not None else path
    reason = os_reason(err)
    folder = Path(str(target)).parent if target is not None else None
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = f"free some space under {folder} or write elsewhere"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = f"make {folder} writable or write elsewhere"
    else:
        hint = "fix the path"
    return OutputError(f"cannot write {target}: {reason}", hint,
                       path=None if target is None else str(target), reason=reason)


def special_file_problem(mode: int) -> str | None:
    """Why a path of this ``st_mode`` is no regular file ("is a named pipe (FIFO), not a
    regular file"), or None for a regular file: an input that is one would block or never
    end, and an output that is one would be replaced or written without end."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a special file")
    return f"is {kind}, not a regular file"


def os_reason(err: OSError) -> str:
    """The words for an OS error in a message ("permission denied", "read-only file system")."""
    return WRITE_ERRNOS.get(err.errno or 0) or (err.strerror or str(err)).lower()


READ_HINT = "make it readable (e.g. chmod a+r) or check the path"


def _is_output_error(err: OSError, folder: Path) -> bool:
    """Whether an OS error raised while writing into ``folder`` is about that output."""
    if isinstance(err, MathqError):
        return False
    if err.errno in WRITE_ONLY_ERRNOS:
        return True
    if err.errno not in WRITE_ERRNOS:
        return False
    name = err.filename
    return name is None or Path(str(name)).absolute().is_relative_to(folder.absolute())


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Map OS errors about writing ``path`` (or anything in its folder) raised in the block
    to :class:`OutputError`; other errors pass unchanged."""
    path = Path(path)
    try:
        yield
    except OSError as e:
        if _is_output_error(e, path if path.is_dir() else path.parent):
            raise output_error(e, path) from None
        raise


def make_dirs(folder: Path) -> None:
    """``mkdir -p`` with a clean error when the folder cannot be made."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # something that is not a folder has the name
        try:
            problem = special_file_problem(os.stat(folder).st_mode)
        except OSError as inner:  # a loop of links, most likely
            raise output_error(inner, folder) from None
        if problem is None or problem == "is a directory":
            raise output_error(e, folder) from None
        raise OutputError(f"cannot write {folder}: it "
                          f"{problem.replace('not a regular file', 'not a folder')}",
                          "fix the path", path=str(folder), reason=problem) from None
    except OSError as e:
        raise output_error(e, folder) from None


def new_dirs(folder: Path) -> list[Path]:
    """The folders ``make_dirs(folder)`` would create, outermost first (to remove them
    again when the command fails before writing anything into them)."""
    missing: list[Path] = []
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


class Debris:
    """What a command may leave behind if it fails: files and folders that did not exist
    when it started. :meth:`remove` deletes those (empty folders only), so a failed run
    leaves the disk as it found it; files that hold resumable progress are simply not
    listed."""

    def __init__(self, folder: Path, *files: Path) -> None:
        self.dirs = new_dirs(folder)
        self.files = [Path(f) for f in files if not Path(f).exists()]

    def remove(self, keep: tuple[Path, ...] = ()) -> None:
        """Delete the new files (bar ``keep``) and every new folder left empty."""
        for f in self.files:
            if f not in keep:
                with contextlib.suppress(OSError):
                    f.unlink(missing_ok=True)
        for d in reversed(self.dirs):
            with contextlib.suppress(OSError):
                d.rmdir()


@contextlib.contextmanager
def removing_new_dirs(folder: Path) -> Iterator[None]:
    """Run the block; if it fails, remove the folders under ``folder`` it created that are
    still empty, so a failed command leaves nothing behind."""
    created = new_dirs(folder)
    try:
        yield
    except BaseException:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def partial_path(final: Path) -> Path:
    """The temporary name used while ``final`` is being written."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


@contextlib.contextmanager
def atomic_outputs(*finals: Path, wait_s: float = 0.0) -> Iterator[dict[Path, Path]]:
    """Yield ``{final: temporary path}`` for files that belong together (a report's pages and
    plots, a recipe's Modelfiles, or one file); rename every one into place if the block
    succeeds, delete every one otherwise. A failure (a full disk, Ctrl-C, a bug) thus leaves
    the old set of files or none, never some new ones beside old ones.

    Each temporary file (``<final>.partial``, in ``final``'s folder so the rename is atomic)
    is locked while this run owns it, all of them before the block runs: a second run
    writing the same file is refused at once with :class:`~mathq.errors.OutputBusyError`
    instead of writing into, renaming or deleting the first run's file. One left by a killed
    run holds no lock any more and is reused. Opening them first also proves the folders
    writable before any long work runs. ``wait_s``: how long to wait for another run's
    lock first, for files written in an instant (a summary, a cache index), where the
    other run is about to finish, not in the middle of an hour's work.
    """
    finals = tuple(Path(f) for f in finals)
    held: list[tuple[Path, int]] = []
    try:
        for final in finals:
            make_dirs(final.parent)
            refuse_special_output(final)
            tmp = partial_path(final)
            try:
                fd = _lock_file(tmp, wait_s)
                if fd is not None:
                    held.append((tmp, fd))
                    os.ftruncate(fd, 0)
            except OSError as e:
                raise output_error(e, tmp) from None
            if fd is None:
                raise _busy(final)
        with contextlib.ExitStack() as stack:
            for final in finals:
                stack.enter_context(writing(final))
            yield {final: tmp for final, (tmp, _fd) in zip(finals, held, strict=True)}
            for final, (tmp, _fd) in zip(finals, held, strict=True):
                os.replace(tmp, final)
    except BaseException:
        for tmp, _fd in held:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise
    finally:
        for _tmp, fd in held:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temporary path; rename it to ``final`` if the block succeeds, else delete it
    (:func:`atomic_outputs` for one file: locked, a stale one reused)."""
    with atomic_outputs(final) as staged:
        yield staged[Path(final)]


def refuse_special_output(final: Path) -> None:
    """Raise :class:`OutputError` when ``final`` exists (through any links) and is a named
    pipe, a device or a socket: renaming a finished file over it would silently replace
    what the user named (as root, even ``/dev/null``). A folder there fails at the rename
    with its own words."""
    try:
        mode = os.stat(final).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:  # the rename would replace the link: name it instead
            raise output_error(e, final) from None
        return  # missing (the usual case), or a problem the write itself will name
    problem = special_file_problem(mode)
    if problem is not None and not stat.S_ISDIR(mode):
        raise OutputError(f"cannot write {final}: it {problem}",
                          "choose another output path", path=str(final), reason=problem)


def check_writable(final: Path) -> None:
    """Raise :class:`OutputError` now unless ``final``'s folder (made if missing) takes a new
    file, or :class:`~mathq.errors.OutputBusyError` if another run is writing ``final``: for
    commands that would otherwise find out only after their long work. A folder made here
    is removed again when the check fails."""
    final = Path(final)
    with removing_new_dirs(final.parent):
        make_dirs(final.parent)
        refuse_special_output(final)
        probe = partial_path(final)
        try:
            fd = _lock_file(probe)
            if fd is None:
                raise _busy(final)
            try:
                if os.fstat(fd).st_size == 0:
                    probe.unlink()
            finally:
                os.close(fd)
        except OSError as e:
            raise output_error(e, probe) from None


def _busy(final: Path) -> OutputBusyError:
    return OutputBusyError(f"another mathq command is writing {final}",
                           "wait for it to finish, then run this again")


#: How long a small text file's writer waits for another run writing the same file.
TEXT_WAIT_S = 10.0


def write_text_atomic(final: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` through a temporary name. Two runs writing the
    same small file (a summary, the digest cache) take turns; the later one's text stays."""
    with atomic_outputs(final, wait_s=TEXT_WAIT_S) as staged:
        staged[Path(final)].write_text(text, encoding="utf-8")


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
            "free some space, or write elsewhere",
        )


def format_bytes(n: float) -> str:
    """Human-readable size in binary units, e.g. ``4.07 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def public_name(text: str) -> str:
    """``text`` as metadata that may leave this machine names it: a path (alone, or after a
    ``label: ``) becomes its file name, so no folder of the publisher's machine is written
    into a GGUF that is uploaded. A path is absolute, relative to a parent or home folder
    (``../x``, ``~/x``), or names something that exists here (``data/calib.txt``); anything
    else is kept (a Hub source such as ``owner/set@commit/file`` is public)."""
    label, sep, rest = text.rpartition(": ")
    value = rest if sep else text
    local = (os.path.isabs(value) or value.startswith(("./", "../", "~")) or "/.." in value
             or (os.sep in value and os.path.exists(value)))
    return f"{label}{sep}{Path(value).name}" if local else text


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks so memory stays flat on multi-GB files."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _lock_file(path: Path, wait_s: float = 0.0) -> int | None:
    """Open ``path`` (made if missing) and lock it exclusively; the descriptor, or None when
    another process holds the lock (for up to ``wait_s`` seconds). A holder may rename or
    delete the file between our open and our lock (it finished); the lock is then on a file
    that no longer has this name, so the open is retried until the locked file is the one
    ``path`` names."""
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    return fd
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
            continue
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, busy: MathqError) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` for the block, or raise ``busy`` at once if
    another process holds it: two writers of the same files would interleave their output,
    and waiting silently behind a long run is worse than saying so. The lock file is
    deleted when the block ends (the same lock as :func:`atomic_outputs`' on its files)."""
    lock_file = Path(lock_file)
    try:
        fd = _lock_file(lock_file)
    except OSError as e:
        raise output_error(e, lock_file) from None
    if fd is None:
        raise busy
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_file.unlink()
        os.close(fd)


@contextlib.contextmanager
def output_lock(final: Path) -> Iterator[None]:
    """Hold ``<final>.lock`` while a long computation whose result is written to ``final``
    only at its end runs (an importance matrix, a benchmark): a second run making the same
    file is refused at once, not when it comes to write after an hour's work. A folder made
    for it is removed again if the block fails."""
    final = Path(final)
    with removing_new_dirs(final.parent):
        make_dirs(final.parent)
        with exclusive_lock(final.with_name(final.name + ".lock"), _busy(final)):
            yield


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


def sha256_cached(path: Path, cache: Path, progress: ProgressCallback = no_progress, *,
                  save: bool = True) -> str:
    """Hex SHA-256 of ``path``, from ``cache`` when size and mtime still match, else computed
    (and added to ``cache`` unless ``save`` is false: a dry run writes nothing).

    ``cache`` is a build folder's ``digests.json``, shared by the report (each file's hash)
    and publish (blob digests), so a multi-GB file is read once.

    Hashing streams the file in 4 MiB chunks (memory stays flat) and reports ``sha256``
    progress in bytes.
    """
    path = Path(path)
    if (known := cached_digest(path, cache)) is not None:
        return known
    st = path.stat()
    key = _digest_key(path, cache)
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
    if save and (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
        entries = _load_digests(cache)  # another process may have added entries meanwhile
        entries[key] = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        _save_digests(cache, entries)
    return digest


def cached_digest(path: Path, cache: Path) -> str | None:
    """``path``'s SHA-256 from ``cache`` when its size and mtime still match, else None
    (nothing is read but the cache)."""
    st = Path(path).stat()
    entry = _load_digests(cache).get(_digest_key(Path(path), cache))
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return str(entry["sha256"])
    return None


def forget_digest(path: Path, cache: Path) -> None:
    """Drop ``path``'s entry, so the next :func:`sha256_cached` reads the file again."""
    entries = _load_digests(cache)
    if entries.pop(_digest_key(path, cache), None) is not None:
        _save_digests(cache, entries)
