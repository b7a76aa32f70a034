"""benchmarks/gpu.py: the sdist trimming rules, wheel unpacking, the time budget, the report.

The GPU run itself needs the GPU machine; what can go wrong before it gets there is tested
here: a trimmed sdist that lost a file the build needs (the rules), a phase that overruns
(stopped, recorded, the rest skipped, the record still written), and the summary of a run
that measured only part of what it meant to.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from benchmarks import gpu, gpu_prepare, gpu_runner
from benchmarks.gpu_report import render_text

ROOT = Path(__file__).resolve().parent.parent
TOP = gpu_prepare.SDIST

KEPT = (
    "PKG-INFO", "pyproject.toml", "CMakeLists.txt", "README.md", "LICENSE.md",
    "llama_cpp/__init__.py", "llama_cpp/lib/.keep", "vendor/llama.cpp/CMakeLists.txt",
    "vendor/llama.cpp/LICENSE", "vendor/llama.cpp/licenses/LICENSE-curl",
    "vendor/llama.cpp/cmake/common.cmake", "vendor/llama.cpp/include/llama.h",
    "vendor/llama.cpp/src/llama.cpp", "vendor/llama.cpp/common/arg.cpp",
    "vendor/llama.cpp/vendor/miniaudio/miniaudio.h", "vendor/llama.cpp/ggml/CMakeLists.txt",
    "vendor/llama.cpp/ggml/include/ggml-cuda.h", "vendor/llama.cpp/ggml/src/ggml.c",
    "vendor/llama.cpp/ggml/src/ggml-backend.cpp", "vendor/llama.cpp/ggml/src/CMakeLists.txt",
    "vendor/llama.cpp/ggml/src/ggml-cpu/arch/x86/quants.c",
    "vendor/llama.cpp/ggml/src/ggml-cpu/arch/arm/quants.c",
    "vendor/llama.cpp/ggml/src/ggml-cuda/mmq.cu",
    "vendor/llama.cpp/ggml/src/ggml-cuda/template-instances/mmq-instance-q4_k.cu",
    "vendor/llama.cpp/tools/mtmd/CMakeLists.txt", "vendor/llama.cpp/tools/mtmd/clip.cpp",
    "vendor/llama.cpp/tools/mtmd/models/llava.cpp",
)
DROPPED = (
    ".git/objects/pack/pack-1.pack", "vendor/llama.cpp/.git", "docs/index.md",
    "examples/batch.py", "tests/test_llama.py", ".github/workflows/ci.yml", "CHANGELOG.md",
    "vendor/llama.cpp/models/ggml-vocab-llama-bpe.gguf", "vendor/llama.cpp/docs/build.md",
    "vendor/llama.cpp/media/llama0-logo.png", "vendor/llama.cpp/tests/test-backend-ops.cpp",
    "vendor/llama.cpp/examples/simple/simple.cpp", "vendor/llama.cpp/gguf-py/gguf/gguf.py",
    "vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/flake.nix",
    "vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp",
    "vendor/llama.cpp/ggml/src/ggml-metal/ggml-metal.m",
    "vendor/llama.cpp/ggml/src/ggml-sycl/ggml-sycl.cpp",
    "vendor/llama.cpp/ggml/src/ggml-opencl/ggml-opencl.cpp",
    "vendor/llama.cpp/ggml/src/ggml-cann/aclnn_ops.cpp",
    "vendor/llama.cpp/ggml/src/ggml-musa/CMakeLists.txt",
    "vendor/llama.cpp/ggml/src/ggml-hip/CMakeLists.txt",
    "vendor/llama.cpp/tools/server/server.cpp", "vendor/llama.cpp/tools/ui/index.html",
    "vendor/llama.cpp/tools/CMakeLists.txt", "vendor/llama.cpp/tools/mtmd/test-1.jpeg",
    "vendor/llama.cpp/tools/mtmd/tests/test.sh",
)


def test_keep_rules() -> None:
    assert [p for p in KEPT if not gpu_prepare.keep(p)] == []
    assert [p for p in DROPPED if gpu_prepare.keep(p)] == []


def _tar(path: Path, names: tuple[str, ...], top: str = TOP) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            data = f"contents of {name}\n".encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_trim_sdist(tmp_path: Path) -> None:
    src, dest = tmp_path / "in.tar.gz", tmp_path / "out.tar.gz"
    _tar(src, KEPT + DROPPED)
    counts = gpu_prepare.trim_sdist(src, dest)
    assert counts["files_kept"] == len(KEPT) and counts["files_dropped"] == len(DROPPED)
    with tarfile.open(dest) as tar:
        assert sorted(tar.getnames()) == sorted(f"{TOP}/{n}" for n in KEPT)
        member = tar.extractfile(f"{TOP}/vendor/llama.cpp/ggml/src/ggml-cuda/mmq.cu")
        assert member is not None
        assert member.read() == b"contents of vendor/llama.cpp/ggml/src/ggml-cuda/mmq.cu\n"
    _tar(src, ("PKG-INFO",), top="something-else")
    with pytest.raises(ValueError, match="unexpected member something-else/PKG-INFO"):
        gpu_prepare.trim_sdist(src, dest)


def _wheel(path: Path) -> Path:
    """A minimal valid wheel: a package, a purelib data file and its dist-info."""
    whl = path / "tinypkg-1.0-py3-none-any.whl"
    files = {"tinypkg/__init__.py": "VALUE = 42\n",
             "tinypkg-1.0.data/purelib/tinyextra.py": "EXTRA = 7\n",
             "tinypkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\n"
                                               "Version: 1.0\n",
             "tinypkg-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
                                            "Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + "tinypkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(whl, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("tinypkg-1.0.dist-info/RECORD", record)
    return whl


def test_unpack_wheel(tmp_path: Path) -> None:
    target = tmp_path / "site"
    gpu_prepare.unpack_wheel(_wheel(tmp_path), target)
    assert (target / "tinypkg" / "__init__.py").read_text() == "VALUE = 42\n"
    assert (target / "tinyextra.py").read_text() == "EXTRA = 7\n"  # purelib data to the root
    assert (target / "tinypkg-1.0.dist-info" / "METADATA").is_file()
    assert not (target / "tinypkg-1.0.data").exists()


# --- the budget ----------------------------------------------------------------------------

def _runner(tmp_path: Path, budget_s: float) -> gpu_runner.Runner:
    return gpu_runner.Runner(gpu_runner.Config(llama="installed"), tmp_path / "out",
                             tmp_path / "work", gpu_runner.Budget(budget_s))


def test_overrunning_phase_is_stopped_and_recorded(tmp_path: Path) -> None:
    runner = _runner(tmp_path, gpu_runner.MARGIN_S + 8)  # a child may take about 8 s
    started = time.monotonic()
    runner.phase("slow", runner.child, "slow", [sys.executable, "-c",
                                                "import time; time.sleep(60)"], min_s=1)
    assert time.monotonic() - started < 20
    runner.phase("after", lambda: "never")
    phases = json.loads((tmp_path / "out" / "gpu.json").read_text())["phases"]
    assert [(p["name"], p["status"]) for p in phases] == [("slow", "timeout"),
                                                          ("after", "skipped")]
    assert "stopped at the budget's limit" in phases[0]["detail"]
    assert phases[1]["detail"] == "an earlier phase stopped the run"


def test_phase_without_time_is_skipped(tmp_path: Path) -> None:
    runner = _runner(tmp_path, gpu_runner.MARGIN_S + 2)
    assert runner.phase("quick", lambda: {"x": 1}, cache_key="quick", min_s=0) == {"x": 1}
    assert runner.phase("big", lambda: "never", min_s=30) is None
    phases = json.loads((tmp_path / "out" / "gpu.json").read_text())["phases"]
    assert [(p["name"], p["status"]) for p in phases] == [("quick", "ok"), ("big", "skipped")]
    assert phases[1]["detail"] == "budget spent"
    # a rerun with the same work folder reuses the finished phase
    again = _runner(tmp_path, gpu_runner.MARGIN_S + 2)
    assert again.phase("quick", lambda: pytest.fail("ran twice"), cache_key="quick") == \
        {"x": 1}
    assert again.report["phases"][-1]["status"] == "cached"


def test_failing_child_reports_its_log(tmp_path: Path) -> None:
    runner = _runner(tmp_path, 300)
    runner.phase("broken", runner.child, "broken",
                 [sys.executable, "-c", "import sys; sys.exit('it broke')"])
    (record,) = runner.report["phases"]
    assert record["status"] == "failed" and "exit code 1" in record["detail"]
    assert "it broke" in record["detail"] and runner.stopped


def test_cmake_args() -> None:
    assert gpu.cmake_args(gpu_runner.Config(arch="90")) == \
        "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF"
    assert "GGML_CUDA" not in gpu.cmake_args(gpu_runner.Config(llama="cpu"))


def test_report_of_a_partial_run() -> None:
    report = {
        "config": {"layers": 8, "hidden": 4096, "ffn": 11008, "heads": 32, "n": 128,
                   "max_tokens": 128, "loop_n": 16, "bench_parallel": "1,8",
                   "bench_reps": 5, "arch": "90", "llama": "cuda"},
        "llama": {"llama_cpp": "0.3.36", "device": "NVIDIA H200"},
        "build": {"seconds": 301.2, "jobs": 16, "cmake_args": "-DGGML_CUDA=on"},
        "model": {"parameters": gpu.parameters(gpu_runner.Config())},
        "results": {
            "BF16": {"bench": {"file_size": 2 * 1024**3, "gpu_layers": 9,
                               "offloadable_layers": 9, "vram_bytes": 3 * 1024**3,
                               "prompt_tokens_per_second": {"mean": 9000.0, "sd": 12.5},
                               "generation_tokens_per_second": {"mean": 400.0, "sd": 1.0},
                               "throughput_by_parallel": {"1": 390.0, "8": 2800.0}},
                     "smoke": {"parallel": 128, "problems": 128, "wall_seconds": 36.0,
                               "generation_tokens_per_second": 455.1,
                               "parallel_choice": {"parallel": 128, "reason": "capped"}},
                     "loop": {"problems": 16, "seconds": 16.0,
                              "generation_tokens_per_second": 128.0}},
            "Q8_0": {"bench": None, "smoke": None, "loop": None}},
        "phases": [{"name": "build", "status": "ok", "seconds": 301.2},
                   {"name": "bench Q8_0", "status": "skipped", "detail": "budget spent"}],
        "elapsed_s": 480.0, "budget_s": 500}
    text = render_text(report)
    assert "mathq on NVIDIA H200: llama-cpp-python 0.3.36, CUDA build for sm_90" in text
    assert "2.46 B parameters" in text and "build: 301 s with 16 jobs" in text
    bf16 = [line for line in text.splitlines() if line.startswith("BF16 ")]
    assert bf16[0].split()[:2] == ["BF16", "2.00"] and "2,800" in bf16[0] and "9/9" in bf16[0]
    # smoke: 128 problems in 36 s = 12,800/h; the loop: 16 in 16 s = 3,600/h; 3.56x
    assert bf16[1].split() == ["BF16", "128", "455.1", "12,800", "128.0", "3,600", "3.56"]
    q8 = [line for line in text.splitlines() if line.startswith("Q8_0 ")]
    assert all(set(line.split()[1:]) <= {"-", "/"} for line in q8)
    assert "BF16: P = 128: capped" in text
    assert "bench Q8_0         skipped" in text and "budget spent" in text


def test_dry_run_under_a_tiny_budget(tmp_path: Path) -> None:
    """The real script, end to end as far as 25 s allow: phases end ok until one is
    stopped at the limit (or none can start), the rest are skipped, the record is complete
    and the exit code says nothing failed."""
    gpu_dir = tmp_path / "gpu"
    (gpu_dir / "wheels").mkdir(parents=True)
    _wheel(gpu_dir / "wheels")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "run", "--out", str(out),
         "--work", str(tmp_path / "work"), "--gpu-dir", str(gpu_dir), "--cpu-dry-run",
         "--layers", "1", "--hidden", "256", "--ffn", "512", "--heads", "4",
         "--budget-s", str(gpu_runner.MARGIN_S + 25)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu.json").read_text())
    statuses = [p["status"] for p in report["phases"]]
    assert statuses[:3] == ["ok", "ok", "ok"]  # machine, wheels, import
    done = statuses.index("skipped")
    assert set(statuses[:done - 1]) == {"ok"} and statuses[done - 1] in ("ok", "timeout")
    assert set(statuses[done:]) == {"skipped"}
    assert report["elapsed_s"] <= gpu_runner.MARGIN_S + 25
    assert report["llama"]["gpu_offload"] is False and report["llama"]["device"] == "CPU"
    assert (tmp_path / "work" / "site" / "tinypkg" / "__init__.py").is_file()
    assert (out / "gpu.txt").read_text().startswith("mathq on CPU")
