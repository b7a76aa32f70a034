"""A stand-in for an Ollama server on 127.0.0.1, speaking the endpoints ``mathq publish`` uses.

It behaves as Ollama's ``server/routes.go`` and ``server/images.go`` do (read, not copied):

- ``GET /api/version``: ``{"version": "0.12.0"}`` (mathq asks it before any work);
- ``HEAD /api/blobs/<digest>``: 200 if the blob is stored, 404 if not, 400 for a digest that
  is not ``sha256:<64 hex>``;
- ``POST /api/blobs/<digest>``: 200 at once if stored; else the body (``Content-Length`` or
  chunked) is hashed as it arrives and stored, 201; 400 ``digest mismatch, expected ...,
  got ...`` when the bytes hash to something else, and nothing is stored;
- ``POST /api/create``: 400 for an invalid model name or a missing body; else a stream of
  status lines (``parsing GGUF``, ``using existing layer`` / ``creating new layer``,
  ``writing manifest``, ``success``), or an ``{"error": ...}`` line after a 200 when a file's
  blob is missing or is not a GGUF, as Ollama reports failures of its create goroutine;
- ``POST /api/show``: the model's template, license and parameters, or 404;
- ``POST /api/push``: ``retrieving manifest``, one ``pushing <digest>`` line per chunk of
  each layer (a layer the registry already has is reported complete at once), ``pushing
  manifest``, ``success``; :meth:`FakeOllama.refuse_push` makes it answer as Ollama does when
  the registry refuses: ``unauthorized: unknown ollama key "<key>"`` (the server's key is not
  registered at ollama.com) or ``unauthorized: access denied`` (a namespace not owned).

Every request is logged in :attr:`FakeOllama.requests` (JSON bodies parsed, blob bodies
counted, never kept twice).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"
_NAME = re.compile(rf"^(?:(?:{_PART})/)?{_PART}(?::{_PART})?$")
FAKE_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFake"


@dataclass(frozen=True)
class OllamaRequest:
    """One request: method, path, the JSON body (if any) and how many body bytes came."""

    method: str
    path: str
    body: dict[str, Any] | None
    n_bytes: int


@dataclass
class FakeOllama:
    """The server's blobs, models and registry, served while the context is open."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    registry: dict[str, list[str]] = field(default_factory=dict)
    registry_blobs: set[str] = field(default_factory=set)
    requests: list[OllamaRequest] = field(default_factory=list)
    push_refusal: str | None = None
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refuse_push(self, kind: str | None) -> None:
        """``unknown-key``, ``access-denied``, or None to push normally again."""
        assert kind in (None, "unknown-key", "access-denied")
        self.push_refusal = kind

    def sent(self, method: str, prefix: str) -> list[OllamaRequest]:
        """The logged requests with this method whose path starts with ``prefix``."""
        return [r for r in self.requests if r.method == method and r.path.startswith(prefix)]

    @property
    def url(self) -> str:
        """The base URL, for --ollama-host."""
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeOllama:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.ollama = self  # type: ignore[attr-defined]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def _log(self, req: OllamaRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def layers(self, name: str) -> list[str]:
        """The digests of a created model's layers: its files, then the small layers."""
        body = self.models[name]
        out = [_norm(d) for d in body.get("files", {}).values()]
        for key in ("template", "system", "license", "parameters", "messages"):
            if key in body:
                out.append(_small_layer(body[key])[0])
        return out


def _norm(digest: str) -> str:
    m = _DIGEST.match(digest)
    return f"sha256:{m.group(1).lower()}" if m else digest


