"""Importance matrices computed in process, through llama.cpp's graph evaluation callback.

The model runs in llama.cpp (llama-cpp-python) over calibration text, chunk by chunk, and
llama.cpp calls back for every node of its compute graph (``cb_eval`` in the context
parameters). For each matrix multiplication by a model weight, :class:`ActivationCollector`
adds the squares of the input activations per input column and counts the rows (tokens).
The result is saved in ``llama-imatrix``'s GGUF format (``<tensor>.in_sum2``,
``<tensor>.counts``), which ``mathq quantize --imatrix`` and ``llama-quantize --imatrix``
both read.

The semantics are those of ``llama-imatrix`` (tools/imatrix/imatrix.cpp in the vendored
llama.cpp), so its output and mathq's agree (benchmarks/imatrix.py, tests/test_imatrix.py):

- hooked: ``MUL_MAT`` nodes whose weight (``src[0]``) is named ``blk.*``, plus
  ``output.weight`` only when asked (``--process-output``; off by default upstream too);
  inputs (``src[1]``) must be F32 and hold at least 16 rows (smaller batches are skipped);
- the whole text is tokenized once (BOS added as the vocabulary says), cut into chunks of
  ``n_ctx`` tokens, the first token of each chunk replaced by BOS; the KV cache is cleared
  between chunks and every position asks for logits, so the last layer runs on all tokens;
- per weight: the sum over rows of x² per column, and one count of rows per matrix.

``MUL_MAT_ID`` (mixture-of-experts) weights are refused: mathq's models are dense LLaMAs.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mathq.errors import ImatrixComputeError, Terminated
from mathq.llama.devices import (
    default_threads,
    gpu_offload_supported,
    offloaded_layers,
    resolve_gpu_layers,
)
from mathq.llama.ggml_view import (
    GGML_TYPE_F32,
    GgmlApi,
    GgmlTensor,
    f32_array,
    ggml_api,
    tensor_at,
    tensor_name,
)
from mathq.llama.runtime import (
    LOG_ERROR,
    abort_on_termination,
    capture_llama_log,
    llama_reason,
)
from mathq.progress import Progress, ProgressCallback, no_progress
from mathq.quantize.imatrix_file import write_imatrix_gguf

MIN_ROWS = 16  # llama-imatrix ignores multiplications of fewer input rows
OUTPUT_WEIGHT = "output.weight"
MAX_UBATCH = 512  # llama.cpp's default physical batch
# Inputs precise enough to measure activations with; lower types would bias the matrix.
INPUT_TYPES = ("F32", "F16", "BF16", "Q8_0")


@dataclass(frozen=True)
class ImatrixOptions:
    """Settings of one run; each maps to a ``llama-imatrix`` option.

    ``chunks`` None takes every whole chunk of the text. ``parse_special`` makes special
    token text (DeepSeek's ``<｜end▁of▁sentence｜>`` between chat turns) the special token,
    as ``llama-imatrix --parse-special`` does. ``threads`` 0 and ``gpu_layers`` None are
    :mod:`mathq.llama.devices`' defaults (every layer on the GPU when llama.cpp can offload).
    """

    n_ctx: int = 512
    chunks: int | None = 100
    process_output: bool = False
    parse_special: bool = True
    threads: int = 0
    gpu_layers: int | None = None


@dataclass(frozen=True)
class ImatrixResult:
    """A written importance matrix and what it was computed from."""

    path: Path
    model: Path
    dataset: str
    n_entries: int
    chunks: int
    n_ctx: int
    n_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Throughput of the whole run (model evaluation plus collection)."""
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0


def weight_name(name: str) -> str:
    """A weight's own name from a graph copy's (``CUDA0#blk.0.attn_k.weight#0``)."""
    if "#" not in name:
        return name
    return name.split("#", 2)[1]


class ActivationCollector:
    """Per-weight sums of squared input activations, fed by llama.cpp's ``cb_eval``.

    ``sums[name]`` has one row per matrix of the weight (1 for a 2-D weight) and one column
    per input column; ``counts[name]`` counts input rows per matrix. Exceptions never cross
    into C: the first problem is kept in :attr:`error`, collection stops, and the caller
    raises it after ``llama_decode`` returns.
    """

    def __init__(self, api: GgmlApi, process_output: bool = False) -> None:
        import llama_cpp

        self.api = api
        self.process_output = process_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.error: BaseException | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)

    def _on_eval(self, address: int, ask: bool, _user: object) -> bool:
        try:
            t = tensor_at(address)
            if ask:
                return self.error is None and self.wants(t)
            self.collect(t)
            return True
        except BaseException as e:  # must not unwind through llama.cpp (ctypes drops it);
            self.error = self.error or e  # a signal's KeyboardInterrupt/Terminated included
            return False

    def wants(self, t: GgmlTensor) -> bool:
        """The ``ask`` phase: does this graph node multiply activations by a weight we track?"""
        if t.op == self.api.op_mul_mat_id:
            self.error = ImatrixComputeError(
                f"{weight_name(tensor_name(t.src[0].contents))} is a mixture-of-experts weight "
                "(MUL_MAT_ID); mathq collects dense weights only",
                "use llama-imatrix for mixture-of-experts models")
            return False
        if t.op != self.api.op_mul_mat:
            return False
        src0, src1 = t.src[0].contents, t.src[1].contents
        if src1.ne[1] < MIN_ROWS or src1.type != GGML_TYPE_F32:
            return False
        name = weight_name(tensor_name(src0))
        return name.startswith("blk.") or (self.process_output and name == OUTPUT_WEIGHT)

    def collect(self, t: GgmlTensor) -> None:
        """The data phase: add this node's input rows to its weight's sums and count."""
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = weight_name(tensor_name(src0))
        x = f32_array(self.api, src1)  # (ne3, ne2, ne1, ne0): rows along axis 2; a host
        # copy when the layer runs on the GPU
        squares = np.einsum("abij,abij->abj", x, x)
        n2, n3 = int(src0.ne[2]), int(src0.ne[3])
        n_mat = n2 * n3
        acc = self.sums.get(name)
        if acc is None:
            acc = self.sums[name] = np.zeros((n_mat, x.shape[-1]), np.float64)
            self.counts[name] = 0
        elif acc.shape != (n_mat, x.shape[-1]):
            raise ImatrixComputeError(
                f"{name} had inputs of {acc.shape[1]} columns before, now {x.shape[-1]}")
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                # 3-D activations times a 2-D weight fold onto the one matrix, as upstream
                acc[(i3 % n3) * n2 + (i2 % n2)] += squares[i3, i2]
        self.counts[name] += x.shape[0] * x.shape[1] * x.shape[2] // n_mat
        if not np.all(np.isfinite(acc)):
            raise ImatrixComputeError(
                f"non-finite activations in the input of {name}",
                "the model produces NaN/inf on this text; check the GGUF")


