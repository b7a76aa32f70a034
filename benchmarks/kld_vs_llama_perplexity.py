"""mathq kld against llama.cpp's own ``llama-perplexity --kl-divergence``, on tiny models.

For two random tiny LLaMAs with DeepSeek's 102400-token vocabulary (one with nearly flat
next-token distributions, one with peaked ones, closer to a trained model) and their Q8_0,
Q4_K_M and Q2_K variants, this script measures every variant against BF16 on mathq's
bundled corpus three ways:

1. ``mathq kld`` (llama.cpp in process through llama-cpp-python, numpy statistics);
2. ``llama-perplexity --kl-divergence-base`` then ``--kl-divergence`` (llama.cpp's tool);
3. ``llama-perplexity --kl-divergence`` reading the reference file mathq cached (same format).

It prints each statistic side by side with the relative difference, checks that both tools
tokenized the corpus identically and how far their reference files differ, prints the
wall-time and peak-memory ratios (each tool runs as its own process), and exits 1 if any
statistic differs by more than 2 %. Build llama-perplexity from the llama-cpp-python sdist with
the same flags as the wheel (see README), e.g.::

    cmake -S $SDIST/vendor/llama.cpp -B /work/wt/llama-build -DLLAMA_CURL=OFF \
        -DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
        -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    cmake --build /work/wt/llama-build --target llama-perplexity -j2
    .venv/bin/python benchmarks/kld_vs_llama_perplexity.py \
        --llama-perplexity /work/wt/llama-build/bin/llama-perplexity
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.buildfolder import link_ggufs, write_tiny_recipe  # noqa: E402
from tests.ggufbuild import write_tiny_llama_gguf  # noqa: E402

from mathq.datasets.corpus import BUNDLED_CORPUS  # noqa: E402
from mathq.evaluate.kld.logprob_file import LogprobFile  # noqa: E402
from mathq.evaluate.kld.stats import decode_log_probs  # noqa: E402
from mathq.evaluate.summaries import KldSummary, load_summary  # noqa: E402
from mathq.quantize.core import QuantizeOptions, quantize_gguf  # noqa: E402
from mathq.recipes.quants import get_quant  # noqa: E402

MATHQ = Path(sys.executable).parent / "mathq"
VOCAB = ROOT / "tests" / "fixtures" / "deepseek-llm-tokenizer" / "ggml-vocab-deepseek-llm.gguf"
QUANTS = ("Q8_0", "Q4_K_M", "Q2_K")
PROFILES = {"flat": 0.05, "peaked": 0.5}
TOLERANCE = 0.02

# llama-perplexity's final block: label in its output -> key in mathq's summary.
_PATTERNS = {
    "mean KLD": r"Mean\s+KLD:\s+([-\d.e]+)",
    "KLD 99.9%": r"99\.9%\s+KLD:\s+([-\d.e]+)",
    "KLD 99%": r"99\.0%\s+KLD:\s+([-\d.e]+)",
    "KLD 90%": r"90\.0%\s+KLD:\s+([-\d.e]+)",
    "KLD median": r"Median\s+KLD:\s+([-\d.e]+)",
    "RMS Δp %": r"RMS Δp\s*:\s+([-\d.e]+)",
    "same top %": r"Same top p:\s+([-\d.e]+)",
}

# The last digit llama-perplexity prints of each (KLD to 6 decimals, percentages to 3).
_PRINTED = {key: (1e-3 if key.endswith(" %") else 1e-6) for key in _PATTERNS}


def parse_llama(text: str) -> dict[str, float]:
    """The statistics llama-perplexity printed, or SystemExit with its output."""
    out = {}
    for key, pattern in _PATTERNS.items():
        m = re.search(pattern, text)
        if not m:
            raise SystemExit(f"llama-perplexity printed no {key!r}:\n{text[-3000:]}")
        out[key] = float(m.group(1))
    return out


def from_mathq(s) -> dict[str, float]:
    """The same statistics from a KldSummary, in llama-perplexity's units."""
    p = s.kld_percentiles
    return {"mean KLD": s.mean_kld, "KLD 99.9%": p["99.9"], "KLD 99%": p["99"],
            "KLD 90%": p["90"], "KLD median": p["median"], "RMS Δp %": 100 * s.rms_delta_p,
            "same top %": 100 * s.same_top.value}


def run_tool(cmd: list[str]) -> tuple[str, float, int]:
    """Run a command; its output, wall seconds and peak resident memory (bytes)."""
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    return text, seconds, usage.ru_maxrss * 1024


