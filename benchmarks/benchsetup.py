"""Shared set-up of the speed benchmarks: the benchmark model and llama.cpp's own tools.

The model is DeepSeek-shaped (LLaMA architecture, DeepSeek's real 102400-token vocabulary and
tokenizer, no grouped-query attention) with random weights, big enough that decode time is
dominated by the weights as in the real 7B, small enough for a 2-core machine: hidden 1536,
FFN 4096, 12 heads, 12 layers, about 0.65 B parameters (1.3 GB in BF16). It is written into
``.bench/`` (git-ignored) once, with gguf's writer, and quantized to Q4_K_M with mathq's
quantizer. Random weights make the text gibberish; these benchmarks measure speed only.

llama.cpp's tools (llama-server, llama-bench, llama-batched-bench) come from
:func:`benchmarks.peers.tool`: built from the llama-cpp-python 0.3.36 sdist's sources with the
same flags as the wheel (no AMX kernels), under a lock, only if missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers import CACHE as BENCH_DIR
from benchmarks.peers import ROOT, tool

MODEL_SHAPE = {"n_embd": 1536, "n_ff": 4096, "n_layer": 12, "n_head": 12, "n_ctx": 4096}
MODEL_NAME = "deepseek-shape-0.65b"


def model_path(kind: str) -> Path:
    """``.bench/<name>-BF16.gguf`` or ``-Q4_K_M.gguf``, made on first use."""
    BENCH_DIR.mkdir(exist_ok=True)
    bf16 = BENCH_DIR / f"{MODEL_NAME}-BF16.gguf"
    if not bf16.exists():
        from tests.ggufbuild import write_tiny_llama_gguf

        print(f"writing {bf16} ...", flush=True)
        tmp = bf16.with_suffix(".partial")
        write_tiny_llama_gguf(tmp, ROOT / "tests/fixtures/deepseek-llm-tokenizer/"
                              "ggml-vocab-deepseek-llm.gguf", **MODEL_SHAPE)
        tmp.rename(bf16)
    if kind == "BF16":
        return bf16
    out = BENCH_DIR / f"{MODEL_NAME}-{kind}.gguf"
    if not out.exists():
        from mathq.quantize.core import QuantizeOptions, quantize_gguf
        from mathq.recipes.quants import get_quant

        print(f"quantizing {out} ...", flush=True)
        quantize_gguf(bf16, out, QuantizeOptions(quant=get_quant(kind)))
    return out


def batched_bench(gguf: Path, threads: int, npl: tuple[int, ...], npp: int,
                  ntg: int) -> dict[int, dict[str, float]]:
    """llama-batched-bench for each sequence count: ``speed_tg`` (S_TG, generation only) and
    ``speed`` (S, prompt and generation together) in tokens/s.

    The speed benchmarks' common yardstick for batched generation, run one way for all:
    a context that fits every sequence, llama.cpp's default batch sizes, the same threads
    for prompt and generation.
    """
    argv = [str(tool("llama-batched-bench")), "-m", str(gguf),
            "-c", str(max(npl) * (npp + ntg + 256)), "-b", "2048", "-ub", "512",
            "-npp", str(npp), "-ntg", str(ntg), "-npl", ",".join(map(str, npl)),
            "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {int(r["pl"]): {"speed_tg": float(r["speed_tg"]), "speed": float(r["speed"])}
            for r in rows}


def load_note() -> str:
    """The machine's load averages, to print beside timings on a shared machine."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"
