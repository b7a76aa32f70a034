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
from collections.abc import Iterator
from typing import Any

from mathq.errors import ServerError


class ThreadClients:
    """One httpx2 client per worker thread, all closed by :meth:`close`."""

    def __init__(self, timeout_s: float) -> None:
        import httpx2

        # Connecting fails fast; a reply may take long (a slow server, a long generation).
        self._timeout = httpx2.Timeout(timeout_s, connect=10.0)
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()

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
