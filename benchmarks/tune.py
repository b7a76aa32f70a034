"""What does ``mathq tune`` buy at a stock mix's size, and what does it cost to run?

For the bundled demo model and a larger DeepSeek-shaped model with random weights, at the
sizes of the stock Q2_K, Q3_K_M and Q4_K_M files: bytes, mean KLD to BF16 (with its
uncertainty) and same-top-token share on held-out text for stock, stock + importance matrix,
tuned and tuned + matrix, plus the demo's accuracy on its 400 held-out smoke problems. Then
the tune's own cost: wall time and peak RSS of one cold ``mathq tune --match Q4_K_M`` as a
multiple of one plain ``mathq quantize -Q Q4_K_M`` of the same model, each in its own process.

Everything runs through mathq's command line, as a user would run it. A rerun keeps the files
and the cost measurement an interrupted run made (``--out`` holds them); delete it to start over.

- demo: a build folder of the ``tiny-demo`` recipe; calibration (the importance matrix and the
  tune's probes) on ``models/tiny-demo/problems.jsonl``, the training run's held-out problems,
  which share nothing with the recipe's ``[kld] corpus`` (the held-out transcripts KLD is
  reported on) or its smoke problems;
- DeepSeek-shaped: a BF16 GGUF with DeepSeek's 102400-token vocabulary and random weights
  (``--hidden``, ``--ffn``, ``--layers``), calibrated on the same problems (plain text) and
  measured on mathq's bundled math notes.

    .venv/bin/python benchmarks/tune.py [--out .bench/tune] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.benchsetup import load_note
from benchmarks.peers import CACHE, ROOT, timed

BUDGETS = ("Q2_K", "Q3_K_M", "Q4_K_M")
CALIBRATION = ROOT / "models" / "tiny-demo" / "problems.jsonl"
SMOKE = ROOT / "models" / "tiny-demo" / "problems-distractor.jsonl"
KINDS = ("stock", "stock+imatrix", "tuned", "tuned+imatrix")


def mathq(*args: str, env: dict[str, str], capture: bool = True) -> str:
    """Run the mathq command line; its stdout."""
    cmd = [sys.executable, "-c", "from mathq.cli import main; main()", *args]
    done = subprocess.run(cmd, env=env, check=True, capture_output=capture, text=True)
    return done.stdout if capture else ""


def mathq_timed(*args: str, env: dict[str, str]) -> tuple[float, int]:
    return timed([sys.executable, "-c", "from mathq.cli import main; main()", *args], env)


def _env(build: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "toolkit"), str(ROOT),
                                       os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "MATHQ_BUILD_DIR": str(build),
            "HF_HUB_OFFLINE": "1", "MATHQ_NO_PROGRESS": "1"}


def _row(kld: dict, size: int) -> dict:
    return {"bytes": size, "kld": kld["mean_kld"], "kld_err": kld["mean_kld_err"],
            "same_top": 100 * kld["same_top"]["value"]}


def demo(out: Path) -> dict:
    """The demo model through its recipe's build folder."""
    build = out / "build"
    env = _env(build)
    folder = build / "tiny-demo"
    if not (folder / "tiny-demo.imatrix.gguf").is_file():
        mathq("convert", "tiny-demo", "-q", env=env)
        mathq("imatrix", "tiny-demo", "-c", str(CALIBRATION), "-q", env=env)
    cost_env = _env(out / "cost-build")  # a build folder of its own: nothing to reuse
    cost = _cost(cost_env, ["quantize", "tiny-demo", "-Q", "Q4_K_M", "-q"],
                 ["tune", "tiny-demo", "--match", "Q4_K_M", "-c", str(CALIBRATION), "-q"],
                 out / "cost-build", folder / "cost.json", ["convert", "tiny-demo", "-q"])
    names = []
    for q in BUDGETS:
        names += [q, f"{q}-imat", f"{q}-tuned", f"{q}-imat-tuned"]
        if all((folder / f"tiny-demo-{n}.gguf").is_file() for n in names[-4:]):
            continue  # made by an earlier, interrupted run of this script
        mathq("quantize", "tiny-demo", "-Q", f"{q},{q}-imat", "-q", env=env)
        mathq("tune", "tiny-demo", "--match", q, "-c", str(CALIBRATION), "-q", env=env)
        mathq("tune", "tiny-demo", "--match", q, "-c", str(CALIBRATION), "-q", "--imatrix",
              str(folder / "tiny-demo.imatrix.gguf"), env=env)
    klds = json.loads(mathq("kld", "tiny-demo", "-Q", ",".join(names), "-q", "--json",
                            env=env))["summaries"]
    smoke = json.loads(mathq("smoke", "tiny-demo", "-Q", ",".join(["BF16", *names]), "-q",
                             "--json", env=env))
    acc = {o["quant"]: o["summary"]["accuracy"] for o in smoke}
    rows = {}
    for q in BUDGETS:
        for kind, name in zip(KINDS, (q, f"{q}-imat", f"{q}-tuned", f"{q}-imat-tuned"),
                              strict=True):
            k = next(s for s in klds if s["quant"] == name)
            r = _row(k, (folder / f"tiny-demo-{name}.gguf").stat().st_size)
            r["accuracy"] = 100 * acc[name]["value"]
            rows[f"{q} {kind}"] = r
    return {"rows": rows, "bf16_accuracy": 100 * acc["BF16"]["value"], "cost": cost,
            "n_params": _n_params(folder / "tiny-demo-BF16.gguf"),
            "corpus": klds[0]["corpus"], "n_tokens": klds[0]["n_tokens"]}


