"""The bench stage: each variant's speed and memory, measured the way llama-bench measures.

Prompt processing (``pp``): a fresh cache, ``n_prompt`` random tokens (BOS first) decoded in
batches of ``n_batch`` (2048, micro-batches of 512), timed to the last synchronised result.
Generation (``tg``): a fresh cache, ``n_gen`` single-token decodes, each synchronised. Both
after one warm-up run, repeated ``repetitions`` times, reported as mean and sample standard
deviation of the tokens per second of each repetition — llama-bench's defaults and method
(pp512, tg128, 5 repetitions, flash attention as llama.cpp decides).

Aggregate generation throughput at P sequences is llama-batched-bench's ``S_TG``: P
sequences each read ``throughput_prompt`` random tokens, then all P advance together one
token per step for ``throughput_gen`` steps; throughput is P x steps over the time of the
steps. Its growth with P is the hardware's headroom for batching, which the smoke stage's
engine uses.

Memory is measured two ways, both reported. llama.cpp's own figures, read from the lines
it logs when it allocates (``model buffer``, ``KV buffer``, ``compute buffer``, ``output
buffer``), for the single-sequence context of the pp/tg tests; and the process's peak
resident set (``VmHWM`` on Linux) *minus* its peak before the model was loaded, so the Python
interpreter, NumPy and llama.cpp's libraries (about 130 MB, the same for every variant) are
not counted. Each variant runs in its own spawned process, so the peak belongs to that
model alone; it also covers the larger context of the throughput test. Then, for what a
user needs to run the file (the model card's memory at a stated context), llama.cpp's
buffers are read again for one-sequence contexts of each of ``memory_contexts`` tokens
(capped at the model's training context), as llama.cpp plans them on a weightless copy of
the model (``no_alloc``: the sizes an allocation would take, nothing allocated), after the
peak was read. Load time is
``llama_model_load_from_file``'s wall time, which depends on whether the file is in the
page cache.

Where it ran is recorded too: the device (``CPU`` or the GPU's name), how many layers
llama.cpp offloaded (every one by default when it can, see :mod:`mathq.llama.devices`),
and ``vram_bytes``, the GPU memory the process took: the largest drop in the GPUs' free
memory from just before the model was loaded, sampled with each context at its fullest
(weights, KV caches and llama.cpp's compute-buffer pool, which keeps what it grew to).
"""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mathq.errors import (
    InferenceError,
    MathqError,
    Terminated,
    interrupts_ignored_by_children,
    leave_interrupts_to_parent,
)
from mathq.evaluate.summaries import BenchSummary, MeanSd
from mathq.progress import Progress, ProgressCallback, no_progress

#: The long context memory is stated at, where the model allows it (capped at its own).
LONG_CONTEXT = 8192


def memory_contexts(num_ctx: int | None) -> tuple[int, ...]:
    """The contexts memory is stated at for files run with ``num_ctx`` (a recipe's Ollama
    parameter; None when it sets none): that one and :data:`LONG_CONTEXT`."""
    return tuple(sorted({LONG_CONTEXT, *([num_ctx] if num_ctx else [])}))


@dataclass(frozen=True)
class BenchOptions:
    """What to measure; the defaults are llama-bench's and llama-batched-bench's."""

    n_prompt: int = 512
    n_gen: int = 128
    repetitions: int = 5
    parallel: tuple[int, ...] = (1, 4, 8)
    throughput_prompt: int = 128
    throughput_gen: int = 128
    n_batch: int = 2048
    threads: int = 0
    gpu_layers: int | None = None
    flash_attn: bool | None = None
    seed: int = 0
    isolate: bool = True
    # Context lengths at which llama.cpp's buffers are also read (see the module docstring):
    # by default 8k, a long chat's; a recipe adds the num_ctx its Modelfiles set.
    memory_contexts: tuple[int, ...] = (LONG_CONTEXT,)


