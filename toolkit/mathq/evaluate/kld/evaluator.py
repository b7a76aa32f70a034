"""Run a GGUF through llama.cpp in process, one context-sized chunk of text at a time.

This is the evaluation loop of ``llama-perplexity``, through llama-cpp-python's low-level
API: the text is tokenized once (with BOS), cut into chunks of ``n_ctx`` tokens, the first
token of each chunk is replaced by BOS, the KV cache is cleared between chunks, and logits
are requested only for the positions that are scored (the second half of the chunk, whose
predictions always have at least ``n_ctx / 2`` tokens of context). Logits come back as a
numpy view into llama.cpp's output buffer, so a chunk costs one buffer of
``n_scored * n_vocab`` floats, never a copy per position.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import TracebackType

import numpy as np

from mathq.errors import GGUFError, MathqError
from mathq.evaluate.kld.logprob_file import scored_per_chunk
from mathq.llama.devices import (
    default_threads,
    gpu_offload_supported,
    offloaded_layers,
    resolve_gpu_layers,
)
from mathq.llama.runtime import (
    LOG_ERROR,
    abort_on_termination,
    capture_llama_log,
    llama_reason,
)


class ChunkEvaluator:
    """A loaded model and a one-sequence context of ``n_ctx`` tokens; use as a context manager."""

    def __init__(self, model_path: Path, n_ctx: int, threads: int = 0,
                 gpu_layers: int | None = None) -> None:
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.first = n_ctx // 2
        self.n_scored = scored_per_chunk(n_ctx)
        self.threads = threads
        self.gpu_layers = gpu_layers
        self._model = self._ctx = self._batch = None
        self.errors: list[str] = []

    def __enter__(self) -> ChunkEvaluator:
        import llama_cpp

        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        gpu = gpu_offload_supported()
        mparams.n_gpu_layers = resolve_gpu_layers(self.gpu_layers)
        with capture_llama_log(self._on_log):
            self._model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(),
                                                               mparams)
        if not self._model:
            raise GGUFError(f"llama.cpp cannot load {self.model_path}: "
                            f"{llama_reason(self.errors)}",
                            "check that the file is a complete GGUF (rebuild it if in doubt)")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self._vocab))
        n_layer = int(llama_cpp.llama_model_n_layer(self._model))
        self.threads = default_threads(
            self.threads, offloaded_layers(mparams.n_gpu_layers, n_layer, gpu), n_layer)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = self.n_ctx
        cparams.n_ubatch = min(self.n_ctx, 512)
        cparams.n_seq_max = 1
        # Only the scored half returns logits: sizing llama.cpp's output and compute buffers
        # for those halves their n_vocab-wide share of memory.
        cparams.n_outputs_max = self.n_scored
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        with capture_llama_log(self._on_log):
            self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise MathqError(f"llama.cpp cannot create a {self.n_ctx}-token context for "
                             f"{self.model_path.name}: "
                             f"{llama_reason(self.errors)}",
                             "lower --ctx-size or free some memory")
        abort_on_termination(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
        for k in range(self.n_ctx):
            self._batch.n_seq_id[k] = 1
            self._batch.seq_id[k][0] = 0
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(self.n_ctx,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(self.n_ctx,))
        self._want = np.ctypeslib.as_array(
            ctypes.cast(self._batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(self.n_ctx,))
        self._pos[:] = np.arange(self.n_ctx, dtype=np.int32)
        self._want[:] = 0
        # Logits for positions first .. n_ctx - 2: each predicts the token after it.
        self._want[self.first:self.first + self.n_scored] = 1
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Free the batch, context and model (safe to call twice)."""
        import llama_cpp

        with capture_llama_log(self._on_log):  # freeing logs buffer sizes; keep them quiet
            if self._batch is not None:
                llama_cpp.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx:
                llama_cpp.llama_free(self._ctx)
                self._ctx = None
            if self._model:
                llama_cpp.llama_model_free(self._model)
                self._model = None

    def _on_log(self, level: int, line: str) -> None:
        if level == LOG_ERROR and line.strip():
            self.errors.append(line.strip())

    def tokenize(self, text: str) -> np.ndarray:
        """The text's tokens with BOS when the model adds one (``common_tokenize(.., true)``)."""
        import llama_cpp

        data = text.encode("utf-8")
        cap = len(data) + 2
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, True, False)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, True, False)
        return np.array(buf[:n], dtype=np.int32)

    def scored_logits(self, chunk: np.ndarray) -> np.ndarray:
        """Decode one chunk of ``n_ctx`` tokens; return the logits of its scored positions.

        The result (``n_scored`` rows of ``n_vocab`` float32) is a view into llama.cpp's
        buffer, valid until the next call.
        """
        import llama_cpp

        if len(chunk) != self.n_ctx:
            raise ValueError(f"a chunk has {self.n_ctx} tokens, got {len(chunk)}")
        self._tokens[:] = chunk
        if self.add_bos:
            self._tokens[0] = self.bos
        self._batch.n_tokens = self.n_ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        with capture_llama_log(self._on_log):
            status = llama_cpp.llama_decode(self._ctx, self._batch)
        if status != 0:
            raise MathqError(f"llama.cpp failed to evaluate {self.model_path.name} "
                             f"(llama_decode returned {status}"
                             f"{': ' + self.errors[-1] if self.errors else ''})",
                             "lower --ctx-size or free some memory")
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(self.n_scored, self.n_vocab))
