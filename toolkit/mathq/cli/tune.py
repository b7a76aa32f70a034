"""``mathq tune``: the quantization mix with the lowest measured KL divergence for a budget."""

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
from mathq.cli.types import (
    MAX_CHUNKS,
    MAX_TOKENS,
    SEED,
    ByteSize,
    FileOrName,
    Float,
    InputFile,
    Int,
    OutputPath,
)
from mathq.quantize.calibration import DEFAULT_CALIBRATION
from mathq.tune.plan import DEFAULT_TYPES


@click.command()
@click.argument("source", metavar="RECIPE|BF16_GGUF", type=FileOrName())
@click.option("--match", metavar="QUANT",
              help="Budget: no larger than the stock file of this type, e.g. Q4_K_M.")
@click.option("--size", type=ByteSize(), help="Budget in bytes: 4.2GiB, 4200MB, 1879136.")
@click.option("--bpw", type=Float(1, 15.99),
              help="Budget in bits per weight of the whole model, e.g. 4.85 (below BF16's "
                   "16; the file is named T<bpw>, to two decimals).")
@click.option("--imatrix", type=InputFile(),
              help="Importance matrix to quantize with (and to weight the costs by).")
@click.option("--types", "types_list", metavar="TYPES",
              help="Candidate tensor types [default: the recipe's [tune] types, else "
                   f"{','.join(DEFAULT_TYPES)}].")
@click.option("--calibration", "-c", metavar="FILE|SET", type=FileOrName(),
              help="Text of the KLD probes, as `mathq imatrix -c` takes it; smoke problems "
                   "and passages of the held-out text are kept out of it [default: the "
                   f"recipe's [tune] calibration, else {DEFAULT_CALIBRATION}].")
@click.option("--probe-chunks", type=Int(1, MAX_CHUNKS), default=2, show_default=True,
              help="Chunks of --ctx-size tokens of calibration text: the probes read "
                   "them until their KLD is known to 10 %, and the importance matrix "
                   "weighting the costs is measured on them.")
@click.option("--corpus", type=InputFile(),
              help="Held-out text the tuned file's KLD is reported on (default: the "
                   "recipe's [kld] corpus, else mathq's math notes).")
@click.option("--ctx-size", "n_ctx", type=Int(16, MAX_TOKENS), default=512,
              show_default=True, help="Tokens per KLD chunk.")
@click.option("--smoke-suite", metavar="SUITE|FILE", type=FileOrName(),
              help="Problems that must stay out of the calibration text (default: the "
                   "recipe's smoke suite, or math500 for a GGUF).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Shuffle of the calibration problems.")
@threads_option
@gpu_layers_option
@click.option("--out-dir", type=OutputPath(folder=True),
              help="Where to write a GGUF input's tuned file (default: beside it).")
@build_dir_option
@quiet_option
@json_option
def tune(source: str, match: str | None, size: int | None, bpw: float | None,
         imatrix: Path | None, types_list: str | None, calibration: str | None, probe_chunks: int,
         corpus: Path | None, n_ctx: int, smoke_suite: str | None, seed: int, threads: int,
         gpu_layers: int | None, out_dir: Path | None, build_dir: Path | None, quiet: bool,
         as_json: bool) -> None:
    """Choose a type for every tensor: the lowest KL divergence that fits a size budget.

    Stock mixes spend bits by a fixed rule written for general text. tune measures this
    model: each tensor's error in each candidate type (ggml's own quantizer, weighted by an
    importance matrix), one real KLD probe per tensor group to turn error into KLD (up to 8
    of the group's layers quantized in a split copy of the BF16 model: no model file per
    probe), then the budget spent where a byte saves the most. The file is written by
    llama.cpp's quantizer with one --tensor-type override per tensor (saved as
    <file>.overrides.txt, which `llama-quantize --tensor-type-file` reproduces) and its KLD
    is measured on held-out text (in a build folder, saved as `mathq kld`'s measurement of
    it). The record (<file>.tune.json) says where the time went. A killed run keeps the
    probes it finished.

    \b
    Examples:
      mathq tune deepseek-math-7b-rl --match Q4_K_M        # -> ...-Q4_K_M-tuned.gguf
      mathq tune deepseek-math-7b-rl --bpw 4.85 --imatrix m.imatrix.gguf
      mathq tune model-BF16.gguf --size 4.2GiB -c notes.txt --corpus heldout.txt
      mathq tune tiny-demo --match Q2_K -c models/tiny-demo/problems.jsonl
    """
    from mathq.evaluate.kld.measure import KldOptions
    from mathq.tune.plan import parse_types
    from mathq.tune.search import Budget, TuneOptions
    from mathq.tune.stage import resolve_tune, tune_and_record

    given = [o for o, v in (("--match", match), ("--size", size), ("--bpw", bpw))
             if v is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one budget: --match, --size or --bpw"
                               + (f" (got {', '.join(given)})" if given else ""))
    if match is not None:
        from mathq.recipes.quants import get_quant

        match = get_quant(match).name
    budget = Budget(match=match, size=size, bpw=bpw)
    types = parse_types(types_list) if types_list is not None else None
    options = TuneOptions(budget=budget, imatrix=imatrix, types=types, calibration=calibration,
                          probe_chunks=probe_chunks, seed=seed, threads=threads,
                          kld=KldOptions(corpus=corpus, n_ctx=n_ctx, threads=threads,
                                         gpu_layers=gpu_layers))
    job, options, layout = resolve_tune(source, options, build_dir, out_dir, smoke_suite)
    result = tune_and_record(job, options, layout, progress_for(quiet))
    if as_json:
        echo_json(result)
        return
    k = result.kld
    click.echo(f"{result.name}: {result.size:,} bytes (budget {result.budget:,}), mean KLD "
               f"{k.mean_kld:.4f} ± {k.mean_kld_err:.4f} on {k.corpus} "
               f"(predicted {result.predicted_kld:.4f})")
    click.echo(f"{result.path}\n{result.overrides}\n{result.record}")
