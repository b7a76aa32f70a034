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
    lines = result.output.splitlines()
    assert lines[0].startswith("QUANT ") and lines[1].startswith("BF16 ")
    assert "P=1 " in lines[1] and "P=2 " in lines[1]


def test_bench_missing_variant() -> None:
    result = CliRunner().invoke(cli, ["bench", RECIPE, "--quant", "Q6_K"], catch_exceptions=False)
    assert result.exit_code == 1
    where = BuildLayout.for_model(RECIPE, Path(os.environ["MATHQ_BUILD_DIR"])).gguf("Q6_K")
    assert result.output == (f"Error: no Q6_K GGUF at {where} (make it first: mathq quantize "
                             f"{RECIPE} --quant Q6_K)\n")
