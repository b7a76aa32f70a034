"""``mathq convert``: a Hugging Face checkpoint (or a recipe's download) to a verified GGUF."""

from __future__ import annotations

from pathlib import Path

import click

from mathq.cli.common import build_dir_option, echo_json, json_option, quiet_option
from mathq.cli.render import progress_for
from mathq.cli.types import FileOrName, OutputPath
from mathq.fsutil import format_bytes

# Must equal mathq.convert.OUTTYPES (a test checks); spelled out so --help stays fast.
OUTTYPE_CHOICES = ("bf16", "f16", "f32")


@click.command()
@click.argument("source", metavar="RECIPE|HF_DIR", type=FileOrName(folder_ok=True))
@click.option(
    "--outtype",
    type=click.Choice(OUTTYPE_CHOICES),
    default="bf16",
    show_default=True,
    help="Type of the 2-D weights; bf16 is lossless for DeepSeek-Math's checkpoints. "
    "Norms are always f32.",
)
@click.option(
    "--out",
    "out",
    type=OutputPath(folder=False),
    default=None,
    help="Output file (default: <name>-BF16.gguf in the build folder for a recipe, "
    "in the current folder for HF_DIR).",
)
@click.option(
    "--pre-tokenizer",
    metavar="NAME",
    default=None,
    help="llama.cpp's pre-tokenizer name (e.g. deepseek-llm), when tokenizer.json's "
    "pre_tokenizer is not recognised; overrides the recipe's.",
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="Skip the checks after writing (tensor index reread, llama.cpp vs "
    "tokenizers tokenization).",
)
@build_dir_option
@quiet_option
@json_option
def convert(
    source: str,
    outtype: str,
    out: Path | None,
    pre_tokenizer: str | None,
    no_verify: bool,
    build_dir: Path | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Convert a Hugging Face LLaMA checkpoint to GGUF, losslessly, and verify it.

    Tensors stream one at a time from memory-mapped safetensors (bf16 weights are copied
    byte for byte, q/k rows permuted for llama.cpp's RoPE), so memory stays flat. The
    metadata is what llama.cpp's converter writes. Afterwards llama.cpp loads the file's
    vocabulary and must tokenize math, LaTeX, Chinese and special tokens exactly as
    tokenizer.json does; only then is the file renamed into place.

    RECIPE converts the recipe's download (build/<model>/hf) into its build folder and
    records it in manifest.json; HF_DIR converts any LlamaForCausalLM folder.

    \b
    Examples:
      mathq convert deepseek-math-7b-rl
      mathq convert ./deepseek-math-7b-base --out base-bf16.gguf
      mathq convert ./my-llama --pre-tokenizer deepseek-llm --outtype f16
    """
    from mathq.convert.converter import OUTTYPES, ConvertOptions, convert_checkpoint
    from mathq.convert.stage import convert_recipe
    from mathq.recipes.recipe import load_recipe

    options = ConvertOptions(outtype=outtype, pre_tokenizer=pre_tokenizer, verify=not no_verify)
    progress = progress_for(quiet or as_json)
    as_dir = Path(source)
    if as_dir.is_dir():
        target = out or Path.cwd() / f"{as_dir.resolve().name}-{OUTTYPES[outtype].label}.gguf"
        result = convert_checkpoint(as_dir, target, options, progress)
    else:
        result = convert_recipe(load_recipe(source), options, build_dir, out, progress)
    if hasattr(progress, "close"):
        progress.close()
    if as_json:
        echo_json(result)
        return
    v = result.verification
    click.echo(
        f"Wrote {result.path} ({format_bytes(result.file_size)}, {result.n_tensors} "
        f"tensors: {result.copied_tensors} copied, {result.transformed_tensors} "
        f"transformed) in {result.seconds:.1f}s"
    )
    click.echo(
        f"pre-tokenizer {result.pre_tokenizer} (from {result.pre_tokenizer_source}), "
        f"{result.n_real_tokens} tokens padded to {result.n_vocab}"
    )
    if v is None:
        click.echo("not verified (--no-verify)")
    else:
        click.echo(
            f"verified: {v.tensors_checked} tensors reread; llama.cpp and tokenizers "
            f"agree on {v.tokens_compared} tokens of {v.texts_checked} check texts"
        )