@dataclass(frozen=True)
class BenchResult:
    """One GGUF's figures."""

    path: Path
    threads: int
    load_seconds: float
    peak_rss_bytes: int
    prompt: MeanSd | None
    generation: MeanSd | None
    throughput_by_parallel: dict[str, float]
    baseline_rss_bytes: int | None = None
    llama_buffers: dict[str, int] = field(default_factory=dict)
    buffers_context: int | None = None
    device: str = "CPU"
    gpu_layers: int = 0
    offloadable_layers: int | None = None
    vram_bytes: int | None = None
    # llama.cpp's buffers by one-sequence context length in tokens.
    buffers_by_context: dict[int, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchOutcome:
    """A variant's summary and where it was written."""

    quant: str
    summary_path: Path
    summary: BenchSummary


def _mean_sd(rates: Sequence[float]) -> MeanSd:
    sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
    return MeanSd(mean=round(statistics.fmean(rates), 3), sd=round(sd, 3), n=len(rates))


def bench_gguf(path: Path, options: BenchOptions,
               progress: ProgressCallback = no_progress) -> BenchResult:
    """Measure ``path`` in this process (see the module docstring for the method)."""
    from mathq.llama.devices import describe_devices, gpu_devices, gpu_free_bytes
    from mathq.llama.runtime import Context, EngineOptions, LlamaModel, pad_context

    engine_options = EngineOptions(n_batch=options.n_batch, threads=options.threads,
                                   gpu_layers=options.gpu_layers,
                                   flash_attn=options.flash_attn)
    rng = np.random.default_rng(options.seed)
    baseline = _peak_rss()
    free_before = gpu_free_bytes()
    model = LlamaModel(Path(path), options.gpu_layers)
    vram = [0 if free_before is not None and model.offloaded else None]

    def sample_vram() -> None:
        """Keep the largest drop in free GPU memory since before the load."""
        if vram[0] is not None and free_before is not None:
            now = gpu_free_bytes()
            if now is not None:
                vram[0] = max(vram[0], free_before - now)

    stage = f"bench {Path(path).name}"
    tests = (options.repetitions + 1) * ((options.n_prompt > 0) + (options.n_gen > 0)) \
        + len(options.parallel)
    step = [0]

    def tick(item: str) -> None:
        step[0] += 1
        progress(Progress(stage, step[0], tests, "runs", item=item))

    def tokens(n: int, bos: bool) -> np.ndarray:
        out = rng.integers(0, model.n_vocab, size=n, dtype=np.int32)
        if bos and model.add_bos and n:
            out[0] = model.bos
        return out

    def prompt_run(ctx: Context) -> float:
        ctx.clear()
        toks = tokens(options.n_prompt, bos=True)
        started = time.perf_counter()
        for i in range(0, len(toks), ctx.n_batch):
            chunk = toks[i:i + ctx.n_batch]
            ctx.clear_batch()
            ctx.add(chunk, i, 0, True)
            ctx.decode()
        ctx.synchronize()
        return time.perf_counter() - started

    def gen_run(ctx: Context, n: int) -> float:
        ctx.clear()
        toks = tokens(n, bos=True)
        started = time.perf_counter()
        for i in range(n):
            ctx.clear_batch()
            ctx.add(toks[i:i + 1], i, 0, True)
            ctx.decode()
            ctx.synchronize()
        return time.perf_counter() - started

    try:
        ctx_len = max(options.n_prompt, options.n_gen, 1)
        ctx = Context(model, 1, pad_context(ctx_len), engine_options)
        buffers = {**model.buffer_bytes, **ctx.buffer_bytes}
        try:
            pp: list[float] = []
            tg: list[float] = []
            if options.n_prompt > 0:
                prompt_run(ctx)
                tick("pp warm-up")
                for r in range(options.repetitions):
                    pp.append(options.n_prompt / prompt_run(ctx))
                    tick(f"pp{options.n_prompt} #{r + 1}")
            if options.n_gen > 0:
                gen_run(ctx, 1)
                tick("tg warm-up")
                for r in range(options.repetitions):
                    tg.append(options.n_gen / gen_run(ctx, options.n_gen))
                    tick(f"tg{options.n_gen} #{r + 1}")
        finally:
            sample_vram()
            ctx.close()
        throughput = {}
        if options.parallel:
            throughput = _throughput(model, options, engine_options, tokens, tick, sample_vram)
        peak = _peak_rss()
        by_context = _buffers_by_context(model, options.memory_contexts, engine_options)
        return BenchResult(path=Path(path), threads=engine_options.n_threads(model),
                           load_seconds=round(model.load_seconds, 3),
                           peak_rss_bytes=peak,
                           prompt=_mean_sd(pp) if pp else None,
                           generation=_mean_sd(tg) if tg else None,
                           throughput_by_parallel=throughput,
                           device=describe_devices(gpu_devices()) if model.offloaded else "CPU",
                           gpu_layers=model.offloaded, offloadable_layers=model.n_layer + 1,
                           vram_bytes=vram[0], baseline_rss_bytes=baseline,
                           llama_buffers=buffers, buffers_context=pad_context(ctx_len),
                           buffers_by_context=by_context)
    finally:
        model.close()


def _buffers_by_context(model: Any, contexts: Sequence[int],
                        engine_options: Any) -> dict[int, dict[str, int]]:
    """llama.cpp's buffers for one-sequence contexts of each length (capped at the model's
    training context): the model's own, and each context's as llama.cpp plans it on a
    weightless copy of the model (``no_alloc``), so stating memory at a 7B's 4,096 tokens
    costs no 2 GiB KV cache, neither its time nor its memory."""
    from mathq.llama.runtime import Context, LlamaModel

    lengths = sorted({min(c, model.n_ctx_train) for c in contexts})
    if not lengths:
        return {}
    plan = LlamaModel(model.path, model.gpu_layers, weights=False)
    try:
        by_context = {}
        for n_ctx in lengths:
            probe = Context(plan, 1, n_ctx, engine_options)
            by_context[n_ctx] = {**model.buffer_bytes, **probe.buffer_bytes}
            probe.close()
        return by_context
    finally:
        plan.close()


def _peak_rss() -> int:
    """This process's peak resident set so far, in bytes.

    On Linux it is ``VmHWM`` from ``/proc/self/status``: the high-water mark of this
    process's own memory map. ``getrusage``'s ``ru_maxrss`` is not: Linux carries it across
    ``exec`` from the process that forked, so a spawned child reports its parent's peak
    (which made every variant's "peak RAM" the same number). Elsewhere ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) * (1 if sys.platform == "darwin" else 1024)


def _throughput(model: Any, options: BenchOptions, engine_options: Any, tokens: Any,
                tick: Any, sample_vram: Any) -> dict[str, float]:
    """llama-batched-bench's S_TG for each P: P sequences advancing together."""
    from mathq.llama.runtime import Context, pad_context

    n_seq = max(options.parallel)
    per_seq = pad_context(options.throughput_prompt + options.throughput_gen)
    ctx = Context(model, n_seq, per_seq, engine_options)
    out: dict[str, float] = {}
    try:
        ctx.clear_batch()  # warm-up, as llama-batched-bench: 16 tokens of one sequence
        ctx.add(tokens(16, bos=False), 0, 0, True)
        ctx.decode()
        ctx.synchronize()
        for p in options.parallel:
            ctx.clear()
            pending = [(j, tokens(options.throughput_prompt, bos=True)) for j in range(p)]
            for j, toks in pending:
                for i in range(0, len(toks), ctx.n_batch):
                    ctx.clear_batch()
                    ctx.add(toks[i:i + ctx.n_batch], i, j, True)
                    ctx.decode()
            ctx.synchronize()
            started = time.perf_counter()
            for i in range(options.throughput_gen):
                ctx.clear_batch()
                step = tokens(p, bos=False)
                for j in range(p):
                    ctx.add(step[j:j + 1], options.throughput_prompt + i, j, True)
                ctx.decode()
                ctx.synchronize()
            elapsed = time.perf_counter() - started
            out[str(p)] = round(p * options.throughput_gen / elapsed, 3)
            tick(f"P={p}")
        sample_vram()
    finally:
        ctx.close()
    return out


def _child(path: str, options: dict[str, Any], conn: Any) -> None:
    """Spawned process: measure one GGUF, send progress and the result (or the error)."""
    leave_interrupts_to_parent()
    opts = BenchOptions(**{**options, "parallel": tuple(options["parallel"]),
                           "memory_contexts": tuple(options["memory_contexts"])})
    try:
        result = bench_gguf(Path(path), opts, lambda e: conn.send(("progress", e)))
        conn.send(("result", result))
    except MathqError as e:
        conn.send(("error", (type(e).__name__, e.message, e.hint)))
    except Exception as e:  # a bug: report it with its type
        conn.send(("error", (type(e).__name__, f"{type(e).__name__}: {e}", None)))
    finally:
        conn.close()


def bench_isolated(path: Path, options: BenchOptions,
                   progress: ProgressCallback = no_progress) -> BenchResult:
    """:func:`bench_gguf` in a fresh spawned process, so peak memory is this model's alone."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(str(path), asdict(options), child), daemon=True,
                       name="mathq-bench")
    with interrupts_ignored_by_children():
        proc.start()
    child.close()
    try:
        while True:
            try:
                kind, payload = parent.recv()
            except EOFError:
                proc.join()
                raise InferenceError(f"the benchmark of {Path(path).name} died "
                                     f"(exit code {proc.exitcode})",
                                     "the model may not fit in memory; see dmesg") from None
            if kind == "progress":
                progress(payload)
            elif kind == "result":
                return payload
            else:
                _name, message, hint = payload
                raise InferenceError(message, hint)
    except (Terminated, KeyboardInterrupt):
        proc.kill()  # stopped: the child ignores Ctrl-C, and its measurement is moot
        raise
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()




