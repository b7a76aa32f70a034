"""Where completions come from: llama.cpp in process, an Ollama server, or OpenAI-compatible
servers. Every backend takes the same requests and yields the same completions, so the smoke
stage grades them alike and the summary says which backend produced them.

A :class:`Request` carries both the full prompt text (what llama.cpp and a completions
endpoint are given) and the bare question (what Ollama's chat API is given: the tag's own
Modelfile template then builds the prompt, which is the point of testing through Ollama).
"""

from __future__ import annotations

from pathlib import Path

from mathq.evaluate.backends.base import Backend, BackendSpec
from mathq.llama.devices import CPU_PARALLEL


def open_backend(spec: BackendSpec, *, gguf: Path | None = None,
                 ollama_model: str | None = None) -> Backend:
    """Start the backend ``spec`` names: load the GGUF, or connect to the servers."""
    if spec.kind == "llama":
        from mathq.evaluate.backends.llama import LlamaBackend
        from mathq.llama.engine import EngineOptions

        if gguf is None:
            raise ValueError("the llama backend needs a GGUF file")
        return LlamaBackend(gguf, EngineOptions(parallel=spec.parallel, threads=spec.threads,
                                                gpu_layers=spec.gpu_layers,
                                                ignore_eos=spec.ignore_eos,
                                                draft=spec.draft))
    # A server schedules its own slots: `auto` means mathq's usual requests in flight.
    in_flight = spec.parallel or CPU_PARALLEL
    if spec.kind == "ollama":
        from mathq.evaluate.backends.ollama import OllamaBackend

        if ollama_model is None:
            raise ValueError("the ollama backend needs a model name")
        return OllamaBackend(spec.urls[0], ollama_model, in_flight, spec.timeout_s)
    if spec.kind == "openai":
        from mathq.evaluate.backends.openai import OpenAIBackend

        return OpenAIBackend(spec.urls, spec.model, in_flight, spec.timeout_s)
    raise ValueError(f"unknown backend kind {spec.kind!r}")
