"""`make install CUDA=1` reaches pip with llama.cpp's CUDA switches; plain `make install` not.

Only `make -n` (print the commands, run nothing) against a throw-away venv path, so the
tests build nothing and never touch the real .venv.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_n(venv: Path, *args: str) -> str:
    out = subprocess.run(["make", "-n", "install", f"VENV={venv}", *args], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return out.stdout


def up_to_date(out: str) -> bool:
    return out.strip() == "make: Nothing to be done for 'install'."


def cmake_args(line: str) -> str:
    """The value the line gives CMAKE_ARGS (shell quoting undone)."""
    words = [w for w in shlex.split(line) if w.startswith("CMAKE_ARGS=")]
    assert len(words) == 1, line
    return words[0].removeprefix("CMAKE_ARGS=")


def test_cuda_reaches_the_llama_build(tmp_path: Path) -> None:
    out = make_n(tmp_path / "venv", "CUDA=1", "CUDA_ARCH=90")
    build = [line for line in out.splitlines() if "--force-reinstall" in line]
    assert len(build) == 1, out
    line = build[0]
    assert cmake_args(line) == "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90"
    # a real rebuild: from source, not a cached (CPU) wheel, nothing else reinstalled
    for flag in ("--no-binary llama-cpp-python", "--no-cache-dir", "--no-deps",
                 "'llama-cpp-python==0.3.36'"):
        assert flag in line, flag
    # the AMX switches go to the host compiler only, never into what nvcc is given
    assert "-mno-amx" not in cmake_args(line) and "CUDAFLAGS" not in out
    assert "touch " + str(tmp_path / "venv" / ".installed-cuda-90-stamp") in out


def test_cuda_arch_defaults_to_native(tmp_path: Path) -> None:
    out = make_n(tmp_path / "venv", "CUDA=1")
    assert "-DCMAKE_CUDA_ARCHITECTURES=native" in out


def test_plain_install_is_the_cpu_build(tmp_path: Path) -> None:
    out = make_n(tmp_path / "venv")
    assert "GGML_CUDA" not in out and "CUDA_ARCHITECTURES" not in out
    install = [line for line in out.splitlines() if "-e '.[dev]'" in line]
    assert len(install) == 1 and cmake_args(install[0]) == ""
    if os.uname().machine == "x86_64":
        assert 'CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"' in install[0]


def test_switching_flavour_rebuilds(tmp_path: Path) -> None:
    """An installed CPU venv is current for `make install` but not for CUDA=1, and back."""
    venv = tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".installed-cpu-stamp"
    stamp.touch()
    newer = (ROOT / "pyproject.toml").stat().st_mtime + 10
    os.utime(stamp, (newer, newer))
    assert up_to_date(make_n(venv))
    assert "-DGGML_CUDA=on" in make_n(venv, "CUDA=1")
    stamp.rename(venv / ".installed-cuda-native-stamp")
    assert up_to_date(make_n(venv, "CUDA=1"))
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in make_n(venv, "CUDA=1", "CUDA_ARCH=90")
    back = make_n(venv)
    assert "Switching llama-cpp-python back to the CPU build" in back
    assert "--force-reinstall" in back and "GGML_CUDA" not in back
