"""GPU defaults: chosen only when llama.cpp reports GPU offload support.

CI's llama-cpp-python is a CPU build, so ``llama_cpp.llama_supports_gpu_offload`` is
monkeypatched to say yes; llama.cpp itself then ignores the offload (it has no GPU device),
which is all these tests need: they check what mathq asks llama.cpp for, what it records,
and the ``--parallel auto`` arithmetic on hand-made numbers.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import llama_cpp
import pytest

from mathq.errors import InferenceError
from mathq.evaluate.bench import BenchOptions
from mathq.evaluate.smoke import SmokeOptions
from mathq.evaluate.stage import run_bench, run_smoke
from mathq.evaluate.summaries import SmokeSummary, load_summary
from mathq.layout import BuildLayout
from mathq.llama import devices, engine
from mathq.llama.devices import (
    ALL_LAYERS,
    GPU_THREADS,
    PARALLEL_CAP,
    Device,
    choose_parallel,
    default_threads,
    kv_bytes_per_element,
    kv_bytes_per_sequence,
    offloaded_layers,
    parse_nvidia_smi,
    resolve_gpu_layers,
)
from mathq.llama.engine import BatchEngine, GenRequest
from mathq.llama.runtime import PARALLEL_AUTO, EngineOptions, LlamaModel
from mathq.recipes.recipe import load_recipe
from tests.clirun import run
from tests.conftest import FIXTURES

GiB, MiB = 1 << 30, 1 << 20
CORES = 16  # what os.cpu_count() says under the `cores` fixture
RECIPE = "deepseek-math-7b-rl"
PROBLEMS = str(FIXTURES / "math500" / "test.jsonl")


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp says it can offload to a GPU."""
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)


@pytest.fixture
def cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16-core machine, so that the GPU's thread cap (4) differs from "every core"; only
    for tests that decode nothing with the default thread count."""
    monkeypatch.setattr(os, "cpu_count", lambda: CORES)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``n_gpu_layers`` of every model llama.cpp is asked to load."""
    seen: list[int] = []
    real = llama_cpp.llama_model_load_from_file

    def load(path: bytes, params: llama_cpp.llama_model_params) -> object:
        seen.append(params.n_gpu_layers)
        return real(path, params)

    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", load)
    return seen


# --- the rules, on hand-made numbers -----------------------------------------------------

def test_resolve_gpu_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert llama_cpp.llama_supports_gpu_offload() is False  # CI's build is CPU-only
    assert resolve_gpu_layers(None) == 0 and resolve_gpu_layers(12) == 12
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    assert resolve_gpu_layers(None) == ALL_LAYERS == -1
    assert resolve_gpu_layers(0) == 0 and resolve_gpu_layers(12) == 12


def test_offloaded_layers_and_threads(cores: None) -> None:
    # llama.cpp's rule: n_layer repeating layers plus the output layer are offloadable
    assert offloaded_layers(-1, 30, gpu=True) == 31
    assert offloaded_layers(999, 30, gpu=True) == 31
    assert offloaded_layers(10, 30, gpu=True) == 10
    assert offloaded_layers(-1, 30, gpu=False) == 0
    assert default_threads(0, 31, 30) == GPU_THREADS == 4  # all on the GPU
    assert default_threads(0, 10, 30) == CORES  # the CPU computes 20 layers
    assert default_threads(0, 0, 30) == CORES
    assert default_threads(6, 31, 30) == 6  # --threads wins


def test_kv_cache_size() -> None:
    # DeepSeek-Math 7B: 30 layers, K and V rows of 4096 F16 values, 1280 cells per sequence
    assert kv_bytes_per_sequence(1280, 30, 4096, 4096, 2.0) == 629_145_600  # 600 MiB
    assert kv_bytes_per_element(None) == 2.0
    assert kv_bytes_per_element("q8_0") == 34 / 32
    assert kv_bytes_per_element("F32") == 4.0


