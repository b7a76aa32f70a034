"""llama.cpp through llama-cpp-python's low-level API: a loaded model and a context.

:class:`LlamaModel` loads a GGUF and answers vocabulary questions (tokenize the way
``Llama.create_completion`` does, token bytes, end of generation); :class:`Context` is one
llama.cpp context for several sequences, with a reusable batch filled through NumPy views. The
smoke engine (:mod:`mathq.llama.engine`) and the bench stage (:mod:`mathq.evaluate.bench`) both run
on these, so they decode with the same settings. llama.cpp's own log is captured here too
(:func:`capture_llama_log`), so its errors become messages and never reach the terminal.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mathq.errors import (
    GGUFError,
    InferenceError,
    InputFileError,
    hold_termination,
    termination_pending,
)
from mathq.inputs import file_problem
from mathq.llama.devices import (
    default_threads,
    gpu_offload_supported,
    offloaded_layers,
    resolve_gpu_layers,
)

#: llama.cpp pads a sequence's context to this many cells; mathq sizes contexts the same way.
CTX_PAD = 256
#: ``EngineOptions.parallel`` for ``--parallel auto``: chosen by
#: :func:`mathq.llama.devices.choose_parallel`.
PARALLEL_AUTO = 0


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs; each field maps to a llama.cpp context or model parameter.

    ``parallel`` :data:`PARALLEL_AUTO` lets the engine choose from the free GPU memory
    (:func:`mathq.llama.devices.choose_parallel`). ``gpu_layers`` None puts every layer on
    the GPU when llama.cpp can offload and none otherwise; ``threads`` 0 picks the thread
    count from where the layers ended up (:func:`mathq.llama.devices.default_threads`);
    ``flash_attn`` None keeps llama.cpp's choice (where the backend supports it).
    ``n_ctx_seq`` 0 sizes each sequence's cache to the longest prompt plus its token limit.
    ``kv_type`` is the ggml type of the KV cache (``q8_0`` halves its memory; None keeps
    llama.cpp's F16). ``ignore_eos`` never picks an end-of-generation token (llama.cpp's
    ``--ignore-eos``): with no stop strings every completion is exactly its token limit
    long, which speed measurements on random-weight models need. ``draft`` checks drafted
    tokens in batches (:mod:`mathq.llama.drafts`); it is off with ``ignore_eos``, whose ban
    would have to hold at every drafted position.
    """

    parallel: int = 8
    n_batch: int = 512
    threads: int = 0
    gpu_layers: int | None = None
    flash_attn: bool | None = None
    kv_unified: bool = False
    n_ctx_seq: int = 0
    kv_type: str | None = None
    ignore_eos: bool = False
    draft: bool = True

    def n_threads(self, model: LlamaModel | None = None) -> int:
        """Threads for llama.cpp: the option, or the default for where ``model``'s layers
        are (every core when none is given)."""
        if model is None:
            return self.threads or os.cpu_count() or 1
        return default_threads(self.threads, model.offloaded, model.n_layer)


def quiet_llama_cpp() -> None:
    """Keep llama.cpp's debug and info lines (printed at context free, for one) off the
    terminal, as ``Llama(verbose=False)`` does, unless the application set the level of
    llama-cpp-python's logger itself."""
    log = logging.getLogger("llama-cpp-python")
    if log.level == logging.NOTSET:
        log.setLevel(logging.ERROR)


