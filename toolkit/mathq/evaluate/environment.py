"""Where and with what a measurement ran: versions, CPU, threads and date.

Every summary the evaluate stage writes (smoke, bench, kld) carries one of these, taken when
the measurement is made, so the report can say what produced its figures (and a report
rerun later still names the machine and date of the measurements, not of the rerun).
Only facts that matter for reproducing a figure, and nothing that identifies a person.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import re
from pathlib import Path

from mathq import __version__


def _llama_cpp_build() -> dict[str, str]:
    """llama-cpp-python's version and the llama.cpp (ggml) build it was compiled from."""
    try:
        import llama_cpp
    except ImportError:  # pragma: no cover - a dependency of mathq
        return {}
    out = {"llama_cpp_python": str(llama_cpp.__version__)}
    lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.*"))
    for lib_path in candidates:
        try:
            lib = ctypes.CDLL(str(lib_path))
        except OSError:
            continue
        for key, symbol in (("ggml", "ggml_version"), ("llama_cpp_commit", "ggml_commit")):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                value = fn()
                if value:
                    out[key] = value.decode("utf-8", errors="replace")
        break
    try:
        info = llama_cpp.llama_print_system_info().decode()
        out["cpu_features"] = " ".join(re.findall(r"(\w+) = 1\b", info))
    except (AttributeError, UnicodeDecodeError):
        pass
    return out


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measurement_environment(threads: int | None = None) -> dict[str, str]:
    """This process's environment as a flat string dict (JSON-friendly, summary-ready)."""
    env = {"mathq": __version__, **_llama_cpp_build(), "cpu": cpu_name(),
           "cores": str(os.cpu_count() or 0), "os": f"{platform.system()} {platform.release()}",
           "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if threads is not None:
        env["threads"] = str(threads)
    return env
