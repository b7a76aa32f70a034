"""Benchmark: smoke-test problems per hour — mathq's engine, plain and drafted, vs its peers,
same model, same problems, same machine, one run.

For each model kind (``--kinds``: BF16 and quantized variants) of ``--model``, on the same
problems in the recipe's exact prompt, greedy, ``--max-tokens`` new tokens at most:

- ``mathq P=8``: ``run_smoke`` with the in-process continuous-batching engine, 8 sequences,
  one token per step (``--no-draft``);
- ``mathq P=8 drafted``: the same, checking drafted tokens in batches: BF16's answers to the
  same problems (its undrafted results, computed first) and prompt lookup; BF16 itself
  drafts by lookup only;
- ``mathq P=8 self-drafted``: drafting from the variant's own undrafted answers (computed
  first): every draft is right until the text ends, the ceiling of what drafting can gain
  here, and what a variant that follows BF16 closely (a trained model's Q8_0) comes near;
- ``mathq P=1`` and ``mathq P=1 drafted``: the same engine, one sequence at a time;
- ``mathq P=8 prompts``: the same problems with one new token each: reading the prompts
  (and grading), which drafting cannot shorten; the drafted runs' gain is also given on
  what is left, the decoding;
- ``create_completion``: a sequential loop over llama-cpp-python's ``Llama.create_completion``
  (temperature 0), the obvious way to write this without mathq;
- ``llama-server -np 8``: llama.cpp's server built from the same sdist, 8 slots, driven
  through mathq's OpenAI-compatible backend with 8 requests in flight.

Models (``--model``): ``deepseek-shape``, the DeepSeek-shaped 0.65 B model with random
weights (``benchsetup.py``) on MATH-500 in the RL recipe's prompt; its text is gibberish,
so BF16's answers are a poor guess of a variant's beyond the first divergence. ``demo``,
the trained tiny demo model on its own word problems: a variant really writes BF16's text.
``wide-demo``, the demo widened to the 0.65 B shape with inert weights (``widen.py``): the
demo's answers at the random model's cost, so drafting is measured where it can pay.

Every timing starts after the model is loaded (server start-up and ``Llama()`` excluded)
and ends when the last answer is back; mathq's includes grading. A drafted run's one-time
calibration of its step costs (a few decodes, kept beside the model file by a build) is
made once per model file and carried to the next runs, as a build folder keeps it.
Problems per hour = problems / seconds x 3600. With ``--rounds`` > 1 each contender runs
that many times in rotated order and its fastest run counts (on a shared machine: the least
disturbed one).
Drafted runs report the share of drafted tokens kept, completion tokens per decode step,
and how many answers are token for token those of the undrafted run at the same P.

Then, if ``batched-bench`` is among the contenders, llama-batched-bench measures the
hardware's headroom for the same shape of work (S_TG and S at 8 sequences over 1), and
each drafted run is set beside the limit of drafting at the kept rate it measured, two
ways: llama-bench's batch speeds over S_TG (one row's logits per batch), and the drafted
step itself timed with every row's logits, as the engine needs them (:func:`step_speeds`).
The run's own gain there is its decoding's (prompts contender needed).

    python benchmarks/smoke_throughput.py                       # both kinds, 16 problems
    python benchmarks/smoke_throughput.py --kinds Q8_0,Q4_K_M --contenders batched,drafted
    python benchmarks/smoke_throughput.py --model demo --kinds Q8_0,Q4_K_M --n 200

Not run by CI. llama.cpp's tools are built on first use (about 10 minutes on 2 cores) from
the pinned sdist; where that cannot be had (offline), the server and batched-bench are
reported as unavailable and the rest still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from benchsetup import BENCH_DIR, ROOT, batched_bench, load_note, model_path, tool

#: The drafted runs' step-cost calibration, kept across runs (a build keeps one per file).
STEP_COSTS = BENCH_DIR / "smoke-throughput-step-costs.json"
CONTENDERS = ("batched", "drafted", "self-drafted", "single", "single-drafted", "loop",
              "server", "batched-bench", "prompts")


@dataclass(frozen=True)
class Model:
    """A benchmark model: its recipe (prompt, stops), problems and GGUF files."""

    recipe: str
    problems: Path
    gguf: Callable[[str], Path]


def demo_path(kind: str) -> Path:
    """The tiny demo model in ``.bench/`` as ``kind``, converted and quantized on first use."""
    from mathq.convert.converter import ConvertOptions, convert_checkpoint
    from mathq.quantize.core import QuantizeOptions, quantize_gguf
    from mathq.recipes.quants import get_quant

    BENCH_DIR.mkdir(exist_ok=True)
    bf16 = BENCH_DIR / "tiny-demo-BF16.gguf"
    if not bf16.exists():
        convert_checkpoint(ROOT / "models" / "tiny-demo", bf16,
                           ConvertOptions(pre_tokenizer="deepseek-llm"))
    out = BENCH_DIR / f"tiny-demo-{kind}.gguf"
    if not out.exists():
        quantize_gguf(bf16, out, QuantizeOptions(quant=get_quant(kind)))
    return out


def wide_demo_path(kind: str) -> Path:
    """The demo widened to the 0.65 B shape (``benchmarks/widen.py``) in ``.bench/``."""
    from mathq.quantize.core import QuantizeOptions, quantize_gguf
    from mathq.recipes.quants import get_quant
    from widen import widen

    bf16 = BENCH_DIR / "wide-demo-BF16.gguf"
    if not bf16.exists():
        widen(demo_path("BF16"), bf16.with_suffix(".partial"))
        bf16.with_suffix(".partial").rename(bf16)
    out = BENCH_DIR / f"wide-demo-{kind}.gguf"
    if not out.exists():
        quantize_gguf(bf16, out, QuantizeOptions(quant=get_quant(kind)))
    return out


DEMO_PROBLEMS = ROOT / "models" / "tiny-demo" / "problems-distractor.jsonl"
MODELS = {
    "deepseek-shape": Model("deepseek-math-7b-rl",
                            ROOT / "tests" / "fixtures" / "math500" / "test.jsonl", model_path),
    "demo": Model("tiny-demo", DEMO_PROBLEMS, demo_path),
    "wide-demo": Model("tiny-demo", DEMO_PROBLEMS, wide_demo_path),
}


@dataclass
class Run:
    """One contender's run: wall seconds, token counts, answers and drafting figures."""

    seconds: float
    tokens: int
    prompt_tokens: int
    answers: dict[str, str] = field(default_factory=dict)
    drafted: int = 0
    kept: int = 0
    steps: int = 0