def test_choose_parallel_on_a_gpu() -> None:
    kv = 600 * MiB
    # H200 with a BF16 7B loaded: 126 GiB free, a 12.6 GiB reserve: 193 caches fit
    big = choose_parallel(500, gpu=True, free_bytes=126 * GiB, kv_bytes_per_seq=kv,
                          device="NVIDIA H200")
    assert big.parallel == PARALLEL_CAP == 128
    assert big.reason.startswith("129,024 MiB free on the GPU less a 12,902 MiB reserve "
                                 "holds 193 KV caches of 600.0 MiB")
    assert big.reason.endswith("capped at 128")
    assert (big.device, big.free_bytes, big.kv_bytes_per_seq, big.cap) == \
        ("NVIDIA H200", 126 * GiB, kv, 128)
    few = choose_parallel(40, gpu=True, free_bytes=126 * GiB, kv_bytes_per_seq=kv)
    assert few.parallel == 40 and few.reason.endswith("all 40 problems at once")
    # 8 GiB free: a 1 GiB reserve (the floor) leaves 7168 MiB, 11 caches of 600 MiB
    small = choose_parallel(500, gpu=True, free_bytes=8 * GiB, kv_bytes_per_seq=kv)
    assert small.parallel == 11 and "holds 11 KV caches" in small.reason
    tight = choose_parallel(500, gpu=True, free_bytes=GiB + 100 * MiB, kv_bytes_per_seq=kv)
    assert tight.parallel == 1 and tight.reason.endswith("trying 1")
    assert choose_parallel(500, gpu=True, free_bytes=126 * GiB, kv_bytes_per_seq=kv,
                           cap=16).parallel == 16


def test_choose_parallel_on_the_cpu() -> None:
    cpu = choose_parallel(500, gpu=False, free_bytes=None, kv_bytes_per_seq=600 * MiB)
    assert cpu.parallel == 8 and cpu.reason == "CPU: the default of 8 sequences"
    assert cpu.device == "CPU" and cpu.free_bytes is None
    assert choose_parallel(3, gpu=False, free_bytes=None, kv_bytes_per_seq=1).parallel == 3
    unknown = choose_parallel(500, gpu=True, free_bytes=None, kv_bytes_per_seq=600 * MiB)
    assert unknown.parallel == 8 and "unknown" in unknown.reason


def test_nvidia_smi_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                             gpu: None) -> None:
    rows = "NVIDIA H200, 1024, 143771\nNVIDIA H200, 0, 143771\n"
    assert parse_nvidia_smi(rows) == [
        Device("GPU0", "NVIDIA H200", "gpu", (143771 - 1024) * MiB, 143771 * MiB),
        Device("GPU1", "NVIDIA H200", "gpu", 143771 * MiB, 143771 * MiB)]
    assert parse_nvidia_smi("garbage\n,,\n") == []
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{rows.splitlines()[0]}\\n'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def unbound() -> None:
        raise AttributeError("ggml_backend_dev_count")

    monkeypatch.setattr(devices, "_ggml", unbound)
    (dev,) = devices.gpu_devices()
    assert dev.description == "NVIDIA H200" and dev.used_bytes == 1024 * MiB
    assert devices.gpu_free_bytes() == (143771 - 1024) * MiB
    assert devices.describe_devices([dev, dev]) == "2 x NVIDIA H200"
    assert devices.describe_devices([]) == "CPU"


def test_llama_devices_lists_the_cpu() -> None:
    """ggml's device API, bound with ctypes, answers on CI's CPU build."""
    found = devices.llama_devices()
    assert [d.kind for d in found].count("cpu") == 1
    assert devices.gpu_devices() == [] and devices.gpu_free_bytes() is None


# --- where the defaults are applied --------------------------------------------------------

