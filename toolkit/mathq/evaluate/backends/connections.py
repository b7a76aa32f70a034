"""HTTP plumbing both server backends (Ollama, OpenAI-compatible) share.

They send requests from :func:`mathq.evaluate.backends.pool.run_concurrently`'s worker threads, and
an httpx2 client is not meant to be shared across threads while it streams, so each worker gets its
own client, kept for the run (connections stay alive between requests) and closed together at the
end. A failed connection means the same thing to both backends: the server is slow (raise
``--timeout`` or ask less at once) or not there (start it, or check the URL option); only the
server's description and the URL option differ, so the mapping lives here once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mathq.errors import ServerError
from mathq.inputs import parse_json

#: Bytes one answer may hold: a completion is kilobytes; more is a server gone wrong.
MAX_ANSWER_BYTES = 64 << 20


class ThreadClients:
    """One httpx2 client per worker thread, all closed by :meth:`close`."""

    def __init__(self, timeout_s: float) -> None:
        import httpx2

        # Connecting fails fast; a reply may take long (a slow server, a long generation).
        self._timeout = httpx2.Timeout(timeout_s, connect=10.0)
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()

    @property
    def timeout_s(self) -> float:
        """Seconds one whole answer may take (``--timeout``), however the bytes arrive."""
        return float(self._timeout.read)

    def get(self) -> Any:
        """The calling thread's client, made on its first call."""
        import httpx2

        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx2.Client(timeout=self._timeout)
            with self._lock:
                self._clients.append(client)
        return client

    def close(self) -> None:
        """Close every thread's client (the backend's ``close``)."""
        with self._lock:
            for c in self._clients:
                c.close()
            self._clients.clear()


@contextlib.contextmanager
def server_errors(where: str, reach_hint: str) -> Iterator[None]:
    """Re-raise httpx2's timeouts and transport failures in the block as ServerErrors.

    ``where`` names the server in the message (``Ollama at URL``, or the endpoint URL);
    ``reach_hint`` says how to make an unreachable server reachable.
    """
    import httpx2

    try:
        yield
    except httpx2.TimeoutException as e:
        raise ServerError(f"{where} did not answer in time ({e})",
                          "raise --timeout, or lower --parallel") from e
    except httpx2.TransportError as e:
        raise ServerError(f"cannot reach {where}: {e}", reach_hint) from e


@dataclass(frozen=True)
class Reply:
    """A whole HTTP answer, read within its deadline."""

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return parse_json(self.content)


class Deadline:
    """A total time limit on one answer: httpx2's timeouts bound each read, so a server
    that trickles a byte at a time would otherwise never be given up on."""

    def __init__(self, seconds: float, where: str) -> None:
        self.seconds, self.where = seconds, where
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        """Raise ServerError once the time is up."""
        if time.monotonic() > self.end:
            raise ServerError(f"{self.where} did not finish answering within "
                              f"{self.seconds:g} s", "raise --timeout, or lower --parallel")


def fetch(client: Any, method: str, url: str, timeout_s: float, **kwargs: Any) -> Reply:
    """Send one request and read the whole answer within ``timeout_s`` seconds in total
    and :data:`MAX_ANSWER_BYTES` at most."""
    deadline = Deadline(timeout_s, url)
    body = bytearray()
    with client.stream(method, url, **kwargs) as response:
        for chunk in response.iter_bytes():
            body += chunk
            deadline.check()
            if len(body) > MAX_ANSWER_BYTES:
                raise ServerError(f"{url} sent more than {MAX_ANSWER_BYTES >> 20} MiB for one "
                                  "answer", "is it the server you meant?")
        return Reply(response.status_code, bytes(body))


def lines_within(response: Any, deadline: Deadline) -> Iterator[str]:
    """The lines of a streamed answer, each checked against ``deadline`` as bytes arrive
    (a line that never ends cannot hold the caller past it) and against the size limit."""
    pending = bytearray()
    for chunk in response.iter_bytes():
        deadline.check()
        pending += chunk
        if len(pending) > MAX_ANSWER_BYTES:
            raise ServerError(f"{deadline.where} sent a line of more than "
                              f"{MAX_ANSWER_BYTES >> 20} MiB", "is it the server you meant?")
        while (cut := pending.find(b"\n")) >= 0:
            line, pending = bytes(pending[:cut]), pending[cut + 1:]
            yield line.decode("utf-8", "replace").rstrip("\r")
    if pending:
        yield bytes(pending).decode("utf-8", "replace")
