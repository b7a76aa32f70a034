"""What `benchmarks/gpu.py run` needs on an offline GPU machine, fetched here: ``.gpu/``.

- ``llama_cpp_python-0.3.36.tar.gz``: the pinned sdist with ``vendor/llama.cpp`` trimmed to
  what building the Python package reads (:func:`keep`): llama.cpp's library sources
  (``src``, ``include``, ``common``, ``cmake``, ``vendor``), ggml with only its CPU and CUDA
  backends, and ``tools/mtmd`` without its test media (the package's CMakeLists builds it
  by default). Gone: the git history the sdist carries (38 MB of packs), docs, media, the
  models' vocabulary files, tests, examples, every
  other tool, the other backends (Vulkan, SYCL, Metal, OpenCL, CANN, MUSA, HIP, ...), CI
  files and scripts. It stays a valid sdist: ``pip install`` builds it, for the CPU or with
  ``CMAKE_ARGS=-DGGML_CUDA=on``.
- ``wheels/``: the pure-Python (and manylinux) wheels of what mathq imports at run time and
  such a machine lacks (:data:`WHEELS`), for CPython 3.12 on x86-64 Linux.
- ``manifest.json``: the original sdist's SHA-256, what was dropped, and every file's size.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from fnmatch import fnmatch
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"

#: Paths under the sdist's top folder that building the package never reads.
DROP = (
    ".git", "vendor/llama.cpp/.git",  # the sdist carries both repositories' history
    "docs", "examples", "tests", "docker", "scripts", ".github", "CHANGELOG.md",
    "vendor/llama.cpp/.github", "vendor/llama.cpp/.devops", "vendor/llama.cpp/app",
    "vendor/llama.cpp/benches", "vendor/llama.cpp/ci", "vendor/llama.cpp/conversion",
    "vendor/llama.cpp/docs", "vendor/llama.cpp/examples", "vendor/llama.cpp/gguf-py",
    "vendor/llama.cpp/grammars", "vendor/llama.cpp/media", "vendor/llama.cpp/models",
    "vendor/llama.cpp/pocs", "vendor/llama.cpp/requirements", "vendor/llama.cpp/scripts",
    "vendor/llama.cpp/skills", "vendor/llama.cpp/tests",
    "vendor/llama.cpp/tools/mtmd/tests",
)
#: Glob patterns of single files nobody builds from: converters, test media, Nix files.
DROP_FILES = (
    "vendor/llama.cpp/*.py", "vendor/llama.cpp/*.nix", "vendor/llama.cpp/*.sh",
    "vendor/llama.cpp/tools/mtmd/test-*",
)
#: The one tool the package builds (its CMakeLists adds tools/mtmd when LLAVA_BUILD is on).
KEEP_TOOLS = ("mtmd",)
#: ggml backends kept: the CPU one (always built) and CUDA.
KEEP_BACKENDS = ("ggml-cpu", "ggml-cuda")

#: Wheels for what mathq imports at run time and the GPU machine lacks (it has numpy,
#: torch with sympy, safetensors, tokenizers, huggingface_hub, click, filelock, tqdm,
#: jinja2, matplotlib, scikit-build-core): gguf (convert) with PyYAML; math-verify and its
#: LaTeX parser with the ANTLR runtime (grading); diskcache, which llama_cpp imports.
WHEELS = (
    "gguf==0.19.0", "PyYAML==6.0.4", "math-verify==0.9.0", "latex2sympy2_extended==1.11.0",
    "antlr4-python3-runtime==4.13.2", "diskcache==5.6.3",
)
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "any")


def keep(path: str) -> bool:
    """Whether ``path`` (relative to the sdist's top folder) stays in the trimmed sdist."""
    path = path.strip("/")
    if any(path == d or path.startswith(d + "/") for d in DROP):
        return False
    if any(fnmatch(path, pattern) for pattern in DROP_FILES):
        return False
    parts = path.split("/")
    if parts[:3] == ["vendor", "llama.cpp", "tools"] and len(parts) > 3:
        return parts[3] in KEEP_TOOLS
    if parts[:4] == ["vendor", "llama.cpp", "ggml", "src"] and len(parts) > 5:
        # a backend's folder (ggml/src/ggml-vulkan/...); files directly in src/ stay
        return not parts[4].startswith("ggml-") or parts[4] in KEEP_BACKENDS
    return True


def trim_sdist(src: Path, dest: Path) -> dict[str, object]:
    """Write ``dest``, the sdist ``src`` without what :func:`keep` drops; return counts."""
    kept = dropped = kept_bytes = dropped_bytes = 0
    tmp = dest.with_name(dest.name + ".partial")
    with tarfile.open(src, "r:gz") as tin, tarfile.open(tmp, "w:gz", compresslevel=9) as tout:
        for member in tin:
            top, _, rel = member.name.partition("/")
            if top != SDIST:
                raise ValueError(f"{src}: unexpected member {member.name}")
            if rel and not keep(rel):
                dropped += member.isfile()
                dropped_bytes += member.size if member.isfile() else 0
                continue
            data = tin.extractfile(member) if member.isfile() else None
            tout.addfile(member, data)
            kept += member.isfile()
            kept_bytes += member.size if member.isfile() else 0
    tmp.rename(dest)
    return {"files_kept": kept, "files_dropped": dropped, "bytes_kept": kept_bytes,
            "bytes_dropped": dropped_bytes}


def download_sdist(into: Path) -> Path:
    """The pinned sdist from PyPI (pip's own download, hashes checked by pip)."""
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
                    "-d", str(into)], check=True)
    return into / f"{SDIST}.tar.gz"


