"""The types every backend shares: requests, completions and the backend protocol."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from mathq.llama.devices import ParallelChoice

BACKEND_KINDS: tuple[tuple[str, str], ...] = (
    ("llama", "llama.cpp in this process, continuous batching of --parallel sequences"),
    ("ollama", "an Ollama server's chat API: the tag's own Modelfile template and stops"),
    ("openai", "OpenAI-compatible /v1/completions servers (llama-server, vLLM), load spread"),
)


@dataclass(frozen=True)
class Request:
    """One problem to answer."""

    id: str
    prompt: str
    question: str
    max_tokens: int
    stop: tuple[str, ...] = ()
    #: BF16's completion of the same problem, to draft from (in process only), and the
    #: token ids BF16 wrote it in, where its results file has them.
    draft_reference: str = ""
    draft_reference_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Completion:
    """A backend's answer: the text (stop string removed) and what it cost.

    ``completion_tokens`` and ``prompt_tokens`` are the backend's own counts (None when it
    does not say); ``finish_reason`` is ``stop`` or ``length``; ``seconds`` is the time from
    the request's start to its end. ``steps``, ``drafted`` and ``kept`` are the
    in-process engine's decode steps, drafts reached and kept, and ``token_ids``
    the tokens it generated (None elsewhere).
    """

    id: str
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    seconds: float
    steps: int | None = None
    drafted: int | None = None
    kept: int | None = None
    token_ids: tuple[int, ...] | None = None


#: Called with the number of tokens generated so far, as often as the backend knows it.
TokenCallback = Callable[[int], None]


class Backend(Protocol):
    """What the smoke stage needs from a backend.

    Backends subclass it to inherit the defaults of what only some of them have: a server
    names its model but decodes on its own; only the in-process engine drafts and chooses
    how many sequences to decode together.
    """

    #: Short description for summaries and messages, e.g. ``llama.cpp`` or ``ollama URL``.
    description: str
    #: Requests in flight at once.
    parallel: int
    #: The model a server is asked for (``name:tag`` or the OpenAI ``model``); None in process.
    model: str | None = None
    #: Drafts reached and kept so far in this run, for progress displays.
    draft_totals: tuple[int, int] = (0, 0)
    #: How many sequences the last :meth:`complete` decoded together, and why; None where
    #: that is simply ``parallel`` requests in flight per server.
    parallel_choice: ParallelChoice | None = None

    def complete(self, requests: Sequence[Request],
                 on_tokens: TokenCallback | None = None) -> Iterator[Completion]:
        """Answer every request; yield completions in the order they finish."""
        ...

    def close(self) -> None:
        """Release the model, connections and threads."""
        ...


@dataclass(frozen=True)
class BackendSpec:
    """Which backend to use and its settings, as the command line gives them.

    ``urls`` are the OpenAI-compatible endpoints (kind ``openai``) or the Ollama server
    (kind ``ollama``). ``model`` names the served model (an Ollama name without tag, or the
    OpenAI ``model`` field); None means: the recipe's Ollama name, or what ``/v1/models``
    lists first. ``parallel`` 0 is ``--parallel auto``: chosen from the free GPU memory in
    process (:func:`mathq.llama.devices.choose_parallel`), 8 requests in flight per server.
    ``ignore_eos`` (in process only) generates every answer to its token limit, ignoring
    EOS and stop strings: for throughput measurements, never for accuracy. ``draft`` (in
    process only, not with ``ignore_eos``) checks drafted tokens in batches
    (:mod:`mathq.llama.drafts`).
    """

    kind: str = "llama"
    urls: tuple[str, ...] = ()
    model: str | None = None
    parallel: int = 8
    threads: int = 0
    gpu_layers: int | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = False
    draft: bool = True


def counted(value: object) -> int | None:
    """A server's token count if it is one (a whole number), else None: a server's odd
    answer must not reach the results file, whose reader checks each field's type."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def reason(value: object) -> str | None:
    """A server's finish reason if it is a string, else None."""
    return value if isinstance(value, str) else None
