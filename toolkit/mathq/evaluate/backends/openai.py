"""OpenAI-compatible completions servers (llama-server, vLLM, ...): one or many, load spread.

The full prompt text goes to ``POST /v1/completions`` with temperature 0, the token limit
and the prompt format's stop strings, so the server sees exactly what the in-process engine
decodes (the server adds BOS, as llama.cpp's tokenizer does). With several endpoints each
gets ``parallel`` requests at a time from one shared queue: an evaluation that outgrows one
machine runs on several servers, and a faster one takes more of the work.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from mathq.errors import ServerError
from mathq.evaluate.backends.base import (
    Backend,
    Completion,
    Request,
    TokenCallback,
    counted,
    reason,
)
from mathq.evaluate.backends.connections import ThreadClients, fetch, server_errors
from mathq.evaluate.backends.pool import run_concurrently


def api_base(url: str) -> str:
    """``http://host:8080``, ``.../v1`` or ``.../v1/`` -> ``http://host:8080/v1``."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ServerError(f"endpoint {url!r} is not an http(s) URL",
                          "give it as http://HOST:PORT (or .../v1)")
    return base if base.endswith("/v1") else f"{base}/v1"


def _json(response: Any, where: str) -> Any:
    try:
        return response.json()
    except ValueError as e:
        raise ServerError(f"{where} answered with something that is not JSON",
                          "is it an OpenAI-compatible server?") from e


def _raise_for_status(response: Any, where: str) -> None:
    if response.status_code >= 400:
        detail = response.text.strip().replace("\n", " ")[:200]
        raise ServerError(f"{where} refused the request: HTTP {response.status_code} {detail}",
                          "check the model name (--served-model) and the server's log")


class OpenAIBackend(Backend):
    """Greedy completions from OpenAI-compatible servers."""

    def __init__(self, urls: Sequence[str], model: str | None, parallel: int,
                 timeout_s: float = 600.0) -> None:
        if not urls:
            raise ServerError("no endpoint given", "pass --endpoint http://HOST:PORT")
        self.bases = [api_base(u) for u in urls]
        self.parallel = parallel
        self.description = "openai " + " ".join(self.bases)
        self._clients = ThreadClients(timeout_s)
        self.model = model or self._served_model(self.bases[0])

    def _call(self, method: str, url: str, **kwargs: Any) -> Any:
        with server_errors(url, "start the server, or check --endpoint"):
            return fetch(self._clients.get(), method, url, self._clients.timeout_s, **kwargs)

    def _served_model(self, base: str) -> str:
        """The first model ``/v1/models`` lists (llama-server lists its GGUF)."""
        url = f"{base}/models"
        response = self._call("GET", url)
        _raise_for_status(response, url)
        data = _json(response, url)
        try:
            return str(data["data"][0]["id"])
        except (KeyError, IndexError, TypeError) as e:
            raise ServerError(f"{url} lists no model", "pass --served-model NAME") from e

    def _complete_one(self, base: str, request: Request) -> Completion:
        url = f"{base}/completions"
        body = {"model": self.model, "prompt": request.prompt, "max_tokens": request.max_tokens,
                "temperature": 0, "stop": list(request.stop), "stream": False}
        started = time.perf_counter()
        response = self._call("POST", url, json=body)
        _raise_for_status(response, url)
        data = _json(response, url)
        try:
            choice = data["choices"][0]
            text = choice["text"]
            if not isinstance(text, str):
                raise TypeError(text)
        except (KeyError, IndexError, TypeError) as e:
            raise ServerError(f"{url} answered without choices[0].text",
                              "is it an OpenAI-compatible completions endpoint?") from e
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return Completion(id=request.id, text=text,
                          prompt_tokens=counted(usage.get("prompt_tokens")),
                          completion_tokens=counted(usage.get("completion_tokens")),
                          finish_reason=reason(choice.get("finish_reason")),
                          seconds=time.perf_counter() - started)

    def complete(self, requests: Sequence[Request],
                 on_tokens: TokenCallback | None = None) -> Iterator[Completion]:
        """Answer every request, ``parallel`` at a time per endpoint."""
        generated = 0

        def counting(base: str):
            def work(request: Request) -> Completion:
                return self._complete_one(base, request)
            return work

        workers = [counting(b) for _ in range(self.parallel) for b in self.bases]
        for c in run_concurrently(requests, workers):
            generated += c.completion_tokens or 0
            if on_tokens is not None:
                on_tokens(generated)
            yield c

    def close(self) -> None:
        """Close every connection."""
        self._clients.close()