def _small_layer(value: Any) -> tuple[str, bytes]:
    data = value.encode() if isinstance(value, str) else json.dumps(value).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the request log is :attr:`FakeOllama.requests`."""

    @property
    def ollama(self) -> FakeOllama:
        return self.server.ollama

    # -- bodies ------------------------------------------------------------------------------

    def _body_chunks(self):
        """Yield the request body in pieces, from Content-Length or chunked encoding."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                if not (yield from self._read(size)):
                    return
                self.rfile.readline()
        else:
            yield from self._read(int(self.headers.get("Content-Length") or 0))

    def _read(self, left: int):
        """Yield the next ``left`` bytes in pieces of at most 1 MiB, never holding a whole blob;
        return whether they all came (False: the client stopped sending)."""
        while left:
            piece = self.rfile.read(min(left, 1 << 20))
            if not piece:
                return False
            left -= len(piece)
            yield piece
        return True

    def _json_body(self) -> tuple[dict[str, Any] | None, int]:
        raw = b"".join(self._body_chunks())
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        return (data if isinstance(data, dict) else None), len(raw)

    # -- answers -----------------------------------------------------------------------------

    def _send_json(self, status: int, value: Any) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _line(self, value: dict[str, Any]) -> None:
        data = json.dumps(value).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- routes ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self.ollama._log(OllamaRequest("GET", self.path, None, 0))
        if self.path == "/api/version":
            return self._send_json(200, {"version": "0.12.0"})
        return self._send_json(404, {"error": "404 page not found"})

    def do_HEAD(self) -> None:
        self.ollama._log(OllamaRequest("HEAD", self.path, None, 0))
        if not self.path.startswith("/api/blobs/"):
            return self._send_empty(404)
        digest = self.path[len("/api/blobs/"):]
        if not _DIGEST.match(digest):
            return self._send_empty(400)
        return self._send_empty(200 if _norm(digest) in self.ollama.blobs else 404)

    def do_POST(self) -> None:
        if self.path.startswith("/api/blobs/"):
            return self._blob(self.path[len("/api/blobs/"):])
        body, n = self._json_body()
        self.ollama._log(OllamaRequest("POST", self.path, body, n))
        route = {"/api/create": self._create, "/api/show": self._show,
                 "/api/push": self._push}.get(self.path)
        if route is None:
            return self._send_json(404, {"error": "404 page not found"})
        if body is None:
            return self._send_json(400, {"error": "missing request body"})
        return route(body)

    def _blob(self, digest: str) -> None:
        ollama = self.ollama
        if not _DIGEST.match(digest):
            n = sum(len(p) for p in self._body_chunks())
            ollama._log(OllamaRequest("POST", self.path, None, n))
            return self._send_json(400, {"error": "invalid digest format"})
        key = _norm(digest)
        h, parts = hashlib.sha256(), []
        for piece in self._body_chunks():
            h.update(piece)
            parts.append(piece)
        n = sum(len(p) for p in parts)
        ollama._log(OllamaRequest("POST", self.path, None, n))
        if key in ollama.blobs:
            return self._send_empty(200)
        got = "sha256:" + h.hexdigest()
        if got != key:
            return self._send_json(400, {"error": f"digest mismatch, expected {digest!r}, "
                                                  f"got {got!r}".replace("'", '"')})
        with ollama._lock:
            ollama.blobs[key] = b"".join(parts)
        return self._send_empty(201)

    def _create(self, body: dict[str, Any]) -> None:
        ollama = self.ollama
        name = str(body.get("model") or body.get("name") or "")
        if not _NAME.match(name):
            return self._send_json(400, {"error": "invalid model name"})
        files = body.get("files") or {}
        if not files:
            return self._send_json(400, {"error": "neither 'from' or 'files' was specified"})
        for digest in files.values():
            if not _DIGEST.match(str(digest)):
                return self._send_json(400, {"error": "invalid digest format"})
        self._start_stream()
        self._line({"status": "parsing GGUF"})
        for path, digest in sorted(files.items()):
            data = ollama.blobs.get(_norm(digest))
            if data is None:
                self._line({"error": f"open blobs/{_norm(digest)}: no such file or directory"})
                return self._end_stream()
            if data[:4] != b"GGUF":
                self._line({"error": f"supplied file was not in GGUF format ({path})"})
                return self._end_stream()
        with ollama._lock:
            known = set(ollama.blobs)
            for key in ("template", "system", "license", "parameters", "messages"):
                if key in body:
                    digest, data = _small_layer(body[key])
                    verb = "using existing" if digest in known else "creating new"
                    self._line({"status": f"{verb} layer {digest}"})
                    ollama.blobs[digest] = data
            ollama.models[name] = body
        self._line({"status": "writing manifest"})
        self._line({"status": "success"})
        return self._end_stream()

    def _show(self, body: dict[str, Any]) -> None:
        name = str(body.get("model") or body.get("name") or "")
        model = self.ollama.models.get(name)
        if model is None:
            return self._send_json(404, {"error": f"model '{name}' not found"})
        params = model.get("parameters", {})
        return self._send_json(200, {
            "license": "\n".join(model.get("license", [])),
            "template": model.get("template", ""),
            "parameters": "\n".join(f"{k} {v}" for k, v in params.items()),
            "details": {"format": "gguf"},
        })

    def _push(self, body: dict[str, Any]) -> None:
        ollama = self.ollama
        name = str(body.get("model") or body.get("name") or "")
        self._start_stream()
        self._line({"status": "retrieving manifest"})
        if name not in ollama.models:
            self._line({"status": "couldn't retrieve manifest"})
            self._line({"error": "open manifests: file does not exist"})
            return self._end_stream()
        if ollama.push_refusal == "unknown-key":
            self._line({"error": f'unauthorized: unknown ollama key "{FAKE_KEY}"'})
            return self._end_stream()
        if ollama.push_refusal == "access-denied":
            self._line({"error": "unauthorized: access denied"})
            return self._end_stream()
        layers = ollama.layers(name)
        for digest in layers:
            size = len(ollama.blobs[digest])
            status = f"pushing {digest[7:19]}..."
            if digest in ollama.registry_blobs:
                self._line({"status": status, "digest": digest, "total": size,
                            "completed": size})
                continue
            for done in (0, size // 2, size):
                self._line({"status": status, "digest": digest, "total": size,
                            "completed": done})
            with ollama._lock:
                ollama.registry_blobs.add(digest)
        self._line({"status": "pushing manifest"})
        with ollama._lock:
            ollama.registry[name] = layers
        self._line({"status": "success"})
        return self._end_stream()