def compare_reference_files(a: LogprobFile, b: LogprobFile) -> tuple[float, float]:
    """Share of differing log-prob codes, and the largest gap between decoded log-probs."""
    differ, total, gap = 0, 0, 0.0
    for i in range(a.n_chunk):
        ra, rb = a.chunk_rows(i), b.chunk_rows(i)
        differ += int(np.count_nonzero(ra[:, 4:] != rb[:, 4:]))
        total += ra[:, 4:].size
        la, lb = decode_log_probs(ra, a.n_vocab), decode_log_probs(rb, b.n_vocab)
        kept = (la > -16) | (lb > -16)
        gap = max(gap, float(np.abs(la - lb)[kept].max()))
    return differ / total, gap


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-perplexity", type=Path,
                    default=Path("/work/wt/llama-build/bin/llama-perplexity"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not args.llama_perplexity.is_file():
        raise SystemExit(f"{args.llama_perplexity} not found; build it (see this file's doc)")
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="kld-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for profile, scale in PROFILES.items():
            ggufs = {"BF16": tmp / f"{profile}-BF16.gguf"}
            write_tiny_llama_gguf(ggufs["BF16"], VOCAB, output_scale=scale)
            for q in QUANTS:
                ggufs[q] = quantize_gguf(ggufs["BF16"], tmp / f"{profile}-{q}.gguf",
                                         QuantizeOptions(get_quant(q))).path
            recipe = write_tiny_recipe(tmp / f"{profile}.toml", QUANTS)
            build_root = tmp / f"build-{profile}"
            layout = link_ggufs(build_root, ggufs)
            mathq_out, mathq_seconds, mathq_rss = run_tool([
                str(MATHQ), "kld", str(recipe), "--quant", ",".join(QUANTS), "-c", str(args.ctx),
                "--chunks", str(args.chunks), "--threads", str(args.threads),
                "--build-dir", str(build_root), "--quiet", "--json"])
            run = json.loads(mathq_out)
            summaries = [load_summary(layout.kld_summary(q), KldSummary) for q in QUANTS]
            mathq_ref = Path(run["reference"]["path"])

            base = tmp / f"{profile}-base.logits"
            common = ["-c", str(args.ctx), "-b", str(args.ctx), "-t", str(args.threads)]
            _, llama_seconds, llama_rss = run_tool([
                str(args.llama_perplexity), "-m", str(ggufs["BF16"]), "-f", str(BUNDLED_CORPUS),
                "--chunks", str(args.chunks), "--kl-divergence-base", str(base), *common])
            ours, theirs = LogprobFile(mathq_ref), LogprobFile(base)
            same_tokens = (ours.n_chunk == theirs.n_chunk
                           and np.array_equal(ours.tokens, theirs.tokens))
            codes, gap = compare_reference_files(ours, theirs) if same_tokens else (1.0, 0.0)
            print(f"\n== {profile} model (output scale {scale}), {ours.n_chunk} chunks of "
                  f"{args.ctx} tokens, {ours.n_chunk * (args.ctx - 1 - args.ctx // 2)} "
                  f"positions; identical tokens: {same_tokens}; reference files: "
                  f"{100 * codes:.4f}% of codes differ, largest log-prob gap {gap:.2e}")
            if not same_tokens:
                worst = float("inf")
            print(f"{'variant':<8} {'statistic':<12} {'mathq':>12} {'llama':>12} {'rel.diff':>9}"
                  f" {'llama+mathq ref':>16}")
            for s in summaries:
                text, seconds, rss = run_tool([
                    str(args.llama_perplexity), "-m", str(layout.gguf(s.quant)),
                    "--kl-divergence-base", str(base), "--kl-divergence", *common])
                llama_seconds += seconds
                llama_rss = max(llama_rss, rss)
                cross, _, _ = run_tool([
                    str(args.llama_perplexity), "-m", str(layout.gguf(s.quant)),
                    "--kl-divergence-base", str(mathq_ref), "--kl-divergence", *common])
                theirs_stats, cross_stats = parse_llama(text), parse_llama(cross)
                for key, value in from_mathq(s).items():
                    # Equal to llama-perplexity's printed precision counts as no difference.
                    printed = abs(value - theirs_stats[key]) <= _PRINTED[key] / 2 + 1e-12
                    d = 0.0 if printed else rel(value, theirs_stats[key])
                    worst = max(worst, d)
                    print(f"{s.quant:<8} {key:<12} {value:12.6f} {theirs_stats[key]:12.6f} "
                          f"{100 * d:8.3f}% {cross_stats[key]:16.6f}")
            print(f"time: mathq kld {mathq_seconds:.1f}s, llama-perplexity {llama_seconds:.1f}s"
                  f" (ratio {mathq_seconds / llama_seconds:.2f}); peak RSS: mathq "
                  f"{mathq_rss / 2**20:.0f} MiB, llama-perplexity {llama_rss / 2**20:.0f} MiB "
                  f"(ratio {mathq_rss / llama_rss:.2f})")
    print(f"\nlargest relative difference: {100 * worst:.3f}% (tolerance {100 * TOLERANCE:g}%)")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