def big(out: Path, hidden: int, ffn: int, layers: int, probe_chunks: int | None) -> dict:
    """The DeepSeek-shaped random model, as bare GGUF files."""
    from tests.ggufbuild import write_tiny_llama_gguf

    folder = out / "big"
    folder.mkdir(parents=True, exist_ok=True)
    env = _env(out / "build-unused")
    bf16 = folder / "deepseek-shape-BF16.gguf"
    imatrix = folder / "deepseek-shape.imatrix.gguf"
    if not imatrix.is_file():
        write_tiny_llama_gguf(bf16, ROOT / "tests/fixtures/deepseek-llm-tokenizer/"
                              "ggml-vocab-deepseek-llm.gguf", n_embd=hidden, n_ff=ffn,
                              n_layer=layers, n_head=hidden // 64, output_scale=0.5)
        mathq("imatrix", str(bf16), "-c", str(CALIBRATION), "--smoke-suite", str(SMOKE),
              "--chunks", "16", "--out", str(imatrix), "-q", env=env)
    common = ["-c", str(CALIBRATION), "--smoke-suite", str(SMOKE), "-q",
              *(["--probe-chunks", str(probe_chunks)] if probe_chunks else [])]
    cold = folder / "cold"
    cost = _cost(env, ["quantize", str(bf16), "-Q", "Q4_K_M", "--out-dir", str(cold), "-q"],
                 ["tune", str(bf16), "--match", "Q4_K_M", "--out-dir", str(cold), *common],
                 cold, folder / "cost.json")
    files = []
    for q in BUDGETS:
        files += [folder / f"deepseek-shape-{n}.gguf"
                  for n in (q, f"{q}-imat", f"{q}-tuned", f"{q}-imat-tuned")]
        if all(f.is_file() for f in files[-4:]):
            continue  # made by an earlier, interrupted run of this script
        mathq("quantize", str(bf16), "-Q", q, "--out-dir", str(folder), "-q", env=env)
        mathq("quantize", str(bf16), "-Q", q, "--imatrix", str(imatrix), "--out-dir",
              str(folder), "-q", env=env)
        mathq("tune", str(bf16), "--match", q, *common, env=env)
        mathq("tune", str(bf16), "--match", q, "--imatrix", str(imatrix), *common, env=env)
    klds = [json.loads(mathq("kld", str(f), "--reference", str(bf16), "--out-dir",
                             str(folder / "kld"), "-q", "--json", env=env))["summaries"][0]
            for f in files]
    rows = {}
    for q in BUDGETS:
        for kind, name in zip(KINDS, (q, f"{q}-imat", f"{q}-tuned", f"{q}-imat-tuned"),
                              strict=True):
            k = next(s for s in klds if s["quant"] == f"deepseek-shape-{name}")
            rows[f"{q} {kind}"] = _row(k, (folder / f"deepseek-shape-{name}.gguf").stat().st_size)
    return {"rows": rows, "cost": cost, "n_params": _n_params(bf16),
            "shape": {"hidden": hidden, "ffn": ffn, "layers": layers, "vocab": 102400},
            "corpus": klds[0]["corpus"], "n_tokens": klds[0]["n_tokens"]}


def _n_params(path: Path) -> int:
    from mathq.convert.gguf_info import read_gguf_summary

    return read_gguf_summary(path).n_params


def _cost(env: dict[str, str], quantize: list[str], tune: list[str], scratch: Path,
          saved: Path, setup: list[str] | None = None) -> dict:
    """One plain quantize, then one cold tune (no probe, cost or reference kept), each in
    its own process, in the empty folder ``scratch``: wall seconds and peak RSS (kept in
    ``saved`` for a rerun)."""
    if saved.is_file():
        return json.loads(saved.read_text())
    shutil.rmtree(scratch, ignore_errors=True)
    if setup:
        mathq(*setup, env=env)
    q_s, q_rss = mathq_timed(*quantize, env=env)
    t_s, t_rss = mathq_timed(*tune, env=env)
    cost = {"quantize_s": q_s, "quantize_rss": q_rss, "tune_s": t_s, "tune_rss": t_rss,
            "load": load_note()}
    saved.write_text(json.dumps(cost) + "\n")
    return cost


def table(result: dict, accuracy: bool) -> str:
    head = "| budget | variant | bytes | mean KLD | vs stock | same top % |"
    if accuracy:
        head += " accuracy % |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, r in result["rows"].items():
        q, kind = key.split(" ")
        stock = result["rows"][f"{q} stock"]["kld"]
        line = (f"| {q} | {kind} | {r['bytes']:,} | {r['kld']:.4f} ± {r['kld_err']:.4f} | "
                f"{r['kld'] / stock:.2f}x | {r['same_top']:.1f} |")
        if accuracy:
            line += f" {r['accuracy']:.1f} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=CACHE / "tune")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--probe-chunks", type=int, default=None,
                    help="for the DeepSeek-shaped model's tunes (default: mathq tune's)")
    ap.add_argument("--skip-big", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"start: {load_note()}", flush=True)
    results = {"demo": demo(args.out)}
    print(table(results["demo"], accuracy=True), flush=True)
    print(f"after demo: {load_note()}", flush=True)
    if not args.skip_big:
        results["big"] = big(args.out, args.hidden, args.ffn, args.layers, args.probe_chunks)
        print(table(results["big"], accuracy=False), flush=True)
    for name, r in results.items():
        c = r["cost"]
        print(f"{name}: {r['n_params']:,} weights; tune {c['tune_s']:.1f} s = "
              f"{c['tune_s'] / c['quantize_s']:.1f}x quantize ({c['quantize_s']:.1f} s); peak "
              f"RSS {c['tune_rss'] / 2**20:.0f} MiB = {c['tune_rss'] / c['quantize_rss']:.2f}x "
              f"quantize ({c['quantize_rss'] / 2**20:.0f} MiB)")
    print(f"end: {load_note()}; {time.perf_counter() - started:.0f} s in all", flush=True)
    (args.out / "tune.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