def tokenize(model: object, text: str, parse_special: bool) -> list[int]:
    """Tokens of the whole text as ``llama-imatrix`` makes them (BOS as the vocab says)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(model)
    raw = text.encode("utf-8")
    n_max = len(raw) + 8
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, n_max, True, parse_special)
    if n < 0:  # cannot happen with a byte-count bound, but never read past the buffer
        raise ImatrixComputeError(f"tokenizer needed {-n} tokens for {n_max} slots")
    return buf[:n]


class _Llama:
    """A model and a context with our callback; freed on exit, errors as ImatrixComputeError."""

    def __init__(self, model_path: Path, options: ImatrixOptions,
                 collector: ActivationCollector) -> None:
        self.model_path, self.options, self.collector = model_path, options, collector
        self.model = self.ctx = None
        self.log_errors: list[str] = []

    def __enter__(self) -> _Llama:
        import llama_cpp

        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.gpu = gpu_offload_supported()
        self.gpu_layers = mparams.n_gpu_layers = resolve_gpu_layers(self.options.gpu_layers)
        with capture_llama_log(self._log):
            self.model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(),
                                                              mparams)
        if not self.model:
            raise ImatrixComputeError(f"llama.cpp cannot load {self.model_path}: "
                                      f"{llama_reason(self.log_errors)}",
                                      "check the file with `mathq quantize` or reconvert it")
        self._check_precision()
        return self

    def _check_precision(self) -> None:
        """Refuse a model quantized below Q8_0: its activations are not the original's."""
        import llama_cpp

        from mathq.recipes.quants import by_ftype

        buf = ctypes.create_string_buffer(32)
        if llama_cpp.llama_model_meta_val_str(self.model, b"general.file_type", buf, 32) < 0:
            return  # no file type recorded: nothing to judge by
        quant = by_ftype(int(buf.value or b"-1"))
        if quant is not None and quant.name not in INPUT_TYPES:
            raise ImatrixComputeError(
                f"{self.model_path.name} is {quant.name}; an importance matrix measured on it "
                "would describe the quantized model",
                f"use the BF16 (or Q8_0) GGUF; accepted: {', '.join(INPUT_TYPES)}")

    def _log(self, level: int, line: str) -> None:
        if level == LOG_ERROR and line.strip():
            self.log_errors.append(line.strip())

    def open_context(self) -> None:
        import llama_cpp

        o = self.options
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = o.n_ctx
        cparams.n_batch = o.n_ctx
        cparams.n_ubatch = min(o.n_ctx, MAX_UBATCH)
        cparams.n_seq_max = 1
        n_layer = int(llama_cpp.llama_model_n_layer(self.model))
        offloaded = offloaded_layers(self.gpu_layers, n_layer, self.gpu)
        cparams.n_threads = cparams.n_threads_batch = default_threads(o.threads, offloaded,
                                                                      n_layer)
        cparams.cb_eval = self.collector.callback
        cparams.cb_eval_user_data = None
        # Layers left on the CPU keep their multiplications there (no copies of their
        # weights to the GPU per batch); offloaded layers' inputs are copied to the host.
        cparams.op_offload = False
        cparams.no_perf = True
        with capture_llama_log(self._log):
            self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise ImatrixComputeError(f"llama.cpp cannot open a context of {o.n_ctx} tokens for "
                                      f"{self.model_path.name}: "
                                      f"{llama_reason(self.log_errors)}",
                                      "try a smaller --ctx")
        abort_on_termination(self.ctx)

    def __exit__(self, *exc: object) -> None:
        import llama_cpp

        with capture_llama_log(self._log):
            if self.ctx:
                llama_cpp.llama_free(self.ctx)
            if self.model:
                llama_cpp.llama_model_free(self.model)