def pad_context(n: int) -> int:
    """``n`` rounded up to whole blocks of :data:`CTX_PAD` cells."""
    return -(-n // CTX_PAD) * CTX_PAD


class LlamaModel:
    """A GGUF loaded by llama.cpp, with the vocabulary calls the engine and bench need.

    ``gpu_layers`` None offloads every layer when llama.cpp can (see
    :mod:`mathq.llama.devices`); ``offloaded`` is how many of the ``n_layer + 1`` layers
    llama.cpp put on the GPU.
    """

    def __init__(self, path: Path, gpu_layers: int | None = None, *,
                 weights: bool = True) -> None:
        """``weights`` False loads the metadata only (llama.cpp's ``no_alloc``, nothing
        mapped): its contexts are planned, not allocated, and log the buffer sizes an
        allocation would have, which is what :mod:`mathq.evaluate.bench` states memory
        at long contexts from without allocating gigabytes of KV cache."""
        import llama_cpp

        path = Path(path)
        if (problem := file_problem(path)) is not None:
            raise InputFileError(f"model file {path} {problem}",
                                 "build it first (`mathq quantize`), or check the path")
        llama_cpp.llama_backend_init()
        quiet_llama_cpp()
        params = llama_cpp.llama_model_default_params()
        self.gpu = gpu_offload_supported()
        self.gpu_layers = params.n_gpu_layers = resolve_gpu_layers(gpu_layers)
        self.weights = weights
        if not weights:
            params.no_alloc = True
            params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE  # no_alloc maps nothing
        errors: list[str] = []
        #: llama.cpp's own account of the weights' memory, from its load log (bytes by kind).
        self.buffer_bytes: dict[str, int] = {}

        def on_line(level: int, line: str) -> None:
            if level == LOG_ERROR and line.strip():
                errors.append(line.strip())
            add_buffer_line(self.buffer_bytes, line)

        started = time.perf_counter()
        with capture_llama_log(on_line):
            handle = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        self.load_seconds = time.perf_counter() - started
        if not handle:
            reason = llama_reason(errors)
            raise GGUFError(f"llama.cpp cannot load {path}: {reason}",
                            "check that the file is a complete GGUF of a supported model")
        self.path = path
        self.handle = handle
        self.vocab = llama_cpp.llama_model_get_vocab(handle)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(handle))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.n_layer = int(llama_cpp.llama_model_n_layer(handle))
        self.offloaded = offloaded_layers(self.gpu_layers, self.n_layer, self.gpu)
        n_embd = int(llama_cpp.llama_model_n_embd(handle))
        n_head = max(1, int(llama_cpp.llama_model_n_head(handle)))
        n_head_kv = int(llama_cpp.llama_model_n_head_kv(handle))
        arch = self.meta("general.architecture") or "llama"
        head_k = int(self.meta(f"{arch}.attention.key_length") or n_embd // n_head)
        head_v = int(self.meta(f"{arch}.attention.value_length") or n_embd // n_head)
        #: Widths of one layer's K and V cache rows (``n_embd_k_gqa``, ``n_embd_v_gqa``).
        self.n_embd_k, self.n_embd_v = head_k * n_head_kv, head_v * n_head_kv
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}

    @property
    def gpu_layers_repeating(self) -> int:
        """Repeating (transformer) layers on the GPU: the output layer is offloaded first."""
        return max(0, self.offloaded - 1)

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text, or None when the file lacks the key."""
        import llama_cpp

        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def tokenize(self, text: str) -> list[int]:
        """Prompt tokens as ``Llama.create_completion`` makes them: BOS if the model adds
        one, then the text with special tokens recognised (as Hugging Face tokenizers do)."""
        import llama_cpp

        data = text.encode("utf-8")
        room = len(data) + 2
        buf = (llama_cpp.llama_token * room)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, room, False, True)
        if n < 0:
            raise InferenceError(f"llama.cpp could not tokenize a prompt ({-n} tokens)")
        bos = [self.bos] if self.add_bos and self.bos >= 0 else []
        return bos + list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one generated token (control tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is None:
            import llama_cpp

            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            cached = self._pieces[token] = buf.raw[:max(n, 0)]
        return cached

    def eog_tokens(self) -> np.ndarray:
        """Every end-of-generation token of the vocabulary (EOS, EOT, ...)."""
        return np.array([t for t in range(self.n_vocab) if self.is_eog(t)], dtype=np.int64)

    def is_eog(self, token: int) -> bool:
        """End of generation (EOS, EOT, ...), as llama.cpp's vocabulary marks it."""
        known = self._eog.get(token)
        if known is None:
            import llama_cpp

            known = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return known

    def close(self) -> None:
        """Free the model's memory."""
        import llama_cpp

        if self.handle:
            llama_cpp.llama_model_free(self.handle)
            self.handle = None


class Context:
    """A llama.cpp context for ``n_seq`` sequences of up to ``n_ctx_seq`` tokens each."""

    def __init__(self, model: LlamaModel, n_seq: int, n_ctx_seq: int,
                 options: EngineOptions) -> None:
        import llama_cpp

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_seq * n_seq
        params.n_batch = options.n_batch
        params.n_ubatch = min(options.n_batch, 512)
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = options.n_threads(model)
        params.kv_unified = options.kv_unified
        params.no_perf = True
        if options.kv_type is not None:
            from mathq.recipes.quants import ggml_type_id

            params.type_k = params.type_v = ggml_type_id(options.kv_type)
        if options.flash_attn is not None:
            params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
                                      if options.flash_attn
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        errors: list[str] = []
        #: llama.cpp's own account of this context's memory (KV cache, compute and output
        #: buffers), from its log (bytes by kind); for a weightless model's context, what
        #: an allocation would take.
        self.buffer_bytes: dict[str, int] = {}

        def on_line(level: int, line: str) -> None:
            if level == LOG_ERROR and line.strip():
                errors.append(line.strip())
            add_buffer_line(self.buffer_bytes, line)

        with capture_llama_log(on_line):
            handle = llama_cpp.llama_init_from_model(model.handle, params)
        planned = self.buffer_bytes.pop(PLANNED_KV, None)
        if not model.weights and planned is not None:
            self.buffer_bytes["kv_cache"] = planned
        if not handle:
            reason = llama_reason(errors)
            raise InferenceError(
                f"llama.cpp could not make a context of {n_seq} x {n_ctx_seq} tokens: {reason}",
                "lower --parallel or --max-tokens (the KV cache may not fit in memory)")
        self.handle = handle
        self.model = model
        self.n_seq = n_seq
        self.n_ctx_seq = n_ctx_seq
        self.n_batch = options.n_batch
        #: Most rows llama.cpp computes at once (a longer batch is split).
        self.n_ubatch = params.n_ubatch
        self.memory = llama_cpp.llama_get_memory(handle)
        self._batch = llama_cpp.llama_batch_init(options.n_batch, 0, 1)
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(options.n_batch,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(options.n_batch,))
        self._n_seq_id = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(options.n_batch,))
        self._logits = np.ctypeslib.as_array(self._batch.logits, shape=(options.n_batch,))
        self._n_seq_id[:] = 1
        self._n = 0

    # -- batch building ------------------------------------------------------------------

    def clear_batch(self) -> None:
        """Start a new batch."""
        self._n = 0

    def add(self, tokens: list[int] | np.ndarray, pos0: int, seq: int, last_logits: bool,
            all_logits: bool = False) -> int:
        """Append ``tokens`` of sequence ``seq`` at positions from ``pos0``; ask for logits of
        the last one if ``last_logits``, of every one if ``all_logits`` (a drafted step).
        Returns the batch index of the last token."""
        n = len(tokens)
        i = self._n
        if i + n > self.n_batch:
            raise ValueError(f"batch overflow: {i} + {n} > {self.n_batch}")
        self._tokens[i:i + n] = tokens
        self._pos[i:i + n] = np.arange(pos0, pos0 + n, dtype=self._pos.dtype)
        self._logits[i:i + n] = 1 if all_logits else 0
        if last_logits:
            self._logits[i + n - 1] = 1
        seq_ids = self._batch.seq_id
        for j in range(i, i + n):
            seq_ids[j][0] = seq
        self._n = i + n
        return i + n - 1

    @property
    def batch_size(self) -> int:
        """Tokens in the batch being built."""
        return self._n

    def decode(self) -> None:
        """Run the batch through the model."""
        import llama_cpp

        self._batch.n_tokens = self._n
        with hold_termination():  # llama.cpp may log (a Python callback) while it decodes
            status = llama_cpp.llama_decode(self.handle, self._batch)
        if status != 0:
            raise InferenceError(f"llama_decode failed with status {status} on a batch of "
                                 f"{self._n} tokens",
                                 "status 1 means the KV cache is full: lower --parallel")

    def logits(self, index: int) -> np.ndarray:
        """The logits of batch entry ``index`` (a view into llama.cpp's buffer)."""
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.handle, index)
        if not ptr:
            raise InferenceError(f"llama.cpp returned no logits for batch index {index}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def synchronize(self) -> None:
        """Wait until the last decode has finished (it can run asynchronously)."""
        import llama_cpp

        llama_cpp.llama_synchronize(self.handle)

    def free_seq(self, seq: int, from_pos: int = -1) -> None:
        """Drop the cached tokens of sequence ``seq`` (``-1``: of all sequences) at positions
        from ``from_pos`` on (``-1``: all of them)."""
        import llama_cpp

        if not llama_cpp.llama_memory_seq_rm(self.memory, seq, from_pos, -1):
            raise InferenceError(f"llama.cpp could not remove positions {from_pos}.. of "
                                 f"sequence {seq} from its cache")

    def clear(self) -> None:
        """Empty the whole KV cache."""
        import llama_cpp

        llama_cpp.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        """Free the context and its batch."""
        import llama_cpp

        if self.handle:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.handle)
            self.handle = None


