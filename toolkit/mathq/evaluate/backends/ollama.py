"""An Ollama server's chat API: the smoke test of a published tag, as its users will run it.

Only the bare question is sent, as a user message to ``POST /api/chat``: the tag's
Modelfile TEMPLATE builds the prompt (and appends the chain-of-thought suffix where the
recipe says so) and its ``stop`` parameters end the reply. mathq adds only what makes the
run a smoke test: temperature 0 (greedy) and the token limit (``num_predict``). Replies are
streamed, so progress can count tokens; how many requests Ollama runs at once is the
server's ``OLLAMA_NUM_PARALLEL``.
"""

from __future__ import annotations

import threading
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
from mathq.evaluate.backends.connections import (
    Deadline,
    Reply,
    ThreadClients,
    lines_within,
    server_errors,
)
from mathq.evaluate.backends.pool import run_concurrently
from mathq.inputs import UnreadableInput, parse_json


class OllamaBackend(Backend):
    """Greedy chat completions from one Ollama server and one ``name:tag``."""

    def __init__(self, url: str, model: str, parallel: int, timeout_s: float = 600.0) -> None:
        base = url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ServerError(f"Ollama URL {url!r} is not an http(s) URL",
                              "give it as http://HOST:11434")
        self.base = base
        self.model = model
        self.parallel = parallel
        self.description = f"ollama {base} {model}"
        self._clients = ThreadClients(timeout_s)
        self._lock = threading.Lock()
        self._generated = 0

    def _chat(self, request: Request) -> Completion:
        url = f"{self.base}/api/chat"
        body = {"model": self.model, "stream": True,
                "messages": [{"role": "user", "content": request.question}],
                "options": {"temperature": 0, "num_predict": request.max_tokens}}
        started = time.perf_counter()
        parts: list[str] = []
        final: dict[str, Any] = {}
        deadline = Deadline(self._clients.timeout_s, f"Ollama at {self.base}")
        with (server_errors(f"Ollama at {self.base}",
                            "start it (`ollama serve`), or check --ollama"),
              self._clients.get().stream("POST", url, json=body) as response):
            if response.status_code >= 400:
                raw = "\n".join(lines_within(response, deadline))
                raise ServerError(*self._refusal(Reply(response.status_code, raw.encode())))
            for line in lines_within(response, deadline):
                if not line.strip():
                    continue
                try:
                    event = parse_json(line)
                except UnreadableInput as e:
                    raise ServerError(f"{url} streamed a line that is not JSON: {line[:80]!r}",
                                      "is it an Ollama server?") from e
                if not isinstance(event, dict):
                    raise ServerError(f"{url} streamed {line[:80]!r}, not a JSON object",
                                      "is it an Ollama server?")
                if "error" in event:
                    raise ServerError(f"Ollama failed on {self.model}: {event['error']}",
                                      "see the Ollama server's log")
                message = event.get("message")
                content = message.get("content", "") if isinstance(message, dict) else ""
                if content and isinstance(content, str):
                    parts.append(content)
                    with self._lock:
                        self._generated += 1
                if event.get("done"):
                    final = event
                    break
        if not final:
            raise ServerError(f"Ollama at {self.base} ended the reply without done",
                              "see the Ollama server's log")
        return Completion(id=request.id, text="".join(parts),
                          prompt_tokens=counted(final.get("prompt_eval_count")),
                          completion_tokens=counted(final.get("eval_count")),
                          finish_reason=reason(final.get("done_reason")),
                          seconds=time.perf_counter() - started)

    def _refusal(self, response: Reply) -> tuple[str, str]:
        try:
            answer = response.json()
            detail = str(answer.get("error", "") if isinstance(answer, dict) else answer)[:200]
        except ValueError:
            detail = response.text.strip()[:200]
        if response.status_code == 404:
            return (f"Ollama at {self.base} has no model {self.model}",
                    "create the tag first (`mathq publish`, or `ollama create`), or pass "
                    "--served-model")
        return (f"Ollama at {self.base} refused {self.model}: HTTP {response.status_code} "
                f"{detail}",
                "see the Ollama server's log")

    def complete(self, requests: Sequence[Request],
                 on_tokens: TokenCallback | None = None) -> Iterator[Completion]:
        """Ask for every request, ``parallel`` at a time; yield each reply as it ends."""

        def poll() -> None:
            if on_tokens is not None:
                on_tokens(self._generated)

        yield from run_concurrently(requests, [self._chat] * self.parallel, poll)

    def close(self) -> None:
        """Close every connection."""
        self._clients.close()