def _smoke(model: Model, gguf: Path, kind: str, n: int, max_tokens: int, spec: object,
           reference: Path | None = None, keep: Path | None = None) -> Run:
    """mathq's smoke stage on ``gguf`` (or through ``spec``'s servers); ``keep`` saves the
    results file there."""
    from mathq.evaluate.smoke import SmokeOptions
    from mathq.evaluate.stage import run_smoke
    from mathq.layout import BuildLayout
    from mathq.llama.drafts import STEP_COSTS_FILE
    from mathq.recipes.recipe import load_recipe

    recipe = load_recipe(model.recipe)
    with tempfile.TemporaryDirectory(dir=BENCH_DIR) as root:
        layout = BuildLayout.for_model(recipe.name, Path(root))
        layout.root.mkdir(parents=True)
        layout.gguf(kind).symlink_to(gguf)
        # The step-cost calibration is made once per model file and kept beside it, as in
        # a build folder: carried from run to run, not charged to every drafted run.
        costs = layout.root / STEP_COSTS_FILE
        if STEP_COSTS.is_file():
            shutil.copyfile(STEP_COSTS, costs)
        options = SmokeOptions(suite=str(model.problems), n=n, max_tokens=max_tokens,
                               backend=spec, draft_reference=reference)  # type: ignore[arg-type]
        (outcome,) = run_smoke(recipe, [kind], options, Path(root))
        rows = [json.loads(line) for line in outcome.results.read_text().splitlines()]
        if keep is not None:
            shutil.copyfile(outcome.results, keep)
        if costs.is_file():
            shutil.copyfile(costs, STEP_COSTS)
    s = outcome.summary
    return Run(s.wall_seconds, s.completion_tokens, s.prompt_tokens,
               {r["id"]: r["completion"] for r in rows}, s.drafted_tokens or 0,
               s.accepted_tokens or 0, s.decode_steps or 0)


