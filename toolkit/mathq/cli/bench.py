"""``mathq bench``: each variant's speed, memory and batching headroom, llama-bench's way."""

from __future__ import annotations

from pathlib import Path

import click

from mathq.cli.common import (
    build_dir_option,
    echo_json,
    gpu_layers_option,
    is_gguf_path,
    json_option,
    quiet_option,
    threads_option,
)
from mathq.cli.types import MAX_PARALLEL, MAX_TOKENS, FileOrName, Int, IntList, OutputPath


@click.command()
@click.argument("source", metavar="RECIPE|GGUF", type=FileOrName())
@click.option("--quant", "-Q", "quant_list", metavar="TYPES",
              help="Comma-separated variants, e.g. Q4_K_M,Q8_0 or Q4_K_M-imat (default: the "
                   "recipe's). Not with a GGUF path.")
@click.option("--n-prompt", "-p", type=Int(0, MAX_TOKENS), default=512, show_default=True,
              help="Prompt-processing test size in tokens (llama-bench's pp512; 0 skips it).")
@click.option("--n-gen", "-n", type=Int(0, MAX_TOKENS), default=128, show_default=True,
              help="Generation test size in tokens (llama-bench's tg128; 0 skips it).")
@click.option("--repetitions", "-r", type=Int(1, 1000), default=5, show_default=True,
              help="Repetitions of each test after one warm-up run.")
@click.option("--parallel", "parallel", default="1,4,8", show_default=True,
              type=IntList(1, MAX_PARALLEL),
              help="Sequence counts for aggregate generation throughput ('' skips it).")
@threads_option
@gpu_layers_option
@click.option("--out-dir", type=OutputPath(folder=True), default=None,
              help="With a GGUF path: also write its summary here as <name>.json.")
@build_dir_option
@quiet_option
@json_option
def bench(source: str, quant_list: str | None, n_prompt: int, n_gen: int, repetitions: int,
          parallel: tuple[int, ...], threads: int, gpu_layers: int | None,
          out_dir: Path | None, build_dir: Path | None, quiet: bool, as_json: bool) -> None:
    """Measure each variant's speed: prompt processing, generation, batching, memory.

    The method is llama-bench's (pp512 and tg128 with random tokens, one warm-up run, five
    repetitions, mean +- sd) plus llama-batched-bench's aggregate generation throughput
    for 1, 4 and 8 sequences decoded together, which is what `mathq smoke --parallel`
    gains. Memory is llama.cpp's own buffer sizes (model, KV cache, compute) and the
    process's peak RSS minus its peak before the model was loaded; each variant runs in its
    own process, so both are its own. With a GPU build (make install CUDA=1) every layer is
    offloaded unless --gpu-layers says otherwise, and the device, the layers offloaded and
    the GPU memory taken are recorded. Summaries go to build/<model>/bench/<QUANT>.json.

    RECIPE|GGUF is a recipe (its build folder's variants) or the path of any GGUF file,
    measured the same way, as `llama-bench -m FILE` would.

    \b
    Examples:
      mathq bench deepseek-math-7b-rl --quant Q4_K_M,Q8_0
      mathq bench deepseek-math-7b-rl -Q Q4_K_M -r 3 --parallel 1,2,4,8,16
      mathq bench deepseek-math-7b-rl -Q Q6_K --gpu-layers 99 --json
      mathq bench ~/models/deepseek-math-7b-rl-Q4_K_M.gguf --out-dir results/
    """
    from mathq.cli.render import progress_for
    from mathq.evaluate.bench import BenchOptions
    from mathq.evaluate.stage import recipe_bench_options, run_bench, run_bench_files
    from mathq.fsutil import format_bytes
    from mathq.recipes.recipe import load_recipe

    options = BenchOptions(n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions,
                           parallel=parallel, threads=threads, gpu_layers=gpu_layers)
    if is_gguf_path(source):
        if quant_list:
            raise click.UsageError("--quant picks a recipe's variants; a GGUF path is one file")
        outcomes = run_bench_files([Path(source)], options, out_dir, progress_for(quiet))
    else:
        if out_dir is not None:
            raise click.UsageError("--out-dir is for a GGUF path; a recipe's summaries go to "
                                   "build/<model>/bench/")
        rec = load_recipe(source)
        quants = list(rec.variant_names(quant_list))
        outcomes = run_bench(rec, quants, recipe_bench_options(rec, options), build_dir,
                             progress_for(quiet))
    if as_json:
        echo_json(outcomes)
        return
    width = max([8, *(len(o.quant) for o in outcomes)])  # Q4_K_M-imat is 11 wide
    click.echo(f"{'QUANT':<{width}} {'SIZE':>9} {'BPW':>5} {'PP t/s':>15} {'TG t/s':>13} "
               f"{'LOAD':>6} {'LLAMA MEM':>10} {'RSS+':>9}  AGGREGATE TG t/s BY P  (DEVICE)")
    for o in outcomes:
        s = o.summary
        pp = (f"{s.prompt_tokens_per_second.mean:.1f} +- {s.prompt_tokens_per_second.sd:.1f}"
              if s.prompt_tokens_per_second else "-")
        tg = (f"{s.generation_tokens_per_second.mean:.2f} +- "
              f"{s.generation_tokens_per_second.sd:.2f}"
              if s.generation_tokens_per_second else "-")
        over = s.rss_over_baseline_bytes
        rss = format_bytes(over) if over is not None else "-"
        buffers = [s.llama_buffers.get(k) for k in ("model", "kv_cache", "compute")]
        mem = (format_bytes(sum(b for b in buffers if b is not None))
               if all(b is not None for b in buffers) else "-")
        load = f"{s.load_seconds:.1f}s" if s.load_seconds is not None else "-"
        agg = ", ".join(f"P={p} {v:.1f}" for p, v in s.throughput_by_parallel.items())
        where = s.device or "CPU"
        if s.gpu_layers:
            where += f", {s.gpu_layers}/{s.offloadable_layers} layers"
        if s.vram_bytes is not None:
            where += f", {s.vram_bytes / 2**30:.2f} GiB VRAM"
        click.echo(f"{o.quant:<{width}} {s.file_size / 2**30:6.2f} GiB {s.bits_per_weight:5.2f} "
                   f"{pp:>15} {tg:>13} {load:>6} {mem:>10} {rss:>9}  {agg}  ({where})")
    click.echo("LLAMA MEM: llama.cpp's model + KV cache + compute buffers (one sequence); "
               "RSS+: peak resident memory over the process's peak before loading.")
