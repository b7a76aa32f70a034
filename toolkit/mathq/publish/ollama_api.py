"""The part of Ollama's REST API that publishing uses, over httpx2, with errors that help.

Five calls: ``HEAD /api/blobs/<digest>`` (does the server have these bytes?), ``POST
/api/blobs/<digest>`` (send them, streamed from disk; Ollama hashes what it receives and
answers 400 ``digest mismatch`` when it differs), ``POST /api/create`` and ``POST /api/push``
(both stream one JSON status per line and report failure as an ``{"error": ...}`` line, often
after a 200), and ``POST /api/show`` (does a model exist?). Behaviour follows Ollama's
``server/routes.go`` and ``server/images.go``, read, not copied.

mathq talks to the API with httpx2, which it already uses through huggingface_hub, rather
than the ``ollama`` package: that package brings a second HTTP stack (httpx) and pydantic, and
its ``create_blob`` rehashes the whole file and uploads it without asking whether the server
already has it, which is what a rerun of a multi-GB publish must avoid.

Failures become :class:`~mathq.errors.ServerError` (unreachable server, refused create or
push, with the fix: ``ollama serve``, ``--ollama-host``/``OLLAMA_HOST``, registering the
server's key at ollama.com) or :class:`~mathq.errors.IntegrityError` (digest mismatch).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathq import __version__
from mathq.errors import IntegrityError, ServerError
from mathq.progress import Progress, ProgressCallback, no_progress

HOST_ENV = "OLLAMA_HOST"
DEFAULT_PORT = "11434"
UPLOAD_CHUNK = 1 << 20
KEYS_URL = "https://ollama.com/settings/keys"
_REACH_HINT = ("start it with `ollama serve`, or point --ollama-host (or OLLAMA_HOST) "
               "at the server")


def ollama_base_url(host: str | None = None) -> str:
    """The server's base URL from ``host``, else ``$OLLAMA_HOST``, else Ollama's default.

    Read as Ollama's own client reads ``OLLAMA_HOST``: an optional scheme (``http`` unless
    given; ``http://`` and ``https://`` without a port mean ports 80 and 443), a host name
    or IP (default 127.0.0.1) and a port (default 11434).
    """
    value = (host if host is not None else os.environ.get(HOST_ENV, "")).strip()
    scheme, sep, rest = value.partition("://")
    port = DEFAULT_PORT
    if not sep:
        scheme, rest = "http", value
    elif scheme in ("http", "https"):
        port = "80" if scheme == "http" else "443"
    else:
        raise ServerError(f"Ollama host {value!r} has scheme {scheme!r}",
                          "use http://HOST:PORT or https://HOST:PORT")
    hostport, _, path = rest.partition("/")
    name, has_port, given = hostport.rpartition(":")
    if has_port and given.isdigit() and (not name.count(":") or name.startswith("[")):
        hostname, port = name, given
    else:
        hostname = hostport
    hostname = hostname.strip("[]") or "127.0.0.1"
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(hostname).version == 6:
            hostname = f"[{hostname}]"
    base = f"{scheme}://{hostname}:{port}"
    return f"{base}/{path.strip('/')}" if path.strip("/") else base


@dataclass(frozen=True)
class Status:
    """One streamed status line of create or push."""

    status: str
    digest: str = ""
    total: int | None = None
    completed: int | None = None


#: Seconds a question to the server (does it have this blob, this model?) may take: it
#: answers those at once, so a server that does not is hung, not busy.
QUICK_TIMEOUT_S = 30.0


class OllamaAPI:
    """A client for one Ollama server; use as a context manager to close its connections."""

    def __init__(self, base_url: str, timeout: float = 600.0) -> None:
        import httpx2

        self.base_url = base_url.rstrip("/")
        # Connecting fails fast; reads may wait long: push streams a status only as the
        # registry answers, and create parses a multi-GB GGUF header before its first line.
        self._http = httpx2.Client(
            base_url=self.base_url, timeout=httpx2.Timeout(timeout, connect=10.0),
            headers={"User-Agent": f"mathq/{__version__}"}, follow_redirects=True)

    def __enter__(self) -> OllamaAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    @staticmethod
    def _quick() -> object:
        import httpx2

        return httpx2.Timeout(QUICK_TIMEOUT_S, connect=10.0)

    # -- blobs -------------------------------------------------------------------------------

    def check(self) -> str:
        """The server's version (``GET /api/version``), asked before any work: an
        unreachable, hung or foreign server is named at once, not after hashing GGUFs."""
        with self._errors("ask its version"):
            r = self._http.get("/api/version", timeout=self._quick())
        try:
            version = r.json().get("version") if r.status_code == 200 else None
        except (ValueError, AttributeError):
            version = None
        if not isinstance(version, str):
            raise ServerError(f"{self.base_url} does not answer like an Ollama server "
                              f"(GET /api/version: HTTP {r.status_code})",
                              "check --ollama-host (or OLLAMA_HOST), e.g. "
                              "http://127.0.0.1:11434")
        return version

    def has_blob(self, digest: str) -> bool:
        """Whether the server already holds the blob ``digest`` (``sha256:<hex>``)."""
        with self._errors("check blob " + digest):
            r = self._http.head(f"/api/blobs/{digest}", timeout=self._quick())
        if r.status_code == 200:
            return True
        if r.status_code == 404:
            return False
        raise self._http_error(r, f"check blob {digest}")

    def upload_blob(self, path: Path, digest: str,
                    progress: ProgressCallback = no_progress) -> None:
        """Stream ``path`` to ``POST /api/blobs/<digest>``; the server checks the digest.

        The file is read in 1 MiB chunks, never whole. A 400 ``digest mismatch`` means the
        server hashed other bytes than ``digest`` names: :class:`IntegrityError`.
        """
        path = Path(path)
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            done = 0
            progress(Progress("upload", 0, size, "B", item=path.name))
            with open(path, "rb") as f:
                while block := f.read(UPLOAD_CHUNK):
                    done += len(block)
                    yield block
                    progress(Progress("upload", done, size, "B", item=path.name))

        with self._errors(f"upload {path.name}"):
            # An explicit length makes httpx2 stream the body as is, not chunk-encoded.
            r = self._http.post(f"/api/blobs/{digest}", content=chunks(),
                                headers={"Content-Length": str(size),
                                         "Content-Type": "application/octet-stream"})
        if r.status_code in (200, 201):
            return
        message = _error_text(r)
        if r.status_code == 400 and "digest mismatch" in message:
            raise IntegrityError(
                f"Ollama at {self.base_url} received other bytes for {path.name} than mathq "
                f"hashed ({message})",
                "the file changed after it was hashed; rerun, and mathq hashes it again")
        raise self._http_error(r, f"upload {path.name}")

    # -- models ------------------------------------------------------------------------------

    def has_model(self, name: str) -> bool:
        """Whether the server has a model called ``name`` (``POST /api/show``)."""
        with self._errors(f"look up {name}"):
            r = self._http.post("/api/show", json={"model": name}, timeout=self._quick())
        if r.status_code == 200:
            return True
        if r.status_code == 404:
            return False
        raise self._http_error(r, f"look up {name}")

    def create(self, body: dict[str, Any],
               progress: ProgressCallback = no_progress) -> list[Status]:
        """``POST /api/create`` with ``body`` (streamed); returns the status lines."""
        name = str(body["model"])
        return self._stream("/api/create", {**body, "stream": True}, "create", name, progress)

    def push(self, name: str, progress: ProgressCallback = no_progress) -> list[Status]:
        """``POST /api/push``: the server uploads ``name`` to its registry (streamed)."""
        return self._stream("/api/push", {"model": name, "stream": True}, "push", name,
                            progress)

    # -- plumbing ----------------------------------------------------------------------------

    def _stream(self, url: str, body: dict[str, Any], what: str, name: str,
                progress: ProgressCallback) -> list[Status]:
        statuses: list[Status] = []
        with self._errors(f"{what} {name}"), self._http.stream("POST", url, json=body) as r:
            if r.status_code >= 400:
                r.read()
                self._refuse(what, name, _error_text(r), r.status_code)
            for line in r.iter_lines():
                if not line.strip():
                    continue
                try:
                    part = json.loads(line)
                except ValueError:
                    raise ServerError(f"Ollama at {self.base_url} sent a line that is not JSON "
                                      f"while {what} {name} ran", "is --ollama-host an Ollama "
                                      "server?") from None
                if part.get("error"):
                    self._refuse(what, name, str(part["error"]), r.status_code)
                st = Status(str(part.get("status", "")), str(part.get("digest") or ""),
                            part.get("total"), part.get("completed"))
                statuses.append(st)
                if st.total:
                    progress(Progress(what, st.completed or 0, st.total, "B", item=name,
                                      info=st.status))
                else:
                    progress(Progress(what, len(statuses), None, "", item=name, info=st.status))
        if not statuses or statuses[-1].status != "success":
            raise ServerError(f"Ollama's answer to {what} {name} ended before it said success",
                              "rerun; what is finished is not sent again")
        return statuses

    def _refuse(self, what: str, name: str, message: str, status: int) -> None:
        """Raise the error for a refused create or push, with the fix where one is known."""
        low = message.lower()
        if what == "push" and "unknown ollama key" in low:
            raise ServerError(
                f"the registry refused to push {name}: the public key of the Ollama server at "
                f"{self.base_url} is not registered with an ollama.com account",
                "add ~/.ollama/id_ed25519.pub of the machine running `ollama serve` at "
                f"{KEYS_URL}, then rerun")
        if what == "push" and ("unauthorized" in low or "access denied" in low):
            raise ServerError(f"the registry refused to push {name} ({message})",
                              "push to a namespace your ollama.com account owns (--namespace "
                              "<your user name>), from a server whose key is registered at "
                              f"{KEYS_URL}")
        raise ServerError(f"Ollama at {self.base_url} refused to {what} {name}: {message}",
                          f"HTTP {status}; check the server's log (`journalctl -u ollama` or "
                          "the terminal running `ollama serve`)")

    def _http_error(self, r: Any, what: str) -> ServerError:
        return ServerError(f"Ollama at {self.base_url} answered HTTP {r.status_code} to "
                           f"{what}: {_error_text(r)}",
                           "is --ollama-host (or OLLAMA_HOST) an Ollama server?")

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        import httpx2

        try:
            yield
        except httpx2.ConnectError as e:
            raise ServerError(f"cannot connect to Ollama at {self.base_url}", _REACH_HINT) from e
        except httpx2.TimeoutException as e:
            raise ServerError(f"Ollama at {self.base_url} did not answer in time ({what})",
                              "check that the server is not stuck; rerun, and what is "
                              "finished is not sent again") from e
        except httpx2.TransportError as e:
            raise ServerError(f"the connection to Ollama at {self.base_url} failed during "
                              f"{what} ({type(e).__name__})",
                              "rerun; what is finished is not sent again") from e


def _error_text(r: Any) -> str:
    """The ``error`` field of an Ollama error body, or the start of the body."""
    try:
        data = r.json()
        if isinstance(data, dict) and data.get("error"):
            return str(data["error"])
    except ValueError:
        pass
    text = (r.text or "").strip()
    return text[:200] if text else f"HTTP {r.status_code}"