def test_model_defaults_follow_offload_support(tiny_bf16_gguf: Path, loads: list[int],
                                               monkeypatch: pytest.MonkeyPatch,
                                               cores: None) -> None:
    cpu = LlamaModel(tiny_bf16_gguf)
    try:
        assert (cpu.gpu, cpu.gpu_layers, cpu.offloaded) == (False, 0, 0)
        assert EngineOptions().n_threads(cpu) == CORES
        assert (cpu.n_layer, cpu.n_embd_k, cpu.n_embd_v) == (2, 256, 256)
    finally:
        cpu.close()
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    gpu = LlamaModel(tiny_bf16_gguf)
    partial = LlamaModel(tiny_bf16_gguf, gpu_layers=1)
    try:
        assert (gpu.gpu, gpu.gpu_layers, gpu.offloaded) == (True, -1, 3)
        assert EngineOptions().n_threads(gpu) == GPU_THREADS
        assert EngineOptions(threads=3).n_threads(gpu) == 3
        assert partial.offloaded == 1 and partial.gpu_layers_repeating == 0
        assert EngineOptions().n_threads(partial) == CORES
    finally:
        gpu.close()
        partial.close()
    assert loads == [0, -1, 1]


def test_kld_and_imatrix_offload_when_supported(tiny_bf16_gguf: Path, loads: list[int],
                                                gpu: None, cores: None,
                                                tmp_path: Path) -> None:
    from mathq.evaluate.kld.evaluator import ChunkEvaluator
    from mathq.quantize.imatrix import ImatrixOptions, compute_imatrix

    with ChunkEvaluator(tiny_bf16_gguf, 64) as ev:
        assert ev.threads == GPU_THREADS
    with ChunkEvaluator(tiny_bf16_gguf, 64, gpu_layers=0) as ev:
        assert ev.threads == CORES
    text = (FIXTURES / "imatrix" / "calibration.txt").read_text(encoding="utf-8")
    compute_imatrix(tiny_bf16_gguf, text, tmp_path / "m.gguf",
                    ImatrixOptions(n_ctx=64, chunks=1, threads=1), dataset="t")
    compute_imatrix(tiny_bf16_gguf, text, tmp_path / "n.gguf",
                    ImatrixOptions(n_ctx=64, chunks=1, threads=1, gpu_layers=1), dataset="t")
    assert loads == [-1, 0, -1, 1]


def test_cpu_build_keeps_cpu_defaults(tiny_bf16_gguf: Path, loads: list[int],
                                      cores: None) -> None:
    from mathq.evaluate.kld.evaluator import ChunkEvaluator

    with ChunkEvaluator(tiny_bf16_gguf, 64) as ev:
        assert ev.threads == CORES
    with BatchEngine(tiny_bf16_gguf, EngineOptions(parallel=PARALLEL_AUTO, threads=1)) as e:
        assert e.model.offloaded == 0
    assert loads == [0, 0]


