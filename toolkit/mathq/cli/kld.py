"""``mathq kld``: KL divergence of each variant from the full-precision model, on math text."""

from __future__ import annotations

import dataclasses
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
from mathq.cli.render import progress_for
from mathq.cli.types import MAX_CHUNKS, MAX_TOKENS, FileOrName, InputFile, Int, OutputPath
from mathq.errors import shorten
from mathq.evaluate.kld import DEFAULT_CTX, REFERENCE_CHOICES
from mathq.inputs import file_problem


def _reference(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if value.upper() in REFERENCE_CHOICES:
        return value.upper()
    if is_gguf_path(value) or "/" in value:
        if (problem := file_problem(value)) is not None:
            raise click.BadParameter(f"{shorten(value)} {problem}")
        return value
    raise click.BadParameter(f"expected {' or '.join(REFERENCE_CHOICES)} (a variant of the "
                             f"recipe's build) or the path of a GGUF file, got {value!r}")


@click.command()
@click.argument("source", metavar="RECIPE|GGUF", type=FileOrName())
@click.option("--quant", "-Q", "quant_list", metavar="TYPES",
              help="Comma-separated variants to measure, e.g. Q4_K_M,Q4_K_M-imat (default: "
                   "the recipe's variants). Not with a GGUF path.")
@click.option("--reference", default="BF16", show_default=True, callback=_reference,
              metavar="BF16|Q8_0|GGUF",
              help="The model to compare with: a variant of the recipe's build (Q8_0 needs "
                   "half of BF16's memory), or, with a GGUF path, the reference GGUF file.")
@click.option("--corpus", type=InputFile(),
              help="UTF-8 text to measure on (default: the recipe's [kld] corpus, else "
                   "mathq's bundled math notes, about 10,000 tokens, kept apart from the smoke "
                   "problems).")
@click.option("--ctx-size", "-c", "n_ctx", type=Int(16, MAX_TOKENS), default=DEFAULT_CTX,
              show_default=True,
              help="Tokens per chunk; the second half of each chunk is scored.")
@click.option("--chunks", type=Int(1, MAX_CHUNKS), default=None,
              help="Use at most this many chunks (default: the whole corpus).")
@threads_option
@gpu_layers_option
@click.option("--out-dir", type=OutputPath(folder=True), default=None,
              help="With a GGUF path: where the reference pass is cached and <name>.json "
                   "written (default: a kld/ folder beside the reference GGUF).")
@build_dir_option
@quiet_option
@json_option
def kld(source: str, quant_list: str | None, reference: str, corpus: Path | None, n_ctx: int,
        chunks: int | None, threads: int, gpu_layers: int | None, out_dir: Path | None,
        build_dir: Path | None, quiet: bool, as_json: bool) -> None:
    """Measure each variant's KL divergence from the full-precision model.

    A few hundred MATH problems cannot tell Q6_K from Q8_0; comparing next-token
    distributions with the BF16 model's over a few thousand positions of math text can, in
    minutes. The statistics are llama-perplexity's --kl-divergence ones: mean KLD with its
    uncertainty, percentiles, the share of positions whose top token is unchanged, and the
    RMS change in the probability of the text's next token.

    The reference pass runs once and is cached in build/<model>/kld/ (in
    llama-perplexity's --kl-divergence-base format) until the reference file, the text or
    the chunking change. Results go to build/<model>/kld/<QUANT>.json for `mathq report`.
    The text is the recipe's `[kld] corpus` (mathq's bundled math notes unless the recipe
    names its own), or --corpus.

    RECIPE|GGUF may also be the path of any GGUF file, compared with --reference FILE, as
    `llama-perplexity -m FILE --kl-divergence` would.

    \b
    Examples:
      mathq kld deepseek-math-7b-rl
      mathq kld deepseek-math-7b-rl --quant Q4_K_M,Q6_K
      mathq kld deepseek-math-7b-rl --reference Q8_0       # when BF16 does not fit
      mathq kld deepseek-math-7b-rl --corpus math-train.txt --chunks 40
      mathq kld model-Q4_K_M.gguf --reference model-BF16.gguf
    """
    from mathq.evaluate.kld.measure import KldOptions
    from mathq.evaluate.stage import run_kld, run_kld_files
    from mathq.recipes.quants import parse_variant_list

    options = KldOptions(corpus=corpus, n_ctx=n_ctx, max_chunks=chunks, threads=threads,
                         gpu_layers=gpu_layers)
    if is_gguf_path(source):
        if quant_list:
            raise click.UsageError("--quant picks a recipe's variants; a GGUF path is one file")
        if reference in REFERENCE_CHOICES:
            raise click.UsageError("a GGUF path needs the reference as a file too: "
                                   "--reference path/to/model-BF16.gguf")
        folder = out_dir or Path(reference).parent / "kld"
        run = run_kld_files([Path(source)], Path(reference), folder, options,
                            progress_for(quiet))
    else:
        if reference not in REFERENCE_CHOICES:
            raise click.UsageError(f"with a recipe, --reference is one of its variants "
                                   f"({', '.join(REFERENCE_CHOICES)}), not a file")
        if out_dir is not None:
            raise click.UsageError("--out-dir is for a GGUF path; a recipe's results go to "
                                   "build/<model>/kld/")
        quants = (tuple(v.name for v in parse_variant_list(quant_list))
                  if quant_list is not None else None)
        options = dataclasses.replace(options, reference=reference)
        run = run_kld(source, quants, options, build_dir, progress_for(quiet))
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
