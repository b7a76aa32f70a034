"""``mathq quantize``: BF16 GGUF -> quantized variants with llama.cpp's quantizer."""

from __future__ import annotations

import re
from pathlib import Path

import click

from mathq.cli.common import build_dir_option, echo_json, json_option, quiet_option
from mathq.cli.render import progress_for
from mathq.cli.types import MAX_THREADS, FileOrName, InputFile, Int, OutputPath


def _ggml_type(type_name: str) -> str:
    from mathq.recipes.quants import UnknownQuantError, ggml_type_id

    try:
        ggml_type_id(type_name)
    except UnknownQuantError as e:
        raise click.BadParameter(str(e)) from None
    return type_name


def _parse_type(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    return None if value is None else _ggml_type(value)


def _parse_override(_ctx: click.Context, _param: click.Parameter,
                    values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for value in values:
        pattern, sep, type_name = value.rpartition("=")
        if not sep or not pattern or not type_name:
            raise click.BadParameter(f"expected PATTERN=TYPE, got {value!r}")
        try:  # llama.cpp compiles it as a std::regex, which rejects what Python's re does
            re.compile(pattern)
        except re.error as e:
            raise click.BadParameter(f"{pattern!r} is not a regular expression ({e})") from None
        pairs.append((pattern, _ggml_type(type_name)))
    return tuple(pairs)


@click.command()
@click.argument("source", metavar="RECIPE|GGUF", type=FileOrName())
@click.option("--quant", "-Q", "quant_list", metavar="TYPES",
              help="Comma-separated types, e.g. Q4_K_M,Q5_K_M (default: the recipe's variants, "
                   "or Q4_K_M for a GGUF). See `mathq quants`. A -imat suffix (Q4_K_M-imat) "
                   "uses the build's importance matrix when --imatrix is not given.")
@click.option("--imatrix", type=InputFile(),
              help="Importance matrix from `mathq imatrix` or llama-imatrix (GGUF or legacy "
                   ".dat format); outputs are named <QUANT>-imat.")
@click.option("--output-tensor-type", metavar="TYPE", callback=_parse_type,
              help="ggml type for output.weight, e.g. Q8_0 (llama-quantize's option).")
@click.option("--token-embedding-type", metavar="TYPE", callback=_parse_type,
              help="ggml type for token_embd.weight, e.g. Q8_0.")
@click.option("--tensor-type", "overrides", multiple=True, metavar="PATTERN=TYPE",
              callback=_parse_override,
              help="Per-tensor type override by regex, repeatable, e.g. 'attn_v=Q8_0'.")
@click.option("--tensor-type-file", type=InputFile(),
              help="Overrides from a file of PATTERN=TYPE lines, as llama-quantize "
                   "--tensor-type-file reads it (e.g. the .overrides.txt of `mathq tune`).")
@click.option("--allow-requantize", is_flag=True,
              help="Accept an already quantized input (loses more quality).")
@click.option("--threads", type=Int(0, MAX_THREADS), default=0, show_default=True,
              help="Quantization threads; 0 uses every core.")
@click.option("--out-dir", type=OutputPath(folder=True),
              help="Where to write the files (default: next to the input).")
@build_dir_option
@quiet_option
@json_option
def quantize(source: str, quant_list: str | None, imatrix: Path | None,
             output_tensor_type: str | None, token_embedding_type: str | None,
             overrides: tuple[tuple[str, str], ...], tensor_type_file: Path | None,
             allow_requantize: bool, threads: int,
             out_dir: Path | None, build_dir: Path | None, quiet: bool, as_json: bool) -> None:
    """Quantize a BF16 GGUF into llama.cpp's types (Q4_K_M, Q5_K_M, Q6_K, Q8_0, ...).

    Uses llama.cpp's own quantizer in process, with the parameters llama-quantize would
    use, so the files match what the upstream tool writes. Each output is checked (file
    type, tensor count) and loaded by llama.cpp before it is renamed into place.

    RECIPE|GGUF is a recipe name or file (input: build/<model>/<model>-BF16.gguf from
    `mathq convert`) or the path of a BF16/F16/F32 GGUF. A file made with an importance
    matrix is named <model>-<QUANT>-imat.gguf, so it sits beside the plain one.

    \b
    Examples:
      mathq quantize deepseek-math-7b-rl
      mathq quantize deepseek-math-7b-rl --quant Q5_K_M,Q6_K
      mathq quantize model-BF16.gguf -Q IQ3_XXS --imatrix math.imatrix.gguf
      mathq quantize deepseek-math-7b-rl -Q Q4_K_M-imat     # after `mathq imatrix`
      mathq quantize model-BF16.gguf -Q Q4_K_M --tensor-type 'attn_v=Q8_0'
      mathq quantize model-BF16.gguf -Q Q4_K_M --tensor-type-file model-Q4_K_M-tuned.overrides.txt
    """
    from mathq.quantize.core import QuantizeOptions, read_tensor_type_file
    from mathq.quantize.stage import quantize_variants, resolve_quantize_input, variant_imatrix
    from mathq.recipes.quants import Variant, parse_variant_list

    if tensor_type_file is not None:
        overrides += read_tensor_type_file(tensor_type_file)
    job = resolve_quantize_input(source, build_dir)
    variants = (parse_variant_list(quant_list) if quant_list is not None
                else tuple(Variant(q) for q in job.default_quants))
    options = [QuantizeOptions(quant=v.quant, imatrix=variant_imatrix(v, job, imatrix, source),
                               output_tensor_type=output_tensor_type,
                               token_embedding_type=token_embedding_type, overrides=overrides,
                               allow_requantize=allow_requantize, threads=threads)
               for v in variants]
    results = quantize_variants(job, options, out_dir, progress_for(quiet))
    if as_json:
        echo_json(results)
        return
    for r in results:
        click.echo(f"{r.quant:<8} {r.size / 2**30:7.3f} GiB  {r.bits_per_weight:5.2f} bpw  "
                   f"{r.seconds:6.1f}s  {r.path}")