def compute_imatrix(model_path: Path, text: str, dest: Path, options: ImatrixOptions,
                    dataset: str, progress: ProgressCallback = no_progress) -> ImatrixResult:
    """Run ``model_path`` over ``text`` and write the importance matrix to ``dest``."""
    import llama_cpp

    model_path, dest = Path(model_path), Path(dest)
    if options.n_ctx < MIN_ROWS:
        raise ImatrixComputeError(f"a context of {options.n_ctx} tokens is too small",
                                  f"use --ctx {MIN_ROWS} or more (512 is usual)")
    collector = ActivationCollector(ggml_api(), options.process_output)
    started = time.perf_counter()
    with _Llama(model_path, options, collector) as llm:
        tokens = tokenize(llm.model, text, options.parse_special)
        n_ctx = options.n_ctx
        available = len(tokens) // n_ctx
        n_chunks = available if options.chunks is None else min(options.chunks, available)
        if n_chunks < 1:
            raise ImatrixComputeError(f"the calibration text has {len(tokens)} tokens, fewer than "
                                      f"one chunk of {n_ctx}", "give more text or a smaller --ctx")
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) \
            else None
        llm.open_context()
        batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        try:
            for i in range(n_chunks):
                chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
                if bos is not None:
                    chunk[0] = bos
                _decode_chunk(llm, batch, chunk)
                elapsed = time.perf_counter() - started
                progress(Progress("imatrix", i + 1, n_chunks, "chunks",
                                  info=f"{(i + 1) * n_ctx / elapsed:,.0f} tok/s"))
        finally:
            llama_cpp.llama_batch_free(batch)
    if not collector.sums:
        raise ImatrixComputeError(f"no weight multiplications were seen in {model_path.name}",
                                  "is it a LLaMA-style GGUF with blk.N.* weights?")
    write_imatrix_gguf(dest, {n: s.astype(np.float32) for n, s in collector.sums.items()},
                       {n: np.array([c], np.float32) for n, c in collector.counts.items()},
                       datasets=(dataset,), chunk_count=n_chunks, chunk_size=n_ctx)
    return ImatrixResult(path=dest, model=model_path, dataset=dataset,
                         n_entries=len(collector.sums), chunks=n_chunks, n_ctx=n_ctx,
                         n_tokens=n_chunks * n_ctx, seconds=time.perf_counter() - started)


def _decode_chunk(llm: _Llama, batch: object, chunk: list[int]) -> None:
    import llama_cpp

    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    batch.n_tokens = len(chunk)
    for k, token in enumerate(chunk):
        batch.token[k] = token
        batch.pos[k] = k
        batch.n_seq_id[k] = 1
        batch.seq_id[k][0] = 0
        batch.logits[k] = True  # as llama-imatrix: the last layer then runs on every token
    with capture_llama_log(llm._log):  # a stop signal aborts the chunk and is raised here
        rc = llama_cpp.llama_decode(llm.ctx, batch)
    error = llm.collector.error
    if isinstance(error, (ImatrixComputeError, KeyboardInterrupt, Terminated)):
        raise error
    if error is not None:  # a bug: keep its traceback
        raise RuntimeError(f"activation collector failed: {error!r}") from error
    if rc != 0:
        reason = llama_reason(llm.log_errors)
        raise ImatrixComputeError(f"llama.cpp failed to evaluate a chunk (llama_decode "
                                  f"returned {rc}): {reason}")

