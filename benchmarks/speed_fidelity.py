"""Benchmark: does ``mathq bench`` measure what llama.cpp's own tools measure?

On the same GGUF, same threads, in one run: mathq's bench stage (in its own process, as
``mathq bench`` runs it) against ``llama-bench`` (pp512 and tg128, the same repetitions)
and, for aggregate generation throughput, against ``llama-batched-bench`` (128-token
prompts, 128 generated tokens per sequence, P = 1 and 8). Both tools are built from the
llama-cpp-python 0.3.36 sdist with the wheel's flags (``benchsetup.py``). Target: every
mathq figure within 10 % of the tool's.

    python benchmarks/speed_fidelity.py                  # BF16 and Q4_K_M, 3 repetitions
    python benchmarks/speed_fidelity.py --kinds Q4_K_M -r 5

Not run by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from benchsetup import BENCH_DIR, batched_bench, load_note, model_path, tool


def llama_bench(gguf: Path, threads: int, reps: int, n_prompt: int,
                n_gen: int) -> dict[str, tuple[float, float]]:
    """llama-bench's (mean, sd) tokens/s for pp and tg."""
    argv = [str(tool("llama-bench")), "-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen),
            "-r", str(reps), "-t", str(threads), "-o", "json"]
    rows = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
    out = {}
    for r in rows:
        key = "pp" if r["n_prompt"] > 0 else "tg"
        out[key] = (float(r["avg_ts"]), float(r["stddev_ts"]))
    return out


def main() -> None:
    from mathq.evaluate.bench import BenchOptions, bench_isolated

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="BF16,Q4_K_M")
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--parallel", default="1,8")
    args = ap.parse_args()
    npl = tuple(int(p) for p in args.parallel.split(","))
    report: dict[str, object] = {"threads": args.threads, "repetitions": args.repetitions}
    print(f"{args.threads} threads, {args.repetitions} repetitions; {load_note()}")
    for kind in args.kinds.split(","):
        gguf = model_path(kind)
        tool("llama-bench")
        ours = bench_isolated(gguf, BenchOptions(repetitions=args.repetitions, parallel=npl,
                                                 threads=args.threads))
        theirs = llama_bench(gguf, args.threads, args.repetitions, 512, 128)
        batched = {p: r["speed_tg"]
                   for p, r in batched_bench(gguf, args.threads, npl, 128, 128).items()}
        print(f"\n{kind}: {gguf.name}; {load_note()}")
        print(f"  {'figure':<22} {'mathq bench':>18} {'llama.cpp tool':>18} {'ratio':>6}")
        rows = []
        assert ours.prompt and ours.generation
        for name, mine, ref in (("pp512 t/s", ours.prompt, theirs["pp"]),
                                ("tg128 t/s", ours.generation, theirs["tg"])):
            ratio = mine.mean / ref[0]
            rows.append((name, ratio))
            print(f"  {name:<22} {mine.mean:9.2f} +- {mine.sd:5.2f} {ref[0]:9.2f} +- "
                  f"{ref[1]:5.2f} {ratio:6.3f}")
        for p in npl:
            mine_p = ours.throughput_by_parallel[str(p)]
            ratio = mine_p / batched[p]
            rows.append((f"S_TG P={p}", ratio))
            print(f"  {'aggregate tg P=' + str(p):<22} {mine_p:18.2f} {batched[p]:18.2f} "
                  f"{ratio:6.3f}")
        worst = max(abs(r - 1) for _, r in rows)
        print(f"  largest difference {100 * worst:.1f}% (target <= 10%); peak RSS "
              f"{ours.peak_rss_bytes / 2**30:.2f} GiB, load {ours.load_seconds:.2f}s")
        report[kind] = {"ratios": dict(rows), "largest_difference": worst,
                        "mathq": {"pp": [ours.prompt.mean, ours.prompt.sd],
                                  "tg": [ours.generation.mean, ours.generation.sd],
                                  "throughput": ours.throughput_by_parallel,
                                  "peak_rss_bytes": ours.peak_rss_bytes,
                                  "load_seconds": ours.load_seconds},
                        "llama_bench": theirs, "batched_bench": batched,
                        "load": load_note()}
    out = BENCH_DIR / "speed_fidelity.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nfigures in {out}")


if __name__ == "__main__":
    main()
