"""Benchmark: mathq convert vs llama.cpp's convert_hf_to_gguf.py vs cp, on one checkpoint.

A DeepSeek-shaped checkpoint with the real widths (hidden 4096, FFN 11008, 32 heads) and
the real vocabulary (102400 rows, DeepSeek's tokenizer from the test fixture), but only a
few layers, is generated into a scratch folder. Then, in one run, with the input warm in
the page cache before each:

- ``cp -r`` copies the checkpoint folder (the floor: the same bytes moved once);
- ``mathq convert HF_DIR`` (verification on, the default; and once with --no-verify);
- upstream ``convert_hf_to_gguf.py HF_DIR --outtype bf16`` from the llama-cpp-python
  0.3.36 sdist, in its own venv with CPU torch (set up here on first use).

Each is timed (wall clock) and its peak RSS taken from the kernel (wait4). Then the two
GGUFs are compared: every tensor's name, type, shape and bytes, and every metadata key
and value. Targets: mathq >= 2x faster than upstream, <= 1.3x cp, peak RSS <= half of
upstream's, identical tensors.

    python benchmarks/convert.py                # 2 layers, ~2.4 GB, scratch in .bench/
    python benchmarks/convert.py --layers 4 --keep

Not run by CI. Needs ~4x the checkpoint size free on disk and network access to PyPI the
first time (torch CPU, transformers, the sdist).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.tinymodel import TinySpec, build_checkpoint  # noqa: E402

from benchmarks.peers import llama_cpp_source  # noqa: E402

UPSTREAM_REQUIREMENTS = (
    "torch==2.13.0",
    "transformers==4.57.6",
    "numpy>=2",
    "sentencepiece",
    "safetensors",
    "protobuf>=4.21,<5",
)


@dataclass
class Run:
    name: str
    seconds: float
    peak_rss_mib: float
    returncode: int


# Runs one command and prints its peak RSS. A separate, small interpreter forks it: a child's
# ru_maxrss also counts what it inherited before exec, so forking from this (large) process
# would inflate every figure.
_MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(name: str, argv: list[str], log: Path) -> Run:
    """Run ``argv`` to completion; wall time and its peak RSS (kernel's ru_maxrss)."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-S", "-c", _MEASURE, *argv],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
        seconds = time.perf_counter() - start
        out.write(proc.stderr)
    if proc.returncode:
        sys.exit(f"{name} failed with exit code {proc.returncode}; see {log}")
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    return Run(name, seconds, peak_kib / 1024, proc.returncode)


def warm(paths: list[Path]) -> None:
    """Read inputs once and flush dirty pages, so every contender starts the same way."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    os.sync()


def upstream_python(venv: Path, src: Path) -> Path:
    """A venv with CPU torch, transformers and the sdist's gguf-py (made once)."""
    python = venv / "bin" / "python"
    stamp = venv / ".mathq-bench-ready"
    if stamp.is_file():
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            *UPSTREAM_REQUIREMENTS,
            str(src / "gguf-py"),
        ],
        check=True,
    )
    stamp.touch()
    return python


