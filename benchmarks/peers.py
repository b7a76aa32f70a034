"""Build llama.cpp's own tools, the peers mathq is measured against, from the pinned sdist.

The tools come from the llama-cpp-python sdist that mathq pins (its ``vendor/llama.cpp``), so
peer and mathq run the same llama.cpp code. They are compiled with the flags the Makefile uses
for the Python package (native, without AMX kernels) so that speed comparisons are fair.
Every benchmark gets llama.cpp's sources and tools from here, and nowhere else.
``MATHQ_LLAMA_CPP_SRC`` points at an unpacked ``vendor/llama.cpp`` to use instead of
downloading the sdist; ``LLAMA_CPP_BUILD`` at a build folder to reuse (and share: builds in it
hold ``<folder>.lock``, as ``flock`` does, so several users never build at once).
"""

from __future__ import annotations

import fcntl
import os
import platform
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def llama_cpp_source() -> Path:
    """``vendor/llama.cpp`` of the pinned sdist, downloaded and unpacked once.

    The one place the benchmarks get llama.cpp's sources: the tools built here and the
    converter ``benchmarks/convert.py`` runs come from the same tree.
    """
    given = os.environ.get("MATHQ_LLAMA_CPP_SRC")
    if given:
        return Path(given)
    unpacked = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    # CMakeLists.txt, not just the folder: an older convert.py unpacked only the converter.
    if not (unpacked / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                        "-d", str(CACHE)], check=True)
        with tarfile.open(CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
            tar.extractall(CACHE, filter="data")
    return unpacked / "vendor" / "llama.cpp"


def build_dir() -> Path:
    """Where the tools are built (``$LLAMA_CPP_BUILD`` or ``.bench/llama-build``)."""
    return Path(os.environ.get("LLAMA_CPP_BUILD") or CACHE / "llama-build")


def tool(name: str) -> Path:
    """Path of a llama.cpp tool (``llama-quantize``, ``llama-bench``...), built if missing."""
    out = build_dir()
    binary = out / "bin" / name
    if binary.exists():
        return binary
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():  # built by someone else while we waited
            return binary
        print(f"building {name} in {out} ...", flush=True)
        flags = NO_AMX if platform.machine() == "x86_64" else ""
        if not (out / "CMakeCache.txt").exists():
            subprocess.run(["cmake", "-S", str(llama_cpp_source()), "-B", str(out),
                            "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                            "-DLLAMA_BUILD_TESTS=OFF", f"-DCMAKE_C_FLAGS={flags}",
                            f"-DCMAKE_CXX_FLAGS={flags}"], check=True)
        subprocess.run(["cmake", "--build", str(out), "--target", name, "-j",
                        str(os.cpu_count() or 1)], check=True)
    return binary


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run a command; return its wall seconds and its own peak RSS in bytes (from wait4)."""
    import time

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return seconds, usage.ru_maxrss * 1024