LineHandler = Callable[[int, str], None]

# llama.cpp reports every buffer it allocates, per device, e.g.
# "load_tensors:   CPU_Mapped model buffer size =     3.06 MiB",
# "llama_kv_cache:        CPU KV buffer size =     2.00 MiB",
# "sched_reserve:        CPU compute buffer size =     5.01 MiB".
_BUFFER_LINE = re.compile(r"\b\S+\s+(model|KV|compute|output) buffer size\s*=\s*([0-9.]+) MiB")
BUFFER_KINDS = {"model": "model", "KV": "kv_cache", "compute": "compute", "output": "output"}
# Each KV cache's tensors, allocated or only planned (a weightless model's KV "buffer" is a
# placeholder of 0 MiB): "llama_kv_cache: size =  256.00 MiB (  2048 cells, ...".
_KV_SIZE_LINE = re.compile(r"\bllama_kv_cache: size =\s*([0-9.]+) MiB")
PLANNED_KV = "planned_kv_cache"


def add_buffer_line(totals: dict[str, int], line: str) -> None:
    """Add a llama.cpp "... buffer size = X MiB" log line to ``totals`` (bytes by kind:
    model, kv_cache, compute, output; devices summed), and a KV cache's own size line to
    :data:`PLANNED_KV` (the KV cache of a context that was planned, not allocated). Other
    lines are ignored."""
    if m := _BUFFER_LINE.search(line):
        kind = BUFFER_KINDS[m.group(1)]
        totals[kind] = totals.get(kind, 0) + round(float(m.group(2)) * 2**20)
    elif m := _KV_SIZE_LINE.search(line):
        totals[PLANNED_KV] = totals.get(PLANNED_KV, 0) + round(float(m.group(1)) * 2**20)