def tensor_digests(path: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    from gguf import GGUFReader as read_gguf

    reader = read_gguf(path)
    out = {}
    for t in reader.tensors:
        digest = hashlib.sha256(memoryview(t.data).cast("B")).hexdigest()
        out[t.name] = (t.tensor_type.name, tuple(int(d) for d in t.shape), digest)
    return out


def metadata(path: Path) -> dict[str, object]:
    from gguf import GGUFReader as read_gguf

    reader = read_gguf(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        is_array = field.types[0].name == "ARRAY"
        value = (
            [field.contents(i) for i in range(len(field.data))] if is_array else field.contents()
        )
        out[key] = (tuple(t.name for t in field.types), value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    ap.add_argument(
        "--bench-dir",
        type=Path,
        default=ROOT / ".bench" / "convert",
        help="scratch folder (default .bench/convert, git-ignored)",
    )
    ap.add_argument(
        "--upstream-venv",
        type=Path,
        default=ROOT / ".bench" / "upstream-venv",
        help="venv for convert_hf_to_gguf.py (made on first use)",
    )
    ap.add_argument(
        "--mathq",
        type=Path,
        default=ROOT / ".venv" / "bin" / "mathq",
        help="the mathq executable (default .venv/bin/mathq; `make install`)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the fastest counts (3)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and GGUFs")
    args = ap.parse_args()

    bench = args.bench_dir.resolve()
    bench.mkdir(parents=True, exist_ok=True)
    src = llama_cpp_source()
    python = upstream_python(args.upstream_venv.resolve(), src)

    spec = TinySpec(n_layer=args.layers, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32, shards=2)
    hf = bench / "deepseek-math-bench"
    if not (hf / "config.json").is_file():
        print(f"writing a {args.layers}-layer DeepSeek-shaped checkpoint to {hf} ...")
        build_checkpoint(hf, spec, fast_random=True)
    # The checkpoint's tokenizer_config.json (the test fixture's) says "unk_token": null, as
    # DeepSeek's own does; without it upstream and mathq both add "<unk>" as token 100015
    # (transformers' LlamaTokenizerFast default; tests/test_convert.py checks both cases).
    shards = sorted(hf.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in hf.iterdir())
    print(f"checkpoint: {size / 2**30:.2f} GiB in {len(shards)} shards")

    ours, theirs, copied = bench / "mathq-BF16.gguf", bench / "upstream-BF16.gguf", bench / "cp"
    for p in (ours, theirs):
        p.unlink(missing_ok=True)
    shutil.rmtree(copied, ignore_errors=True)
    contenders = {
        "cp": ["cp", "-r", str(hf), str(copied)],
        "mathq_noverify": [
            str(args.mathq),
            "convert",
            str(hf),
            "--out",
            str(ours),
            "--quiet",
            "--no-verify",
        ],
        "mathq": [str(args.mathq), "convert", str(hf), "--out", str(ours), "--quiet"],
        "upstream": [
            str(python),
            str(src / "convert_hf_to_gguf.py"),
            str(hf),
            "--outtype",
            "bf16",
            "--outfile",
            str(theirs),
        ],
    }
    # This box is shared: run every contender --repeat times, interleaved, keep the fastest
    # (and its RSS; peak RSS hardly varies between runs).
    runs: dict[str, Run] = {}
    for i in range(args.repeat):
        for name, argv in contenders.items():
            warm(shards)
            run = measure(name, argv, bench / f"{name}.log")
            print(f"  round {i + 1}: {name:<15} {run.seconds:7.2f} s {run.peak_rss_mib:7.0f} MiB")
            if name not in runs or run.seconds < runs[name].seconds:
                runs[name] = run
            shutil.rmtree(copied, ignore_errors=True)
            if name == "mathq_noverify" or (name == "mathq" and i < args.repeat - 1):
                ours.unlink()
            if name == "upstream" and i < args.repeat - 1:
                theirs.unlink()

    a, b = tensor_digests(ours), tensor_digests(theirs)
    tensors_identical = a == b
    tensor_diffs = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    ma, mb = metadata(ours), metadata(theirs)
    meta_equal = ma == mb
    meta_diffs = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))

    cp, mq, up = runs["cp"], runs["mathq"], runs["upstream"]
    nv = runs["mathq_noverify"]
    ratios = {
        "speedup_vs_upstream": up.seconds / mq.seconds,
        "time_vs_cp": mq.seconds / cp.seconds,
        "rss_vs_upstream": mq.peak_rss_mib / up.peak_rss_mib,
        "noverify_time_vs_cp": nv.seconds / cp.seconds,
    }
    targets = {
        "speedup_vs_upstream >= 2": ratios["speedup_vs_upstream"] >= 2,
        "time_vs_cp <= 1.3": ratios["time_vs_cp"] <= 1.3,
        "rss_vs_upstream <= 0.5": ratios["rss_vs_upstream"] <= 0.5,
        "tensors identical": tensors_identical,
    }
    print(f"\n{'':<20}{'wall s':>10}{'peak RSS MiB':>15}")
    for r in runs.values():
        print(f"{r.name:<20}{r.seconds:>10.2f}{r.peak_rss_mib:>15.0f}")
    print(
        f"\nmathq vs upstream: {ratios['speedup_vs_upstream']:.2f}x faster, "
        f"{ratios['rss_vs_upstream']:.3f}x the peak RSS"
    )
    print(
        f"mathq vs cp: {ratios['time_vs_cp']:.2f}x the time "
        f"({ratios['noverify_time_vs_cp']:.2f}x with --no-verify)"
    )
    print(
        f"tensors byte-identical: {tensors_identical} ({len(a)} vs {len(b)} tensors"
        + (f"; differ: {tensor_diffs[:5]}" if tensor_diffs else "")
        + ")"
    )
    print(
        f"metadata equal: {meta_equal} ({len(ma)} vs {len(mb)} keys"
        + (f"; differ: {meta_diffs}" if meta_diffs else "")
        + ")"
    )
    for k in meta_diffs:
        print(f"  {k}: mathq={str(ma.get(k))[:120]} upstream={str(mb.get(k))[:120]}")
    for name, ok in targets.items():
        print(f"target {name}: {'met' if ok else 'MISSED'}")
    result = {
        "checkpoint_bytes": size,
        "layers": args.layers,
        "runs": {k: asdict(v) for k, v in runs.items()},
        "ratios": ratios,
        "tensors_identical": tensors_identical,
        "tensor_diffs": tensor_diffs,
        "metadata_equal": meta_equal,
        "metadata_diffs": meta_diffs,
        "targets": targets,
    }
    (bench / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {bench / 'results.json'}")
    if not args.keep:
        shutil.rmtree(hf)
        for p in (ours, theirs):
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
