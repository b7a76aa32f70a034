"""Benchmark: mathq on one GPU, from source to figures, in one command.

Made for an offline machine with one NVIDIA GPU, CUDA's nvcc, cmake and ninja, and Python 3.12
with numpy, torch, tokenizers, click, jinja2, matplotlib and scikit-build-core, but neither
llama-cpp-python nor gguf nor math-verify. Two steps:

    python benchmarks/gpu.py prepare                 # here, online: .gpu/ (see gpu_prepare.py)
    python3 benchmarks/gpu.py run --out $OUT         # there, offline, from the repo root

``run`` goes through these phases, each timed and printed as it ends:

1. the wheels of ``.gpu/wheels`` into ``.gpu-build/site`` (pip, or unpacking without it);
2. llama-cpp-python 0.3.36 built from ``.gpu/``'s trimmed sdist with llama.cpp's CUDA backend
   for one architecture (``-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90``, no mtmd),
   ``--no-build-isolation``, into ``.gpu-build/llama``; the CMake build folder is kept, so
   a build cut short by the budget resumes on the next run;
3. a DeepSeek-shaped checkpoint with random bf16 weights and the real widths (hidden 4096,
   FFN 11008, 32 heads, DeepSeek's 102400-token vocabulary and tokenizer), ``--layers`` of
   its 30 layers; ``mathq convert`` to BF16, ``mathq quantize`` to Q8_0 and Q4_K_M;
4. for each of BF16, Q8_0, Q4_K_M: ``mathq bench`` (pp512, tg128, aggregate generation at
   P = 1, 8, 32, 64, VRAM), ``mathq smoke --parallel auto`` on MATH-500 problems, and a
   sequential loop of llama-cpp-python's ``create_completion``, one problem at a time.

Random weights generate degenerate text, and an answer that stopped at an early EOS would
make the throughput meaningless: both contenders generate exactly ``--max-tokens`` tokens
per problem (``mathq smoke --ignore-eos``; the loop bans end-of-generation tokens with a
logit bias of -inf and has no stop strings), so every problem costs the same work and the
accuracy is meaningless. The loop runs the first ``--loop-n`` of the smoke test's problems;
problems per hour compare the two. Every timing starts after the model is loaded.

``--budget-s`` bounds the whole run: a phase gets at most what is left (less a margin) and
is stopped when it overruns; the phases after it are skipped, and what was measured is
written to ``$OUT/gpu.json`` and ``$OUT/gpu.txt`` after every phase. A rerun (same
options) reuses what ``.gpu-build/`` holds: the build, the model files, and finished
measurements. ``--cpu-dry-run`` skips the build and uses the llama-cpp-python this
interpreter already has (CPU), to exercise everything else off the GPU machine;
``--llama cpu`` builds the trimmed sdist without CUDA through the same machinery.

    python3 benchmarks/gpu.py run --out $OUT --budget-s 500
    python benchmarks/gpu.py run --out /tmp/gpu-out --cpu-dry-run --layers 1 --hidden 256 \\
        --ffn 512 --heads 4 --n 8 --max-tokens 16 --loop-n 4 --bench-parallel 1,2 --bench-reps 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_prepare as prep  # noqa: E402
from benchmarks.gpu_report import render_text  # noqa: E402
from benchmarks.gpu_runner import (  # noqa: E402
    KINDS,
    Budget,
    Config,
    PhaseError,
    Runner,
    run_quiet,
)

RECIPE = "deepseek-math-7b-rl"
PROBLEMS = ROOT / "tests" / "fixtures" / "math500" / "test.jsonl"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


# ---------------------------------------------------------------------------------------
# The phases


def machine(runner: Runner) -> dict[str, Any]:
    info = {"python": sys.version.split()[0], "cpu_count": os.cpu_count(),
            "nvidia_smi": run_quiet(["nvidia-smi", "--query-gpu=name,memory.total,"
                                     "driver_version", "--format=csv,noheader"]),
            "nvcc": run_quiet(["nvcc", "--version"]).splitlines()[-1:],
            "cmake": run_quiet(["cmake", "--version"]).splitlines()[:1],
            "ninja": run_quiet(["ninja", "--version"]),
            "pip": run_quiet([sys.executable, "-m", "pip", "--version"])}
    runner.report["machine"] = info
    return info


def has_pip() -> bool:
    return subprocess.run([sys.executable, "-m", "pip", "--version"],
                          capture_output=True).returncode == 0


def install_wheels(runner: Runner, gpu_dir: Path) -> dict[str, Any]:
    """``.gpu/wheels`` into ``site/``, unless the same wheels are already there."""
    wheels = sorted((gpu_dir / "wheels").glob("*.whl"))
    if not wheels:
        raise PhaseError(f"no wheels in {gpu_dir / 'wheels'}; run `benchmarks/gpu.py prepare`")
    stamp_value = hashlib.sha256("".join(prep.sha256(w) for w in wheels).encode()).hexdigest()
    site = runner.work / "site"
    stamp = site / ".mathq-wheels"
    if stamp.is_file() and stamp.read_text() == stamp_value:
        return {"wheels": [w.name for w in wheels], "how": "already installed"}
    tmp = runner.work / "site.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    how = "pip" if has_pip() else "unpacked"
    if how == "pip":
        # the tags they were fetched for, so that a dry run on another Python takes them too
        tags = ["--only-binary=:all:", "--python-version", prep.PYTHON_VERSION,
                *(a for p in prep.PLATFORMS for a in ("--platform", p))]
        runner.child("wheels", [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                                "--no-index", *tags, "--target", str(tmp), *map(str, wheels)])
    else:
        for w in wheels:
            prep.unpack_wheel(w, tmp)
    (tmp / ".mathq-wheels").write_text(stamp_value)
    shutil.rmtree(site, ignore_errors=True)
    tmp.rename(site)
    return {"wheels": [w.name for w in wheels], "how": how}


def cmake_args(config: Config) -> str:
    base = "-DLLAVA_BUILD=OFF"  # mathq never loads mtmd; llama_cpp imports it lazily
    if config.llama == "cuda":
        return f"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES={config.arch} {base}"
    return base


def build_llama(runner: Runner, gpu_dir: Path) -> dict[str, Any]:
    """llama-cpp-python from the trimmed sdist into ``llama/``; CMake's folder is kept."""
    config = runner.config
    sdist = gpu_dir / f"{prep.SDIST}.tar.gz"
    if not sdist.is_file():
        raise PhaseError(f"{sdist} is missing; run `benchmarks/gpu.py prepare`")
    args = cmake_args(config)
    key = f"{prep.sha256(sdist)} {args} {sys.version_info[:2]}"
    target = runner.work / "llama"
    stamp = target / ".mathq-build"
    try:
        done = json.loads(stamp.read_text())
    except (OSError, ValueError):
        done = {}
    if done.get("key") == key:
        return {**done["record"], "reused": True}
    src_root, cmake_dir = runner.work / "src", runner.work / "cmake"
    if not (src_root / ".mathq-src").is_file() or \
            (src_root / ".mathq-src").read_text() != key:
        shutil.rmtree(src_root, ignore_errors=True)
        shutil.rmtree(cmake_dir, ignore_errors=True)  # its cache names the old sources
        with tarfile.open(sdist) as tar:
            tar.extractall(src_root, filter="data")
        (src_root / ".mathq-src").write_text(key)
    env = dict(runner.env(), CMAKE_ARGS=args, CMAKE_BUILD_PARALLEL_LEVEL=str(config.jobs),
               CFLAGS=NO_AMX, CXXFLAGS=NO_AMX)
    tmp = runner.work / "llama.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    src = src_root / prep.SDIST
    if has_pip():
        argv = [sys.executable, "-m", "pip", "install", "-v", "--no-deps",
                "--no-build-isolation", "--no-index", "--no-cache-dir", "--target", str(tmp),
                "--config-settings", f"build-dir={cmake_dir}", str(src)]
        try:
            runner.child("build", argv, env=env, capture=False)
        finally:
            keep_log_tail(runner)
    else:  # scikit-build-core's PEP 517 hook directly, then unpack the wheel
        dist = runner.work / "dist"
        shutil.rmtree(dist, ignore_errors=True)
        dist.mkdir()
        hook = ("import sys; from scikit_build_core.build import build_wheel; "
                "print(build_wheel(sys.argv[1], {'build-dir': sys.argv[2]}))")
        try:
            runner.child("build", [sys.executable, "-c", hook, str(dist), str(cmake_dir)],
                         env=env, cwd=src, capture=False)
        finally:
            keep_log_tail(runner)
        for wheel in dist.glob("*.whl"):
            prep.unpack_wheel(wheel, tmp)
    record = {"cmake_args": args, "how": "pip" if has_pip() else "PEP 517 hook",
              "seconds": round(time.monotonic() - started, 1), "jobs": config.jobs}
    (tmp / ".mathq-build").write_text(json.dumps({"key": key, "record": record}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return record


def keep_log_tail(runner: Runner, limit: int = 1 << 20) -> None:
    """The build log's last MiB into $OUT/build.log (CMake's and the compilers' output)."""
    log = runner.work / "logs" / "build.log"
    if log.is_file():
        data = log.read_bytes()
        (runner.out / "build.log").write_bytes(data[-limit:])


CHECK = """
import json, llama_cpp, gguf, math_verify
from mathq.llama.devices import describe_devices, gpu_devices, gpu_offload_supported
gpus = gpu_devices()
print(json.dumps({"llama_cpp": llama_cpp.__version__, "file": llama_cpp.__file__,
                  "gpu_offload": gpu_offload_supported(), "device": describe_devices(gpus),
                  "vram_total": sum(d.total_bytes or 0 for d in gpus)}))
"""


def check_import(runner: Runner) -> dict[str, Any]:
    info = json.loads(runner.child("import", [sys.executable, "-c", CHECK]).splitlines()[-1])
    if runner.config.llama == "cuda" and not info["gpu_offload"]:
        raise PhaseError(f"{info['file']} reports no GPU offload: the CUDA build found no "
                         "GPU (check nvidia-smi and the driver)")
    runner.report["llama"] = info
    return info


def layout_dir(runner: Runner) -> Path:
    return runner.work / "models" / runner.config.model_key()


def gguf_path(runner: Runner, kind: str) -> Path:
    return layout_dir(runner) / RECIPE / f"{RECIPE}-{kind}.gguf"


def make_checkpoint(runner: Runner) -> dict[str, Any]:
    c = runner.config
    hf = layout_dir(runner) / "hf"
    code = ("import sys; from tests.tinymodel import TinySpec, build_checkpoint; "
            f"build_checkpoint(sys.argv[1], TinySpec(n_layer={c.layers}, n_embd={c.hidden}, "
            f"n_ff={c.ffn}, n_head={c.heads}, n_head_kv={c.heads}, shards=2), "
            "fast_random=True)")
    shutil.rmtree(hf, ignore_errors=True)
    runner.child("checkpoint", [sys.executable, "-c", code, str(hf)])
    return {"dir": str(hf), "bytes": prep.folder_bytes(hf)}


def parameters(c: Config) -> int:
    """Weights of the model: attention and FFN matrices per layer, embeddings, output head
    (the norms' few thousand left out)."""
    return c.layers * (4 * c.hidden * c.hidden + 3 * c.hidden * c.ffn) + 2 * 102400 * c.hidden


def convert(runner: Runner) -> dict[str, Any]:
    out = gguf_path(runner, "BF16")
    out.parent.mkdir(parents=True, exist_ok=True)
    runner.mathq("convert", "convert", str(layout_dir(runner) / "hf"), "--out", str(out))
    shutil.rmtree(layout_dir(runner) / "hf")  # the GGUF holds it all; keep the disk free
    return {"file": out.name, "bytes": out.stat().st_size}


def quantize(runner: Runner, kind: str) -> dict[str, Any]:
    runner.mathq(f"quantize {kind}", "quantize", RECIPE, "-Q", kind, "--build-dir",
                 str(layout_dir(runner)))
    out = gguf_path(runner, kind)
    return {"file": out.name, "bytes": out.stat().st_size}


def bench(runner: Runner, kind: str) -> dict[str, Any]:
    c = runner.config
    runner.mathq(f"bench {kind}", "bench", RECIPE, "-Q", kind, "--parallel", c.bench_parallel,
                 "-r", str(c.bench_reps), "-q", "--build-dir", str(layout_dir(runner)))
    path = layout_dir(runner) / RECIPE / "bench" / f"{kind}.json"
    return json.loads(path.read_text())


def smoke(runner: Runner, kind: str) -> dict[str, Any]:
    c = runner.config
    runner.mathq(f"smoke {kind}", "smoke", RECIPE, "-Q", kind, "--suite", str(PROBLEMS),
                 "--n", str(c.n), "--max-tokens", str(c.max_tokens), "--parallel", "auto",
                 "--ignore-eos", "--restart", "-q", "--build-dir", str(layout_dir(runner)))
    path = layout_dir(runner) / RECIPE / "smoke" / f"{kind}.summary.json"
    s = json.loads(path.read_text())
    return {k: s[k] for k in ("parallel", "parallel_choice", "completion_tokens",
                              "prompt_tokens", "wall_seconds", "generation_tokens_per_second",
                              "max_tokens")} | {"problems": s["accuracy"]["n"]}


def loop(runner: Runner, kind: str) -> dict[str, Any]:
    c = runner.config
    out = runner.child(f"loop {kind}", [
        sys.executable, str(Path(__file__).resolve()), "_loop", str(gguf_path(runner, kind)),
        "--n", str(c.n), "--first", str(c.loop_n), "--max-tokens", str(c.max_tokens)])
    return json.loads(out.splitlines()[-1])


def run_all(args: argparse.Namespace) -> int:
    config = Config(layers=args.layers, hidden=args.hidden, ffn=args.ffn, heads=args.heads,
                    kinds=tuple(args.kinds.split(",")), n=args.n, max_tokens=args.max_tokens,
                    loop_n=min(args.loop_n, args.n), bench_parallel=args.bench_parallel,
                    bench_reps=args.bench_reps, arch=args.arch, jobs=args.jobs,
                    llama="installed" if args.cpu_dry_run else args.llama)
    runner = Runner(config, Path(args.out), Path(args.work), Budget(args.budget_s))
    gpu_dir = Path(args.gpu_dir)
    print(f"mathq GPU benchmark: {config}; budget {args.budget_s:.0f}s", flush=True)
    runner.phase("machine", machine, runner, min_s=0)
    runner.phase("wheels", install_wheels, runner, gpu_dir)
    if config.llama != "installed":
        build = runner.phase("build", build_llama, runner, gpu_dir, min_s=30)
        if build is not None:
            runner.report["build"] = build
    runner.phase("import", check_import, runner)
    model = runner.report.setdefault("model", {"parameters": parameters(config)})
    have_bf16 = gguf_path(runner, "BF16").is_file()
    key = config.model_key()
    if not have_bf16:
        runner.state.get("done", {}).pop(f"convert {key}", None)
        model["checkpoint"] = runner.phase("checkpoint", make_checkpoint, runner)
    model["BF16"] = runner.phase("convert", convert, runner, cache_key=f"convert {key}")
    for kind in config.kinds:
        if kind != "BF16":
            if not gguf_path(runner, kind).is_file():
                runner.state.get("done", {}).pop(f"quantize {kind} {key}", None)
            model[kind] = runner.phase(f"quantize {kind}", quantize, runner, kind,
                                       cache_key=f"quantize {kind} {key}")
        results = runner.report["results"].setdefault(kind, {})
        for what, fn in (("bench", bench), ("smoke", smoke), ("loop", loop)):
            results[what] = runner.phase(f"{what} {kind}", fn, runner, kind,
                                         cache_key=config.measure_key(kind, what))
    runner.save()
    print("\n" + render_text(runner.report), flush=True)
    # running out of budget is not a failure: what was measured is written, a rerun goes on
    failed = [p for p in runner.report["phases"] if p.get("status") == "failed"]
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------
# The sequential loop, in its own process (see `loop`)


def loop_main(args: argparse.Namespace) -> None:
    """``create_completion`` over the first ``--first`` of the smoke test's problems."""
    import llama_cpp
    from llama_cpp import Llama

    from mathq.convert.gguf_info import read_gguf_header
    from mathq.datasets.problems import load_problem_set, select_problems
    from mathq.llama.devices import (
        default_threads,
        gpu_offload_supported,
        offloaded_layers,
        resolve_gpu_layers,
    )
    from mathq.recipes.prompt import render_prompt
    from mathq.recipes.recipe import load_recipe

    spec = load_recipe(RECIPE).prompt
    problems = select_problems(load_problem_set(PROBLEMS), n=args.n, seed=0).problems
    problems = problems[:args.first]
    ngl = resolve_gpu_layers(None)
    n_layer = int(str(read_gguf_header(Path(args.gguf)).values["llama.block_count"]))
    # mathq's own default for where the layers are: what its engine uses too
    threads = default_threads(0, offloaded_layers(ngl, n_layer, gpu_offload_supported()),
                              n_layer)
    llm = Llama(args.gguf, n_gpu_layers=ngl, n_ctx=2048, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ban = {t: float("-inf") for t in range(llm.n_vocab())
           if llama_cpp.llama_vocab_is_eog(vocab, t)}
    tokens = prompt_tokens = 0
    started = time.perf_counter()
    for p in problems:
        out = llm.create_completion(render_prompt(spec, p.problem), max_tokens=args.max_tokens,
                                    temperature=0.0, stop=[], logit_bias=ban)
        tokens += out["usage"]["completion_tokens"]
        prompt_tokens += out["usage"]["prompt_tokens"]
    seconds = time.perf_counter() - started
    llm.close()
    print(json.dumps({"problems": len(problems), "seconds": round(seconds, 3),
                      "completion_tokens": tokens, "prompt_tokens": prompt_tokens,
                      "threads": threads, "gpu_layers": ngl,
                      "generation_tokens_per_second": round(tokens / seconds, 3)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fetch and trim what `run` needs into .gpu/ (online)")
    p.add_argument("--out", default=str(ROOT / ".gpu"))
    p.add_argument("--sdist", help="use this llama-cpp-python 0.3.36 sdist, not PyPI's")
    p.add_argument("--check", action="store_true",
                   help="run CMake's configure step on the trimmed sdist (CPU) afterwards")
    r = sub.add_parser("run", help="build, convert, quantize and measure (on the GPU machine)")
    r.add_argument("--out", required=True, help="folder for gpu.json and gpu.txt ($OUT)")
    r.add_argument("--work", default=str(ROOT / ".gpu-build"),
                   help="build outputs, models and logs, kept for a rerun")
    r.add_argument("--gpu-dir", default=str(ROOT / ".gpu"), help="what `prepare` made")
    r.add_argument("--budget-s", type=float, default=500.0,
                   help="seconds for the whole run; later phases are skipped cleanly")
    r.add_argument("--layers", type=int, default=8, help="of DeepSeek-Math's 30")
    r.add_argument("--hidden", type=int, default=4096)
    r.add_argument("--ffn", type=int, default=11008)
    r.add_argument("--heads", type=int, default=32)
    r.add_argument("--kinds", default=",".join(KINDS))
    r.add_argument("--n", type=int, default=128, help="MATH-500 problems in the smoke test")
    r.add_argument("--max-tokens", type=int, default=128, help="tokens per answer, exactly")
    r.add_argument("--loop-n", type=int, default=16,
                   help="problems the sequential create_completion loop answers")
    r.add_argument("--bench-parallel", default="1,8,32,64")
    r.add_argument("--bench-reps", type=int, default=5)
    r.add_argument("--arch", default="90", help="CMAKE_CUDA_ARCHITECTURES (90: H100/H200)")
    r.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="CMAKE_BUILD_PARALLEL_LEVEL")
    r.add_argument("--llama", choices=("cuda", "cpu"), default="cuda",
                   help="build llama-cpp-python with CUDA, or for the CPU (to test the build "
                        "machinery off the GPU machine)")
    r.add_argument("--cpu-dry-run", action="store_true",
                   help="no build: use this interpreter's llama-cpp-python (CPU)")
    lp = sub.add_parser("_loop", help=argparse.SUPPRESS)
    lp.add_argument("gguf")
    lp.add_argument("--n", type=int, required=True)
    lp.add_argument("--first", type=int, required=True)
    lp.add_argument("--max-tokens", type=int, required=True)
    args = ap.parse_args()
    if args.command == "prepare":
        out = Path(args.out)
        manifest = prep.prepare(out, Path(args.sdist) if args.sdist else None)
        print(prep.describe(manifest, out))
        if args.check:
            result = prep.check_configure(out / f"{prep.SDIST}.tar.gz")
            print("CMake configure of the trimmed sdist:",
                  "ok" if result.returncode == 0 else result.stderr[-2000:])
            return result.returncode
        return 0
    if args.command == "_loop":
        loop_main(args)
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
