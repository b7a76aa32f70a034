"""``mathq imatrix``: a math-calibrated importance matrix, computed in process."""

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
from mathq.cli.render import progress_for
from mathq.cli.types import MAX_CHUNKS, MAX_TOKENS, SEED, FileOrName, Int, OutputPath
from mathq.quantize.calibration import DEFAULT_CALIBRATION


@click.command()
@click.argument("source", metavar="RECIPE|GGUF", type=FileOrName())
@click.option("--calibration", "-c", metavar="FILE|SET", type=FileOrName(),
              default=DEFAULT_CALIBRATION,
              show_default=True,
              help="Calibration text: a named Hub set (math-train, gsm8k-train), a problem "
                   "file (.jsonl, MATH or GSM8K format) or a plain text file (.txt).")
@click.option("--chunks", type=Int(1, MAX_CHUNKS), default=100, show_default=True,
              help="Chunks of --ctx tokens to evaluate (fewer if the text is shorter).")
@click.option("--all-chunks", is_flag=True, help="Evaluate every whole chunk of the text.")
@click.option("--ctx", "n_ctx", type=Int(16, MAX_TOKENS), default=512, show_default=True,
              help="Tokens per chunk (llama-imatrix's --ctx-size).")
@click.option("--smoke-suite", metavar="SUITE|FILE", type=FileOrName(),
              help="Problem set whose problems must stay out of the text (default: the "
                   "recipe's smoke suite, or math500 for a GGUF).")
@click.option("--plain", is_flag=True,
              help="Lay problems out as bare problem/solution text instead of the recipe's "
                   "prompt format.")
@click.option("--process-output", is_flag=True,
              help="Also collect output.weight (llama-imatrix leaves it out by default).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Shuffle of the problems taken from the calibration set.")
@threads_option
@gpu_layers_option
@click.option("--out", "-o", type=OutputPath(folder=False),
              help="Output file (default: build/<model>/<model>.imatrix.gguf, or beside the "
                   "GGUF).")
@click.option("--force", is_flag=True,
              help="Recompute even when the build manifest says the matrix is up to date.")
@build_dir_option
@quiet_option
@json_option
def imatrix(source: str, calibration: str, chunks: int, all_chunks: bool, n_ctx: int,
            smoke_suite: str | None, plain: bool, process_output: bool, seed: int,
            threads: int, gpu_layers: int | None, out: Path | None, force: bool,
            build_dir: Path | None, quiet: bool, as_json: bool) -> None:
    """Compute an importance matrix for a model on math text, without leaving Python.

    Importance-matrix quants (IQ2/IQ3, and better Q2_K-Q4_K) spend their bits where a
    model's activations are large; generic-text matrices miss what math looks like. This
    runs the BF16 (or Q8_0) GGUF in llama.cpp over math problems with worked solutions,
    in the recipe's own prompt format, and writes llama.cpp's GGUF imatrix file, which
    `mathq quantize --imatrix` and `llama-quantize --imatrix` both take. Problems of the
    smoke suite are dropped from the text (a plain text file holding one is refused), and
    the exact text used is saved beside the matrix (.imatrix.txt).

    \b
    Examples:
      mathq imatrix deepseek-math-7b-rl
      mathq imatrix deepseek-math-7b-rl --calibration gsm8k-train --chunks 200
      mathq imatrix model-BF16.gguf --calibration notes.txt --ctx 512 --out math.imatrix.gguf
      mathq quantize deepseek-math-7b-rl -Q IQ3_XXS \\
          --imatrix build/deepseek-math-7b-rl/deepseek-math-7b-rl.imatrix.gguf
    """
    from mathq.quantize.imatrix import ImatrixOptions
    from mathq.quantize.stage import resolve_imatrix_input, run_imatrix

    job = resolve_imatrix_input(source, build_dir, out=out, smoke_suite=smoke_suite,
                                plain=plain)
    options = ImatrixOptions(n_ctx=n_ctx, chunks=None if all_chunks else chunks,
                             process_output=process_output, threads=threads,
                             gpu_layers=gpu_layers)
    run = run_imatrix(job, calibration, options, seed=seed, force=force,
                      progress=progress_for(quiet))
    if as_json:
        echo_json(run)
        return
    r = run.result
    timing = "up to date, not recomputed" if run.reused else \
        f"{r.seconds:.1f}s, {r.tokens_per_second:,.0f} tok/s"
    click.echo(f"{r.path}: {r.n_entries} tensors, {r.chunks} chunks x {r.n_ctx} tokens "
               f"({timing})")
    dropped = (f"; {len(run.excluded)} dropped (graded by {run.smoke_suite})"
               if run.excluded else f"; none in {run.smoke_suite}")
    click.echo(f"calibration: {run.calibration_items} item(s) from {r.dataset}{dropped}; "
               f"text in {run.text_path}")