def download_wheels(into: Path) -> list[Path]:
    """:data:`WHEELS` for CPython 3.12 on x86-64 Linux, binary only, no dependencies."""
    into.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--python-version", PYTHON_VERSION, *platforms,
                    "-d", str(into), *WHEELS], check=True)
    return sorted(into.glob("*.whl"))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(out: Path, sdist: Path | None = None) -> dict[str, object]:
    """Fill ``out`` (``.gpu/``) with the trimmed sdist, the wheels and the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        original = sdist or download_sdist(Path(tmp))
        trimmed = out / f"{SDIST}.tar.gz"
        counts = trim_sdist(original, trimmed)
        wheels_dir = out / "wheels"
        if wheels_dir.exists():
            shutil.rmtree(wheels_dir)
        wheels = download_wheels(wheels_dir)
        manifest = {
            "sdist": {"file": trimmed.name, "original_sha256": sha256(original),
                      "original_bytes": original.stat().st_size,
                      "bytes": trimmed.stat().st_size, "sha256": sha256(trimmed), **counts,
                      "dropped": list(DROP), "dropped_files": list(DROP_FILES),
                      "kept_tools": list(KEEP_TOOLS), "kept_backends": list(KEEP_BACKENDS)},
            "wheels": {w.name: {"bytes": w.stat().st_size, "sha256": sha256(w)}
                       for w in wheels},
            "python_version": PYTHON_VERSION, "platforms": list(PLATFORMS),
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_configure(sdist: Path, cuda: bool = False) -> subprocess.CompletedProcess[str]:
    """Unpack the trimmed sdist and run CMake's configure step on it (no compiling): a
    missing source or CMake file shows up as an error here. Returns CMake's result."""
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = Path(tmp) / SDIST
        args = ["cmake", "-S", str(src), "-B", str(Path(tmp) / "build"), "-G", "Ninja",
                "-DCMAKE_BUILD_TYPE=Release", "-DLLAVA_BUILD=ON"]
        if cuda:
            args += ["-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=90"]
        return subprocess.run(args, capture_output=True, text=True)


def describe(manifest: dict[str, object], out: Path) -> str:
    sd = manifest["sdist"]
    assert isinstance(sd, dict)
    mib = 1 << 20
    lines = [f"{out}/{sd['file']}: {sd['bytes'] / mib:.1f} MiB (from "
             f"{sd['original_bytes'] / mib:.1f} MiB; {sd['files_kept']} files kept, "
             f"{sd['files_dropped']} dropped, {sd['bytes_kept'] / mib:.1f} MiB unpacked)"]
    wheels = manifest["wheels"]
    assert isinstance(wheels, dict)
    for name, w in wheels.items():
        lines.append(f"{out}/wheels/{name}: {w['bytes'] / mib:.2f} MiB")
    lines.append(f"{out}: {folder_bytes(out) / mib:.1f} MiB in all")
    return "\n".join(lines)


def unpack_wheel(wheel: Path, target: Path) -> None:
    """Install a pure-Python or manylinux wheel by unpacking it (what pip does for them,
    less scripts): the fallback where pip is missing."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            if ".data/" in name.split("/", 1)[0] + "/":
                # <pkg>.data/purelib/... and platlib/... go to the target's root
                parts = name.split("/")
                if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                    name = "/".join(parts[2:])
                else:
                    continue
            out = target / name
            if info.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                out.chmod(mode)


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def read_member(path: Path, name: str) -> bytes:
    with tarfile.open(path) as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read()
