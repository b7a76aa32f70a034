"""What the hostile-input suite needs: hostile servers, read-only and full disks, snapshots.

- :class:`HostileServer`: a TCP listener on 127.0.0.1 that misbehaves in one way: ``hang``
  (reads the request, never answers), ``reset`` (closes with a TCP reset), ``garbage`` (bytes
  that are not HTTP), ``notjson`` (HTTP 200 whose body is not JSON), ``trickle`` (a 200
  answer whose body arrives a byte at a time, never finishing), ``http500``.
- :func:`read_only_dir`: a folder on a read-only file system: a real read-only bind mount
  where this process may mount (root, as in CI), else ``None`` and the caller simulates
  EROFS by patching the OS calls (:func:`simulate_os_error`).
- :func:`full_dir`: a folder on a 256 KiB tmpfs (real ENOSPC), or ``None`` where mounting is
  not allowed.
- :func:`snapshot`: every path under a folder with its size, mode and content hash, so a case
  can assert that a failed command left nothing behind and changed no input.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# The real open(), kept before any test patches it: snapshots read through simulated faults.
_REAL_OPEN = open

# --- servers -----------------------------------------------------------------------------


class HostileServer:
    """One misbehaving TCP server; :attr:`url` is ``http://127.0.0.1:PORT``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._stop = threading.Event()
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        self._open.append(conn)
        conn.settimeout(1.0)
        with contextlib.suppress(OSError):
            conn.recv(65536)
            if self.mode == "hang":
                self._stop.wait()
            elif self.mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif self.mode == "garbage":
                conn.sendall(b"\x00\xff\xfeSSH-2.0-not-http\r\n\r\n" + os.urandom(64))
            elif self.mode == "notjson":
                body = b"<html>surprise</html>"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                             + body)
            elif self.mode == "http500":
                body = b'{"error": "boom"}'
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: "
                             b"application/json\r\nContent-Length: %d\r\nConnection: close"
                             b"\r\n\r\n" % len(body) + body)
            elif self.mode == "trickle":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000000\r\n\r\n")
                while not self._stop.is_set():
                    conn.sendall(b" ")
                    time.sleep(0.05)
        with contextlib.suppress(OSError):
            conn.close()

    def close(self) -> None:
        self._stop.set()
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.close()
        self._sock.close()
        self._thread.join(timeout=2)


def closed_port_url() -> str:
    """A URL on which nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- file systems ------------------------------------------------------------------------


def _mount(*args: str) -> bool:
    """Run mount(8); False where it is not allowed (not root, or a container without the
    capability) or where MATHQ_TEST_NO_MOUNT is set (to exercise the simulated path)."""
    if os.geteuid() != 0 or os.environ.get("MATHQ_TEST_NO_MOUNT"):
        return False
    try:
        return subprocess.run(["mount", *args], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10, check=False)


@contextlib.contextmanager
def read_only_dir(root: Path) -> Iterator[Path | None]:
    """``root/ro``, a read-only bind mount of ``root/ro-src`` (which holds ``in.jsonl``), or
    None where this process may not mount."""
    src, ro = root / "ro-src", root / "ro"
    src.mkdir()
    ro.mkdir()
    (src / "in.jsonl").write_text('{"id": "1", "answer": "5", "completion": "\\\\boxed{5}"}\n')
    if not (_mount("--bind", str(src), str(ro)) and _mount("-o", "remount,ro,bind", str(ro))):
        _umount(ro)
        (ro / "in.jsonl").write_bytes((src / "in.jsonl").read_bytes())  # as a mount shows it
        yield None
        return
    try:
        yield ro
    finally:
        _umount(ro)


@contextlib.contextmanager
def full_dir(root: Path) -> Iterator[Path | None]:
    """``root/full``, a tmpfs of 256 KiB (writes beyond it fail with ENOSPC), or None."""
    full = root / "full"
    full.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(full)):
        yield None
        return
    try:
        yield full
    finally:
        _umount(full)


def simulate_os_error(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int,
                      reads: bool = False) -> None:
    """Make every attempt to create, open for writing, rename or delete a path under
    ``folder`` fail with ``code`` (EROFS, EACCES, ENOSPC), and with ``reads`` every open
    for reading too: for what root cannot make real (a folder without permission, an
    unreadable file) and for machines where a read-only or full file system cannot be
    mounted."""
    folder = Path(folder).absolute()

    def under(path: object) -> bool:
        try:
            return Path(os.fsdecode(path)).absolute().is_relative_to(folder)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def fail(path: object) -> OSError:
        return OSError(code, os.strerror(code), os.fsdecode(path))  # type: ignore[arg-type]

    real_open, real_os_open = open, os.open
    writing_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def guarded_os_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if (reads or flags & writing_flags) and under(path):
            raise fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, (str, bytes, os.PathLike)) and (reads or set(mode) & set("wax+")) \
                and under(file):
            raise fail(file)
        return real_open(file, mode, *args, **kwargs)

    for name in ("mkdir", "unlink", "rmdir", "remove"):
        real = getattr(os, name)

        def guarded(path, *args, _real=real, **kwargs):  # type: ignore[no-untyped-def]
            if under(path):
                raise fail(path)
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, guarded)
    real_replace = os.replace

    def guarded_replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if under(dst):
            raise fail(dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", guarded_replace)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr("builtins.open", guarded_open)
    monkeypatch.setattr("io.open", guarded_open)


# --- snapshots ---------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every path under ``root``: kind, size and SHA-256 (files), so two snapshots are equal
    exactly when nothing was added, removed or changed. Mount points are read through."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath) / d
            out[str(p.relative_to(root))] = ("dir", 0, "")
        for f in filenames:
            p = Path(dirpath) / f
            rel = str(p.relative_to(root))
            if p.is_symlink() or not p.is_file():
                out[rel] = ("other", 0, "")
                continue
            h = hashlib.sha256()
            with _REAL_OPEN(p, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
            out[rel] = ("file", p.stat().st_size, h.hexdigest())
    return out


def make_fifo(path: Path) -> Path:
    """A named pipe: opening it for reading would block until a writer comes."""
    os.mkfifo(path)
    return path


ENOSPC, EROFS, EACCES = errno.ENOSPC, errno.EROFS, errno.EACCES
