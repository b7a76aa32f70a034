"""Benchmark: smoke-test problems per hour — mathq's engine vs its peers, same model, same
problems, same machine, one run.

For each model kind (BF16 and Q4_K_M of the DeepSeek-shaped benchmark model, see
``benchsetup.py``), on the same MATH-500 problems in the RL recipe's exact prompt, greedy,
``--max-tokens`` new tokens each:

- ``mathq P=8``: ``run_smoke`` with the in-process continuous-batching engine, 8 sequences;
- ``mathq P=1``: the same engine, one sequence at a time;
- ``create_completion``: a sequential loop over llama-cpp-python's ``Llama.create_completion``
  (temperature 0), the obvious way to write this without mathq;
- ``llama-server -np 8``: llama.cpp's server built from the same sdist, 8 slots, driven
  through mathq's OpenAI-compatible backend with 8 requests in flight.

Every timing starts after the model is loaded (server start-up and ``Llama()`` excluded)
and ends when the last answer is back; mathq's includes grading. Problems per hour =
problems / seconds x 3600. With ``--rounds`` > 1 each contender runs that many times in
rotated order and its fastest run counts (on a shared machine: the least disturbed one).

Then llama-batched-bench (same sdist, same threads) measures the hardware's headroom for
the same shape of work (prompts of the mean prompt length, ``--max-tokens`` generated):
S_TG (generation alone) and S (prompt and generation together) at 8 sequences over 1.
Targets: mathq P=8 >= 0.9x llama-server's problems per hour; mathq's P=8/P=1 gain >= 0.9x
the batched-bench headroom. A smoke run also reads every prompt, which batching does not
speed up, so its gain is bounded by S's headroom; S_TG's is the bound for long answers.

With random weights no answer ends early (no EOS), so every problem costs exactly
``--max-tokens`` tokens in every contender: equal work, which the token totals show.

    python benchmarks/smoke_throughput.py                       # both kinds, 16 problems
    python benchmarks/smoke_throughput.py --kinds Q4_K_M --threads 1 --rounds 2

Not run by CI. Builds llama.cpp's tools on first use (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path

from benchsetup import BENCH_DIR, ROOT, batched_bench, load_note, model_path, tool

RECIPE = "deepseek-math-7b-rl"
PROBLEMS = ROOT / "tests" / "fixtures" / "math500" / "test.jsonl"


Run = tuple[float, int, int]  # seconds, completion tokens, prompt tokens


def _smoke(gguf: Path, kind: str, n: int, max_tokens: int, spec: object) -> Run:
    """mathq's smoke stage on ``gguf`` (or through ``spec``'s servers)."""
    from mathq.evaluate.smoke import SmokeOptions
    from mathq.evaluate.stage import run_smoke
    from mathq.layout import BuildLayout
    from mathq.recipes.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as root:
        layout = BuildLayout.for_model(recipe.name, Path(root))
        layout.root.mkdir(parents=True)
        layout.gguf(kind).symlink_to(gguf)
        options = SmokeOptions(suite=str(PROBLEMS), n=n, max_tokens=max_tokens,
                               backend=spec)  # type: ignore[arg-type]
        (outcome,) = run_smoke(recipe, [kind], options, Path(root))
    s = outcome.summary
    return s.wall_seconds, s.completion_tokens, s.prompt_tokens


def mathq_engine(gguf: Path, kind: str, n: int, max_tokens: int, parallel: int,
                 threads: int) -> Run:
    from mathq.evaluate.backends.base import BackendSpec

    return _smoke(gguf, kind, n, max_tokens, BackendSpec(parallel=parallel, threads=threads))


def create_completion_loop(gguf: Path, n: int, max_tokens: int, threads: int) -> Run:
    """llama-cpp-python's own API, one problem after another."""
    from llama_cpp import Llama

    from mathq.datasets.problems import load_problem_set, select_problems
    from mathq.recipes.prompt import render_prompt, stop_strings
    from mathq.recipes.recipe import load_recipe

    spec = load_recipe(RECIPE).prompt
    chosen = select_problems(load_problem_set(PROBLEMS), n=n, seed=0).problems
    llm = Llama(str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    tokens = prompt_tokens = 0
    started = time.perf_counter()
    for p in chosen:
        out = llm.create_completion(render_prompt(spec, p.problem), max_tokens=max_tokens,
                                    temperature=0.0, stop=list(stop_strings(spec)))
        tokens += out["usage"]["completion_tokens"]
        prompt_tokens += out["usage"]["prompt_tokens"]
    seconds = time.perf_counter() - started
    llm.close()
    return seconds, tokens, prompt_tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server(gguf: Path, kind: str, n: int, max_tokens: int, parallel: int,
                 threads: int) -> Run:
    """llama-server with ``parallel`` slots, through mathq's OpenAI-compatible backend."""
    from mathq.evaluate.backends.base import BackendSpec

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = BENCH_DIR / f"llama-server-{kind}.log"
    argv = [str(tool("llama-server")), "-m", str(gguf), "-np", str(parallel),
            "-c", str(parallel * 1024), "-t", str(threads), "-tb", str(threads),
            "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not start; see {log}")
            time.sleep(0.5)
        return _smoke(gguf, kind, n, max_tokens,
                      BackendSpec(kind="openai", urls=(url,), parallel=parallel))
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", default="BF16,Q4_K_M")
    ap.add_argument("--n", type=int, default=16, help="problems")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every contender this many times (order rotated), keep the "
                         "fastest: on a shared machine, the run least disturbed by others")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="llama.cpp threads for every contender; on a machine shared with "
                         "other work use 1 (spinning threads of 2 slow each other down)")
    args = ap.parse_args()
    p = args.parallel
    report: dict[str, object] = {"n": args.n, "max_tokens": args.max_tokens, "parallel": p,
                                 "threads": args.threads, "rounds": args.rounds,
                                 "load_before": load_note()}
    print(f"{args.n} problems, {args.max_tokens} new tokens each, {args.threads} threads, "
          f"{args.rounds} round(s); {load_note()}")
    for kind in args.kinds.split(","):
        gguf = model_path(kind)
        tool("llama-server")  # build before timing anything
        contenders = {
            f"mathq P={p}": partial(mathq_engine, gguf, kind, args.n, args.max_tokens, p,
                                    args.threads),
            "mathq P=1": partial(mathq_engine, gguf, kind, args.n, args.max_tokens, 1,
                                 args.threads),
            "create_completion loop": partial(create_completion_loop, gguf, args.n,
                                              args.max_tokens, args.threads),
            f"llama-server -np {p}": partial(llama_server, gguf, kind, args.n,
                                             args.max_tokens, p, args.threads),
        }
        names = list(contenders)
        all_runs: dict[str, list[Run]] = {k: [] for k in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                all_runs[name].append(contenders[name]())
                sec, tok, _ = all_runs[name][-1]
                print(f"  [{kind}] {name}: {sec:.1f}s, {tok} tokens; {load_note()}", flush=True)
        runs = {k: min(v) for k, v in all_runs.items()}
        mean_prompt = round(runs["mathq P=1"][2] / args.n)
        bb = batched_bench(gguf, args.threads, (1, p), mean_prompt, args.max_tokens)
        print(f"\n{kind}: {gguf.name} ({gguf.stat().st_size / 2**30:.2f} GiB); {load_note()}")
        print(f"  {'contender':<26} {'seconds':>8} {'tokens':>7} {'tok/s':>7} {'problems/h':>11}")
        per_hour = {}
        for name, (seconds, tokens, _) in runs.items():
            per_hour[name] = args.n / seconds * 3600
            print(f"  {name:<26} {seconds:8.1f} {tokens:7d} {tokens / seconds:7.2f} "
                  f"{per_hour[name]:11.0f}")
        vs_server = per_hour[f"mathq P={p}"] / per_hour[f"llama-server -np {p}"]
        gain = per_hour[f"mathq P={p}"] / per_hour["mathq P=1"]
        vs_loop = per_hour[f"mathq P={p}"] / per_hour["create_completion loop"]
        head_tg = bb[p]["speed_tg"] / bb[1]["speed_tg"]
        head_all = bb[p]["speed"] / bb[1]["speed"]
        print(f"  llama-batched-bench (pp {mean_prompt}, tg {args.max_tokens}): S_TG P=1 "
              f"{bb[1]['speed_tg']:.2f}, P={p} {bb[p]['speed_tg']:.2f} t/s -> {head_tg:.2f}x; "
              f"S (prompt+generation) -> {head_all:.2f}x")
        print(f"  mathq P={p} / llama-server:          {vs_server:.2f}x  (target >= 0.90)")
        print(f"  mathq P={p} / P=1 gain:              {gain:.2f}x = {gain / head_tg:.2f} of the "
              f"S_TG headroom, {gain / head_all:.2f} of the S headroom (target >= 0.90)")
        print(f"  mathq P={p} / create_completion loop: {vs_loop:.2f}x")
        report[kind] = {"runs": {k: [{"seconds": s, "tokens": t, "prompt_tokens": pt}
                                     for s, t, pt in v] for k, v in all_runs.items()},
                        "problems_per_hour": per_hour, "batched_bench": bb,
                        "vs_server": vs_server, "gain": gain, "headroom_tg": head_tg,
                        "headroom_all": head_all, "vs_create_completion": vs_loop,
                        "load_after": load_note()}
    out = BENCH_DIR / "smoke_throughput.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{load_note()}; figures in {out}")


if __name__ == "__main__":
    main()
