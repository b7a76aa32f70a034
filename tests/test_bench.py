"""`mathq bench` measures a real GGUF in its own process and writes the summary schema."""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner

from mathq.cli import cli
from mathq.convert.gguf_info import read_gguf_summary
from mathq.evaluate.summaries import BenchSummary, load_summary
from mathq.layout import BuildLayout

RECIPE = "deepseek-math-7b-rl"


def test_bench_writes_summary(tiny_bf16_gguf: Path) -> None:
    layout = BuildLayout.for_model(RECIPE, Path(os.environ["MATHQ_BUILD_DIR"]))
    layout.root.mkdir(parents=True)
    layout.gguf("BF16").symlink_to(tiny_bf16_gguf)
    result = CliRunner().invoke(cli, ["bench", RECIPE, "--quant", "BF16", "-p", "64", "-n", "16",
                                      "-r", "2", "--parallel", "1,2", "--threads", "1"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    s = load_summary(layout.bench_summary("BF16"), BenchSummary)
    info = read_gguf_summary(tiny_bf16_gguf)
    assert s.file_size == tiny_bf16_gguf.stat().st_size == info.size
    assert s.bits_per_weight == round(info.bits_per_weight, 4)
    assert s.threads == 1 and (s.n_prompt, s.n_gen, s.repetitions) == (64, 16, 2)
    assert s.prompt_tokens_per_second and s.prompt_tokens_per_second.n == 2
    assert s.generation_tokens_per_second and s.generation_tokens_per_second.n == 2
    assert s.prompt_tokens_per_second.mean > 0 and s.generation_tokens_per_second.mean > 0
    assert sorted(s.throughput_by_parallel) == ["1", "2"]
    assert all(v > 0 for v in s.throughput_by_parallel.values())
    # The child process touched every weight: its peak RSS is at least the file's size.
    assert s.peak_rss_bytes and s.peak_rss_bytes > s.file_size
    assert s.load_seconds is not None and s.load_seconds > 0
    # Memory that means something: the peak over the interpreter's own (which is tens of
    # MB and the same for every file), and llama.cpp's account of its buffers.
    assert s.baseline_rss_bytes and 20 << 20 < s.baseline_rss_bytes < s.peak_rss_bytes
    over = s.rss_over_baseline_bytes
    assert over is not None and over == s.peak_rss_bytes - s.baseline_rss_bytes
    assert set(s.llama_buffers) >= {"model", "kv_cache", "compute"}
    # llama.cpp's model buffer holds the file's tensors (its log rounds to 0.01 MiB), the KV
    # cache K and V in f16 for every layer and cell of the (padded) 256-token context.
    tensors = sum(x.n_bytes for x in info.tensors)
    assert abs(s.llama_buffers["model"] - tensors) <= 0.005 * 2**20 + 64 * len(info.tensors)
    assert s.buffers_context == 256
    assert s.llama_buffers["kv_cache"] > 0 and s.llama_buffers["compute"] > 0
    assert s.environment["llama_cpp_python"] == "0.3.36" and s.environment["threads"] == "1"
    assert s.environment["cpu"] and s.environment["date"].endswith(" UTC")
    lines = result.output.splitlines()
    assert lines[0].startswith("QUANT ") and lines[1].startswith("BF16 ")
    assert "P=1 " in lines[1] and "P=2 " in lines[1]
    assert " LLAMA MEM " in lines[0] and " RSS+ " in lines[0]


def test_bench_takes_a_gguf_path_like_llama_bench(tiny_bf16_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = CliRunner().invoke(cli, ["bench", str(tiny_bf16_gguf), "-p", "32", "-n", "8",
                                      "-r", "1", "--parallel", "", "--threads", "1",
                                      "--out-dir", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    name = tiny_bf16_gguf.name.removesuffix(".gguf")
    s = load_summary(out / f"{name}.json", BenchSummary)
    assert s.quant == s.model == name and s.gguf == tiny_bf16_gguf.name
    assert s.file_size == tiny_bf16_gguf.stat().st_size and s.llama_buffers["model"] > 0
    assert result.output.splitlines()[1].startswith(name)
    bad = CliRunner().invoke(cli, ["bench", str(tiny_bf16_gguf), "--quant", "Q8_0"])
    assert bad.exit_code == 2 and "a GGUF path is one file" in bad.output
    missing = CliRunner().invoke(cli, ["bench", str(tmp_path / "nope.gguf")])
    assert missing.exit_code == 2 and "nope.gguf does not exist" in missing.output


def test_bench_missing_variant() -> None:
    result = CliRunner().invoke(cli, ["bench", RECIPE, "--quant", "Q6_K"], catch_exceptions=False)
    assert result.exit_code == 1
    where = BuildLayout.for_model(RECIPE, Path(os.environ["MATHQ_BUILD_DIR"])).gguf("Q6_K")
    assert result.output == (f"Error: no Q6_K GGUF at {where} (make it first: mathq quantize "
                             f"{RECIPE} --quant Q6_K)\n")


def test_memory_at_long_contexts_is_planned_as_llama_cpp_allocates_it(
        tiny_bf16_gguf: Path) -> None:
    """The buffers at the memory contexts come from contexts of a weightless model (planned,
    nothing allocated): at the context the speed tests allocated they are the same bytes,
    and the KV cache grows with the context as allocated ones do."""
    from mathq.evaluate.bench import BenchOptions, bench_gguf

    r = bench_gguf(tiny_bf16_gguf, BenchOptions(n_prompt=32, n_gen=4, repetitions=1,
                                                parallel=(), threads=1,
                                                memory_contexts=(256, 512)))
    assert r.buffers_context == 256
    assert r.buffers_by_context[256] == r.llama_buffers  # planned == allocated, every kind
    assert r.buffers_by_context[512]["kv_cache"] == 2 * r.llama_buffers["kv_cache"] > 0
    assert r.buffers_by_context[512]["model"] == r.llama_buffers["model"]
