"""``mathq bench``: each variant's speed, memory and batching headroom, llama-bench's way."""

from __future__ import annotations

from pathlib import Path

import click

from mathq.cli.common import (
    build_dir_option,
    echo_json,
    gpu_layers_option,
    json_option,
    quiet_option,
    threads_option,
)


def _parallel_list(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected numbers like 1,4,8, got {value!r}") from None
    if any(v < 1 for v in values):
        raise click.BadParameter("sequence counts must be at least 1")
    return values


@click.command()
@click.argument("recipe")
@click.option("--quant", "-Q", "quant_list", metavar="TYPES",
              help="Comma-separated variants, e.g. Q4_K_M,Q8_0 or Q4_K_M-imat (default: the "
                   "recipe's).")
@click.option("--n-prompt", "-p", type=click.IntRange(min=0), default=512, show_default=True,
              help="Prompt-processing test size in tokens (llama-bench's pp512; 0 skips it).")
@click.option("--n-gen", "-n", type=click.IntRange(min=0), default=128, show_default=True,
              help="Generation test size in tokens (llama-bench's tg128; 0 skips it).")
@click.option("--repetitions", "-r", type=click.IntRange(min=1), default=5, show_default=True,
              help="Repetitions of each test after one warm-up run.")
@click.option("--parallel", "parallel", default="1,4,8", show_default=True,
              callback=_parallel_list, metavar="LIST",
              help="Sequence counts for aggregate generation throughput ('' skips it).")
@threads_option
@gpu_layers_option
@build_dir_option
@quiet_option
@json_option
def bench(recipe: str, quant_list: str | None, n_prompt: int, n_gen: int, repetitions: int,
          parallel: tuple[int, ...], threads: int, gpu_layers: int | None,
          build_dir: Path | None, quiet: bool, as_json: bool) -> None:
    """Measure each variant's speed: prompt processing, generation, batching, memory.

    The method is llama-bench's (pp512 and tg128 with random tokens, one warm-up run, five
    repetitions, mean +- sd) plus llama-batched-bench's aggregate generation throughput
    for 1, 4 and 8 sequences decoded together, which is what `mathq smoke --parallel`
    gains. Each variant runs in its own process, so its peak memory (RSS) is its own.
    With a GPU build (make install CUDA=1) every layer is offloaded unless --gpu-layers
    says otherwise, and the device, the layers offloaded and the GPU memory taken are
    recorded. Summaries go to build/<model>/bench/<QUANT>.json.

    \b
    Examples:
      mathq bench deepseek-math-7b-rl --quant Q4_K_M,Q8_0
      mathq bench deepseek-math-7b-rl -Q Q4_K_M -r 3 --parallel 1,2,4,8,16
      mathq bench deepseek-math-7b-rl -Q Q6_K --gpu-layers 99 --json
    """
    from mathq.cli.render import progress_for
    from mathq.evaluate.bench import BenchOptions
    from mathq.evaluate.stage import run_bench
    from mathq.recipes.recipe import load_recipe

    rec = load_recipe(recipe)
    quants = list(rec.variant_names(quant_list))
    options = BenchOptions(n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions,
                           parallel=parallel, threads=threads, gpu_layers=gpu_layers)
    outcomes = run_bench(rec, quants, options, build_dir, progress_for(quiet))
    if as_json:
        echo_json(outcomes)
        return
    width = max([8, *(len(o.quant) for o in outcomes)])  # Q4_K_M-imat is 11 wide
    click.echo(f"{'QUANT':<{width}} {'SIZE':>9} {'BPW':>5} {'PP t/s':>15} {'TG t/s':>13} "
               f"{'LOAD':>6} {'PEAK RSS':>9}  AGGREGATE TG t/s BY P  (DEVICE)")
    for o in outcomes:
        s = o.summary
        pp = (f"{s.prompt_tokens_per_second.mean:.1f} +- {s.prompt_tokens_per_second.sd:.1f}"
              if s.prompt_tokens_per_second else "-")
        tg = (f"{s.generation_tokens_per_second.mean:.2f} +- "
              f"{s.generation_tokens_per_second.sd:.2f}"
              if s.generation_tokens_per_second else "-")
        rss = f"{s.peak_rss_bytes / 2**30:.2f} GiB" if s.peak_rss_bytes else "-"
        load = f"{s.load_seconds:.1f}s" if s.load_seconds is not None else "-"
        agg = ", ".join(f"P={p} {v:.1f}" for p, v in s.throughput_by_parallel.items())
        where = s.device or "CPU"
        if s.gpu_layers:
            where += f", {s.gpu_layers}/{s.offloadable_layers} layers"
        if s.vram_bytes is not None:
            where += f", {s.vram_bytes / 2**30:.2f} GiB VRAM"
        click.echo(f"{o.quant:<{width}} {s.file_size / 2**30:6.2f} GiB {s.bits_per_weight:5.2f} "
                   f"{pp:>15} {tg:>13} {load:>6} {rss:>9}  {agg}  ({where})")