class _FakeGpu:
    """A GPU whose free memory drops by 1 GiB each time it is asked."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.asked = 0

    def __call__(self) -> list[Device]:
        self.asked += 1
        free = self.free - (self.asked - 1) * GiB
        return [Device("CUDA0", "NVIDIA H200", "gpu", free, 150 * GiB)]


def test_bench_records_where_it_ran(tiny_bf16_gguf: Path, gpu: None,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeGpu(140 * GiB)
    monkeypatch.setattr(devices, "llama_devices", fake)
    layout = BuildLayout.for_model(RECIPE, Path(os.environ["MATHQ_BUILD_DIR"]))
    layout.root.mkdir(parents=True)
    layout.gguf("BF16").symlink_to(tiny_bf16_gguf)
    options = BenchOptions(n_prompt=32, n_gen=4, repetitions=1, parallel=(1, 2), threads=1,
                           isolate=False)
    (outcome,) = run_bench(load_recipe(RECIPE), ["BF16"], options)
    s = outcome.summary
    assert (s.device, s.gpu_layers, s.offloadable_layers) == ("NVIDIA H200", 3, 3)
    # asked before the load, after the pp/tg context, after the throughput runs, and once
    # more for the device's name: the largest drop is two of the fake's steps
    assert fake.asked == 4 and s.vram_bytes == 2 * GiB
    saved = json.loads(outcome.summary_path.read_text())
    assert saved["device"] == "NVIDIA H200" and saved["vram_bytes"] == 2 * GiB


def test_bench_on_the_cpu_records_cpu(tiny_bf16_gguf: Path) -> None:
    layout = BuildLayout.for_model(RECIPE, Path(os.environ["MATHQ_BUILD_DIR"]))
    layout.root.mkdir(parents=True)
    layout.gguf("BF16").symlink_to(tiny_bf16_gguf)
    options = BenchOptions(n_prompt=16, n_gen=2, repetitions=1, parallel=(), threads=1,
                           isolate=False)
    (outcome,) = run_bench(load_recipe(RECIPE), ["BF16"], options)
    s = outcome.summary
    assert (s.device, s.gpu_layers, s.offloadable_layers, s.vram_bytes) == ("CPU", 0, 3, None)


# --- --parallel auto in the engine and the smoke summary -----------------------------------

def _requests(n: int) -> list[GenRequest]:
    return [GenRequest(f"r{i}", f"Problem {i}: what is {i} + {i}?", 4) for i in range(n)]


def test_engine_auto_sizes_to_free_gpu_memory(tiny_bf16_gguf: Path, gpu: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with BatchEngine(tiny_bf16_gguf, EngineOptions(parallel=PARALLEL_AUTO, threads=1)) as e:
        # the tiny model's cache: 256 cells x 2 layers x (256 + 256) x 2 bytes = 512 KiB
        kv = kv_bytes_per_sequence(256, 2, 256, 256, 2.0)
        assert kv == 512 * 1024
        monkeypatch.setattr(engine, "gpu_free_bytes", lambda: GiB + 3 * kv + kv // 2)
        monkeypatch.setattr(engine, "gpu_devices", _FakeGpu(GiB))
        results = list(e.generate(_requests(5)))
        assert sorted(r.id for r in results) == [f"r{i}" for i in range(5)]
        choice = e.parallel_choice
        assert choice is not None and choice.parallel == 3 and e._ctx.n_seq == 3
        assert choice.kv_bytes_per_seq == kv and choice.device == "NVIDIA H200"
        assert "holds 3 KV caches" in choice.reason


def test_engine_auto_halves_when_the_context_does_not_fit(
        tiny_bf16_gguf: Path, gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    real = engine.Context

    def context(model, n_seq, n_ctx_seq, options):
        if n_seq > 2:
            raise InferenceError("cudaMalloc failed: out of memory")
        return real(model, n_seq, n_ctx_seq, options)

    monkeypatch.setattr(engine, "Context", context)
    monkeypatch.setattr(engine, "gpu_free_bytes", lambda: 10 * GiB)
    with BatchEngine(tiny_bf16_gguf, EngineOptions(parallel=PARALLEL_AUTO, threads=1)) as e:
        assert len(list(e.generate(_requests(6)))) == 6
        choice = e.parallel_choice
        assert choice is not None and choice.parallel == 1  # 6 -> 3 -> 1
        assert choice.reason.endswith("llama.cpp could not allocate that many, so 1")


def test_smoke_summary_records_the_choice(tiny_bf16_gguf: Path) -> None:
    layout = BuildLayout.for_model(RECIPE, Path(os.environ["MATHQ_BUILD_DIR"]))
    layout.root.mkdir(parents=True)
    layout.gguf("BF16").symlink_to(tiny_bf16_gguf)
    args = ("smoke", RECIPE, "-Q", "BF16", "--suite", PROBLEMS, "--n", "3", "--max-tokens",
            "4", "--threads", "1")
    out = run(*args).output  # --parallel auto is the default
    assert " P=3 " in out
    s = load_summary(layout.smoke_summary("BF16"), SmokeSummary)
    assert s.parallel == 3 and s.parallel_choice is not None
    assert s.parallel_choice.requested == "auto" and s.parallel_choice.device == "CPU"
    assert s.parallel_choice.reason == "CPU: the default of 8 sequences, 3 problems"
    raw = json.loads(layout.smoke_summary("BF16").read_text())
    assert raw["parallel_choice"]["parallel"] == 3
    # a rerun only resumes: the summary keeps the choice the results were made with
    run(*args, "--parallel", "2")
    assert load_summary(layout.smoke_summary("BF16"), SmokeSummary).parallel_choice == \
        s.parallel_choice
    # a run that answers records its own, given choice
    run(*args, "--parallel", "2", "--restart")
    again = load_summary(layout.smoke_summary("BF16"), SmokeSummary)
    assert again.parallel == 2 and again.parallel_choice is not None
    assert (again.parallel_choice.requested, again.parallel_choice.reason) == \
        ("2", "--parallel 2")


def test_smoke_library_default_backend_is_unchanged(tiny_bf16_gguf: Path) -> None:
    """SmokeOptions() keeps its 8 sequences; auto is what the command line defaults to."""
    assert SmokeOptions().backend.parallel == 8
    layout = BuildLayout.for_model(RECIPE, Path(os.environ["MATHQ_BUILD_DIR"]))
    layout.root.mkdir(parents=True)
    layout.gguf("BF16").symlink_to(tiny_bf16_gguf)
    from mathq.evaluate.backends.base import BackendSpec

    options = SmokeOptions(suite=PROBLEMS, n=2, max_tokens=2,
                           backend=BackendSpec(parallel=PARALLEL_AUTO, threads=1))
    (outcome,) = run_smoke(load_recipe(RECIPE), ["BF16"], options)
    assert outcome.summary.parallel == 2


@pytest.mark.parametrize(("value", "message"), [
    ("0", "0 is not in the range 1 to 256 (or 'auto')"),
    ("many", "'many' is not a whole number from 1 to 256 (or 'auto')"),
])
def test_parallel_option_is_checked(value: str, message: str) -> None:
    out = run("smoke", RECIPE, "--parallel", value, code=2).output
    assert message in out


# --- --ignore-eos: fixed-length answers for speed measurements ------------------------------

def test_ignore_eos_never_picks_an_end_token(tiny_bf16_gguf: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the greedy first token of a prompt an end-of-generation token: a plain run
    stops at once, an --ignore-eos run goes on to its limit without ever choosing it."""
    (request,) = _requests(1)
    with BatchEngine(tiny_bf16_gguf, EngineOptions(threads=1)) as e:
        first = next(iter(e.generate([request]))).tokens[0]
    real = LlamaModel.is_eog
    monkeypatch.setattr(LlamaModel, "is_eog", lambda self, t: t == first or real(self, t))
    with BatchEngine(tiny_bf16_gguf, EngineOptions(threads=1)) as e:
        (stopped,) = e.generate([request])
    assert stopped.tokens == () and stopped.finish_reason == "stop"
    with BatchEngine(tiny_bf16_gguf, EngineOptions(threads=1, ignore_eos=True)) as e:
        assert first in e._banned.tolist()
        (full,) = e.generate([request])
    assert len(full.tokens) == request.max_tokens and full.finish_reason == "length"
    assert first not in full.tokens


def test_smoke_ignore_eos_drops_stop_strings(tiny_bf16_gguf: Path) -> None:
    layout = BuildLayout.for_model(RECIPE, Path(os.environ["MATHQ_BUILD_DIR"]))
    layout.root.mkdir(parents=True)
    layout.gguf("BF16").symlink_to(tiny_bf16_gguf)
    run("smoke", RECIPE, "-Q", "BF16", "--suite", PROBLEMS, "--n", "2", "--max-tokens", "5",
        "--threads", "1", "--ignore-eos")
    settings = json.loads(layout.smoke_settings("BF16").read_text())
    assert settings["ignore_eos"] is True and settings["stop"] == []
    rows = [json.loads(x) for x in layout.smoke_results("BF16").read_text().splitlines()]
    assert [r["completion_tokens"] for r in rows] == [5, 5]
    out = run("smoke", RECIPE, "--ignore-eos", "--endpoint", "http://127.0.0.1:9", code=2)
    assert "--ignore-eos is for llama.cpp in process" in out.output
