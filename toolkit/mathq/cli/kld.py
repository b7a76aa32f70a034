"""``mathq kld``: KL divergence of each variant from the full-precision model, on math text."""

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
from mathq.evaluate.kld import DEFAULT_CTX, REFERENCE_CHOICES


@click.command()
@click.argument("recipe")
@click.option("--quant", "-Q", "quant_list", metavar="TYPES",
              help="Comma-separated variants to measure, e.g. Q4_K_M,Q4_K_M-imat (default: "
                   "the recipe's variants).")
@click.option("--reference", type=click.Choice(REFERENCE_CHOICES), default="BF16",
              show_default=True,
              help="The model to compare with; Q8_0 needs half of BF16's memory.")
@click.option("--corpus", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="UTF-8 text to measure on (default: mathq's bundled math notes, "
                   "about 10,000 tokens, kept apart from the smoke problems).")
@click.option("--ctx-size", "-c", "n_ctx", type=click.IntRange(min=16), default=DEFAULT_CTX,
              show_default=True,
              help="Tokens per chunk; the second half of each chunk is scored.")
@click.option("--chunks", type=click.IntRange(min=1), default=None,
              help="Use at most this many chunks (default: the whole corpus).")
@threads_option
@gpu_layers_option
@build_dir_option
@quiet_option
@json_option
def kld(recipe: str, quant_list: str | None, reference: str, corpus: Path | None, n_ctx: int,
        chunks: int | None, threads: int, gpu_layers: int | None, build_dir: Path | None,
        quiet: bool, as_json: bool) -> None:
    """Measure each variant's KL divergence from the full-precision model.

    A few hundred MATH problems cannot tell Q6_K from Q8_0; comparing next-token
    distributions with the BF16 model's over a few thousand positions of math text can, in
    minutes. The statistics are llama-perplexity's --kl-divergence ones: mean KLD with its
    uncertainty, percentiles, the share of positions whose top token is unchanged, and the
    RMS change in the probability of the text's next token.

    The reference pass runs once and is cached in build/<model>/kld/ (in
    llama-perplexity's --kl-divergence-base format) until the reference file, the text or
    the chunking change. Results go to build/<model>/kld/<QUANT>.json for `mathq report`.

    \b
    Examples:
      mathq kld deepseek-math-7b-rl
      mathq kld deepseek-math-7b-rl --quant Q4_K_M,Q6_K
      mathq kld deepseek-math-7b-rl --reference Q8_0       # when BF16 does not fit
      mathq kld deepseek-math-7b-rl --corpus math-train.txt --chunks 40
    """
    from mathq.evaluate.kld.measure import KldOptions
    from mathq.evaluate.stage import run_kld
    from mathq.recipes.quants import parse_variant_list

    quants = (tuple(v.name for v in parse_variant_list(quant_list))
              if quant_list is not None else None)
    options = KldOptions(reference=reference, corpus=corpus, n_ctx=n_ctx, max_chunks=chunks,
                         threads=threads, gpu_layers=gpu_layers)
    run = run_kld(recipe, quants, options, build_dir, progress_for(quiet))
    if as_json:
        echo_json(run)
        return
    ref = run.reference
    how = f"computed in {ref.seconds:.1f}s" if ref.computed else "reused from cache"
    click.echo(f"reference {ref.reference}: {ref.n_chunks} chunks of {ref.n_ctx} tokens, "
               f"{how} ({ref.path})")
    for s, path in zip(run.summaries, run.paths, strict=True):
        err = f" ± {s.mean_kld_err:.6f}" if s.mean_kld_err else ""
        click.echo(f"{s.quant:<8} KLD {s.mean_kld:.6f}{err}  99% {s.kld_percentiles['99']:.4f}"
                   f"  same top {100 * s.same_top.value:5.2f}%  RMS Δp "
                   f"{100 * s.rms_delta_p:.3f}%  ({s.n_tokens} positions)  {path}")