def mathq_engine(model: Model, gguf: Path, kind: str, n: int, max_tokens: int, parallel: int,
                 threads: int, draft: bool = False, reference: Path | None = None,
                 keep: Path | None = None) -> Run:
    from mathq.evaluate.backends.base import BackendSpec

    return _smoke(model, gguf, kind, n, max_tokens,
                  BackendSpec(parallel=parallel, threads=threads, draft=draft),
                  reference if draft else None, keep)


def create_completion_loop(model: Model, gguf: Path, n: int, max_tokens: int,
                           threads: int) -> Run:
    """llama-cpp-python's own API, one problem after another."""
    from llama_cpp import Llama

    from mathq.datasets.problems import load_problem_set, select_problems
    from mathq.recipes.prompt import render_prompt, stop_strings
    from mathq.recipes.recipe import load_recipe

    spec = load_recipe(model.recipe).prompt
    chosen = select_problems(load_problem_set(model.problems), n=n, seed=0).problems
    llm = Llama(str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    tokens = prompt_tokens = 0
    answers = {}
    started = time.perf_counter()
    for p in chosen:
        out = llm.create_completion(render_prompt(spec, p.problem), max_tokens=max_tokens,
                                    temperature=0.0, stop=list(stop_strings(spec)))
        tokens += out["usage"]["completion_tokens"]
        prompt_tokens += out["usage"]["prompt_tokens"]
        answers[p.id] = out["choices"][0]["text"]
    seconds = time.perf_counter() - started
    llm.close()
    return Run(seconds, tokens, prompt_tokens, answers)


#: Rows of the batches llama-bench times for the limit: one sequence's drafts up to eight
#: sequences' long ones.
LIMIT_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def batch_speeds(gguf: Path, threads: int) -> dict[int, float]:
    """llama-bench's tokens per second for one batch of each of :data:`LIMIT_ROWS` rows
    (``-p N -n 0``): what a decode step of that many rows can move at best."""
    argv = [str(tool("llama-bench")), "-m", str(gguf), "-p", ",".join(map(str, LIMIT_ROWS)),
            "-n", "0", "-t", str(threads), "-r", "3", "-o", "jsonl"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {int(r["n_prompt"]): float(r["avg_ts"]) for r in rows if int(r["n_prompt"])}


#: Drafts per sequence of the drafted steps the all-logits limit times (a step of
#: ``parallel`` x (k + 1) rows), up to the context's micro-batch.
STEP_DRAFTS = (0, 1, 2, 3, 5, 7, 11, 15, 23, 31, 47, 63)


def step_speeds(gguf: Path, threads: int, parallel: int, prompt_tokens: int) -> dict[int, float]:
    """Rows per second of a drafted step with every draft kept, by drafts per sequence:
    ``parallel`` sequences, each after a prompt of ``prompt_tokens`` tokens, check k drafts
    each in one ``llama_decode`` of ``parallel`` x (k + 1) rows with logits for every row
    (as the engine's steps are laid out: a KV cache per sequence), the median of 3 timed
    decodes after a warm-up.

    llama-bench's ``-p N`` computes the logits of one row of its batch; a drafted step
    needs them for every row, and on a model whose output matrix is a large part of its
    weights (a third of the 0.65 B model's work per row) that is most of the difference.
    """
    import statistics

    import numpy as np

    from mathq.llama.runtime import Context, EngineOptions, LlamaModel, pad_context

    model = LlamaModel(gguf, 0)
    options = EngineOptions(parallel=parallel, threads=threads)
    ctx = Context(model, parallel, pad_context(prompt_tokens + 1 + max(STEP_DRAFTS)), options)
    rng = np.random.default_rng(0)
    speeds: dict[int, float] = {}
    try:
        for seq in range(parallel):
            ctx.clear_batch()
            ctx.add(rng.integers(100, model.n_vocab, prompt_tokens), 0, seq, True)
            ctx.decode()
        for k in STEP_DRAFTS:
            rows = parallel * (k + 1)
            if rows > ctx.n_ubatch:
                break
            times = []
            for _ in range(4):
                ctx.clear_batch()
                for seq in range(parallel):
                    ctx.add(rng.integers(100, model.n_vocab, k + 1), prompt_tokens, seq,
                            True, all_logits=True)
                tick = time.perf_counter()
                ctx.decode()
                ctx.synchronize()
                times.append(time.perf_counter() - tick)
                ctx.free_seq(-1, prompt_tokens)
            speeds[k] = rows / statistics.median(times[1:])
    finally:
        ctx.close()
        model.close()
    return speeds


def limit_gain(speed: Callable[[int], float], plain: float, parallel: int, kept_rate: float,
               max_rows: int) -> tuple[float, int]:
    """The most drafting can gain over ``plain`` tokens per second and the draft length
    that reaches it: ``parallel`` sequences each check k drafts a step (``parallel`` x
    (k + 1) rows at ``speed(rows)`` rows per second), each draft kept with probability
    ``kept_rate`` while the ones before it were."""
    best = (0.0, 0)
    for k in range(max_rows // parallel):
        kept_per_row = sum(kept_rate ** i for i in range(k + 1)) / (k + 1)
        best = max(best, (speed(parallel * (k + 1)) * kept_per_row / plain, k))
    return best


def _interpolated(speeds: dict[int, float]) -> Callable[[int], float]:
    """Rows per second at any row count, interpolated in log rows between measured ones."""
    import numpy as np

    sizes = sorted(speeds)
    return lambda rows: float(np.interp(np.log(rows), np.log(sizes),
                                        [speeds[r] for r in sizes]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server(model: Model, gguf: Path, kind: str, n: int, max_tokens: int, parallel: int,
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
        return _smoke(model, gguf, kind, n, max_tokens,
                      BackendSpec(kind="openai", urls=(url,), parallel=parallel))
    finally:
        proc.terminate()
        proc.wait(30)


def _tool_available(name: str) -> str | None:
    """None when llama.cpp's ``name`` is built or can be; else why not."""
    try:
        tool(name)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"{name} could not be built from the pinned sdist ({e})"
    return None


def _limits(gguf: Path, threads: int, bb: dict[int, dict[str, float]],
            rows: dict[str, dict[str, object]], p: int, prompt_tokens: int) -> dict[str, object]:
    """For each drafted run: the limit's gain at the kept rate it measured and at 1, beside
    the gain it got on the decoding (its decoding time, less the prompts-only run's, over
    the undrafted run's), two ways:

    - ``one_logit``: llama-bench's speed for a batch of the step's rows over
      llama-batched-bench's S_TG, the yardsticks the issue named;
    - ``all_logits``: :func:`step_speeds`, the very step a drafted engine decodes, over
      the same step without drafts: the one a drafted run can reach.
    """
    speeds = batch_speeds(gguf, threads)
    out: dict[str, object] = {"batch_tokens_per_second": speeds}
    steps: dict[int, dict[int, float]] = {}
    for name, run in rows.items():
        if not name.endswith("drafted") or not run["drafted"]:
            continue
        par = 1 if name.startswith("mathq P=1") else p
        if par not in steps:
            steps[par] = step_speeds(gguf, threads, par, prompt_tokens)
            print(f"  drafted step, every row's logits, {par} sequence(s): "
                  + ", ".join(f"k={k} {v:.0f}" for k, v in steps[par].items()) + " rows/s")
        out[f"step_rows_per_second P={par}"] = steps[par]
        kept_rate = int(str(run["kept"])) / int(str(run["drafted"]))
        all_logits = _interpolated({par * (k + 1): v for k, v in steps[par].items()})
        most = par * (1 + max(steps[par]))
        limits = {
            "one_logit": (_interpolated(speeds), bb[par]["speed_tg"], max(speeds)),
            "all_logits": (all_logits, all_logits(par), most),
        }
        got = run.get("decoding_gain")
        entry: dict[str, object] = {"kept_rate": kept_rate, "decoding_gain": got}
        for way, (speed, plain, max_rows) in limits.items():
            gain, k = limit_gain(speed, plain, par, kept_rate, max_rows)
            perfect, k1 = limit_gain(speed, plain, par, 1.0, max_rows)
            share = (float(str(got)) - 1) / (gain - 1) if got and gain > 1 else None
            entry[way] = {"limit_gain": gain, "limit_drafts": k, "perfect_gain": perfect,
                          "perfect_drafts": k1, "share_of_limit": share}
            if got is None:
                outcome = "- (run the prompts contender)"
            elif share is None:
                outcome = f"{float(str(got)):.2f}x, where drafting can gain nothing"
            else:
                outcome = f"{float(str(got)):.2f}x, {share:.2f} of the limit's gain"
            print(f"  limit for {name} ({way.replace('_', ' ')}): {gain:.2f}x at its "
                  f"{100 * kept_rate:.1f} % kept ({k} drafts a sequence), {perfect:.2f}x "
                  f"with every draft kept; its decoding got {outcome}")
        out[name] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="deepseek-shape")
    ap.add_argument("--kinds", default="BF16,Q4_K_M")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"comma-separated, of {', '.join(CONTENDERS)}")
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
    model = MODELS[args.model]
    chosen = args.contenders.split(",")
    unknown = set(chosen) - set(CONTENDERS)
    if unknown:
        ap.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    p = args.parallel
    common = (args.n, args.max_tokens)
    report: dict[str, object] = {"model": args.model, "n": args.n,
                                 "max_tokens": args.max_tokens, "parallel": p,
                                 "threads": args.threads, "rounds": args.rounds,
                                 "load_before": load_note()}
    print(f"{args.model}: {args.n} problems, {args.max_tokens} new tokens at most, "
          f"{args.threads} threads, {args.rounds} round(s); {load_note()}")
    unavailable = {c: why for c, name in (("server", "llama-server"),
                                          ("batched-bench", "llama-batched-bench"))
                   if c in chosen and (why := _tool_available(name))}
    for c, why in unavailable.items():
        print(f"  {c}: left out: {why}")
        chosen.remove(c)
    report["unavailable"] = unavailable
    reference = None
    if {"drafted", "single-drafted"} & set(chosen):
        # BF16's undrafted answers: what the variants draft from, as in a build.
        reference = BENCH_DIR / f"reference-{args.model}-{args.n}-{args.max_tokens}.jsonl"
        run = mathq_engine(model, model.gguf("BF16"), "BF16", *common, p, args.threads,
                           keep=reference)
        print(f"  BF16 reference answers: {run.seconds:.1f}s, {run.tokens} tokens")
    for kind in args.kinds.split(","):
        gguf = model.gguf(kind)
        ref = reference if kind != "BF16" else None
        engine = partial(mathq_engine, model, gguf, kind, *common, threads=args.threads)
        own = None
        if "self-drafted" in chosen:
            own = BENCH_DIR / f"own-{args.model}-{kind}-{args.n}-{args.max_tokens}.jsonl"
            engine(p, keep=own)
        every = {
            "batched": (f"mathq P={p}", partial(engine, p)),
            "drafted": (f"mathq P={p} drafted", partial(engine, p, draft=True, reference=ref)),
            "self-drafted": (f"mathq P={p} self-drafted",
                             partial(engine, p, draft=True, reference=own)),
            "prompts": (f"mathq P={p} prompts", partial(mathq_engine, model, gguf, kind,
                                                        args.n, 1, p, threads=args.threads)),
            "single": ("mathq P=1", partial(engine, 1)),
            "single-drafted": ("mathq P=1 drafted",
                               partial(engine, 1, draft=True, reference=ref)),
            "loop": ("create_completion loop",
                     partial(create_completion_loop, model, gguf, *common, args.threads)),
            "server": (f"llama-server -np {p}",
                       partial(llama_server, model, gguf, kind, *common, p, args.threads)),
        }
        contenders = dict(every[c] for c in chosen if c in every)
        names = list(contenders)
        all_runs: dict[str, list[Run]] = {k: [] for k in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                all_runs[name].append(contenders[name]())
                last = all_runs[name][-1]
                print(f"  [{kind}] {name}: {last.seconds:.1f}s, {last.tokens} tokens; "
                      f"{load_note()}", flush=True)
        runs = {k: min(v, key=lambda x: x.seconds) for k, v in all_runs.items()}
        print(f"\n{args.model} {kind}: {gguf.name} ({gguf.stat().st_size / 2**30:.2f} GiB); "
              f"{load_note()}")
        print(f"  {'contender':<24} {'seconds':>8} {'tokens':>7} {'problems/h':>11} "
              f"{'kept':>6} {'tok/step':>8} {'same':>6}")
        per_hour: dict[str, float] = {}
        rows: dict[str, dict[str, object]] = {}
        for name, run in runs.items():
            per_hour[name] = args.n / run.seconds * 3600
            plain = runs.get(name.removesuffix(" drafted").removesuffix(" self-drafted"))
            same = (sum(run.answers.get(i) == a for i, a in plain.answers.items())
                    / len(plain.answers) if name.endswith("drafted") and plain else None)
            kept = run.kept / run.drafted if run.drafted else None
            per_step = run.tokens / run.steps if run.steps else None
            rows[name] = {"seconds": run.seconds, "tokens": run.tokens,
                          "prompt_tokens": run.prompt_tokens, "problems_per_hour": per_hour[name],
                          "drafted": run.drafted, "kept": run.kept,
                          "steps": run.steps, "identical_to_undrafted": same,
                          "all_seconds": [x.seconds for x in all_runs[name]]}
            print(f"  {name:<24} {run.seconds:8.1f} {run.tokens:7d} {per_hour[name]:11.0f} "
                  + (f"{100 * kept:5.1f}%" if kept is not None else f"{'-':>6}")
                  + (f" {per_step:8.2f}" if per_step is not None else f" {'-':>8}")
                  + (f" {100 * same:5.1f}%" if same is not None else f" {'-':>6}"))
        ratios: dict[str, float] = {}
        for a, b in ((f"mathq P={p} drafted", f"mathq P={p}"),
                     (f"mathq P={p} self-drafted", f"mathq P={p}"),
                     ("mathq P=1 drafted", "mathq P=1"),
                     (f"mathq P={p} drafted", f"llama-server -np {p}"),
                     (f"mathq P={p}", f"llama-server -np {p}"),
                     (f"mathq P={p}", "mathq P=1"),
                     (f"mathq P={p}", "create_completion loop")):
            if a in per_hour and b in per_hour:
                ratios[f"{a} / {b}"] = per_hour[a] / per_hour[b]
                print(f"  {a} / {b}: {ratios[f'{a} / {b}']:.2f}x")
        prompts = runs.get(f"mathq P={p} prompts")
        for a, b in ((f"mathq P={p} drafted", f"mathq P={p}"),
                     (f"mathq P={p} self-drafted", f"mathq P={p}")):
            if prompts is not None and a in runs and b in runs:
                # what drafting can shorten: each run less one that reads the same prompts
                # and writes one token each
                key = f"{a} / {b} (decoding only)"
                ratios[key] = ((runs[b].seconds - prompts.seconds)
                               / max(runs[a].seconds - prompts.seconds, 1e-9))
                rows[a]["decoding_gain"] = ratios[key]
                print(f"  {key}: {ratios[key]:.2f}x (prompts alone {prompts.seconds:.1f} s)")
        entry: dict[str, object] = {"runs": rows, "ratios": ratios, "load_after": load_note()}
        if "batched-bench" in chosen and runs:
            mean_prompt = round(next(iter(runs.values())).prompt_tokens / args.n)
            bb = batched_bench(gguf, args.threads, (1, p), mean_prompt, args.max_tokens)
            entry["batched_bench"] = bb
            print(f"  llama-batched-bench (pp {mean_prompt}, tg {args.max_tokens}): S_TG "
                  f"{bb[p]['speed_tg'] / bb[1]['speed_tg']:.2f}x, S "
                  f"{bb[p]['speed'] / bb[1]['speed']:.2f}x at P={p} over P=1")
            entry["limit"] = _limits(gguf, args.threads, bb, rows, p, mean_prompt)
        report[kind] = entry
    out = BENCH_DIR / f"smoke_throughput-{args.model}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{load_note()}; figures in {out}")


if __name__ == "__main__":
    main()