# ggml_log_level as the pinned ggml.h numbers it: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4,
# CONT 5 (continues the last line). (llama-cpp-python's _logger.py comments an older order,
# in which 3 was ERROR: taken from there, every warning was an error and no error was.)
LOG_ERROR = 4
_LOG_CONT = 5
# The generic last words of a failed load, after the line that says why.
_GENERIC = ("failed to load model", "failed to initialize the context", "failed to create")
_PREFIX = re.compile(r"^\w+: (?:error loading model: )?")


def llama_reason(errors: list[str]) -> str:
    """llama.cpp's own reason for a failure, from the error lines of its log: the most
    specific one ("unknown model architecture: 'zzzzz'", not the "failed to load model"
    that follows it), without the C function's name."""
    specific = [e for e in errors if not any(g in e for g in _GENERIC)]
    chosen = (specific or errors or ["llama.cpp logged no reason"])[0]
    return _PREFIX.sub("", chosen.strip(), count=1)

_lock = threading.Lock()


@contextlib.contextmanager
def capture_llama_log(handler: LineHandler) -> Iterator[None]:
    """Send every complete llama.cpp log line to ``handler(level, line)`` inside the block.

    The callback is process-wide in llama.cpp, so captures are serialised by a lock.
    """
    import llama_cpp
    from llama_cpp import _logger

    pending: list[str] = []
    level_of_line = [0]

    def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        starts_line = level != _LOG_CONT and not pending
        raises_level = level not in (_LOG_CONT, 0) and level > level_of_line[0]
        if starts_line or raises_level:  # a line is as severe as its worst fragment
            level_of_line[0] = level
        pending.append(text.decode("utf-8", errors="replace"))
        joined = "".join(pending)
        if "\n" in joined:
            *lines, rest = joined.split("\n")
            pending[:] = [rest] if rest else []
            for line in lines:
                handler(level_of_line[0], line)

    callback = llama_cpp.llama_log_callback(on_log)
    with _lock:
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        try:
            # llama.cpp calls on_log back while it works; a SIGTERM raised in there would be
            # printed and dropped by ctypes, so it is held until llama.cpp has returned.
            with hold_termination():
                yield
        finally:
            if pending:
                handler(level_of_line[0], "".join(pending))
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


_abort_callbacks: list[Any] = []  # the one ctypes callback, alive as long as the process


def abort_on_termination(ctx: Any) -> None:
    """Make ``llama_decode`` on ``ctx`` stop between graph nodes once a stop signal is held
    (:func:`mathq.errors.termination_pending`), so Ctrl-C ends a long chunk at once instead of
    after it. Call the decode inside :func:`capture_llama_log` (which holds the signal and
    raises it when llama.cpp returns). CPU backends honour it; GPU ones finish the batch.
    For contexts evaluated on the main thread only: the check takes the GIL per node."""
    import llama_cpp

    if not _abort_callbacks:
        _abort_callbacks.append(llama_cpp.ggml_abort_callback(
            lambda _data: termination_pending()))
    with capture_llama_log(lambda _level, _line: None):  # it logs that it was called
        llama_cpp.llama_set_abort_callback(ctx, _abort_callbacks[0], None)
