"""``mathq smoke``: MATH problems through each variant, graded, with speed; resumable."""

from __future__ import annotations

from pathlib import Path

import click

from mathq.cli.common import (
    build_dir_option,
    check_url,
    echo_json,
    gpu_layers_option,
    is_gguf_path,
    json_option,
    parallel_option,
    quiet_option,
    threads_option,
)
from mathq.cli.types import (
    MAX_PROBLEMS,
    MAX_SECONDS,
    MAX_TOKENS,
    SEED,
    FileOrName,
    Float,
    Int,
    OutputPath,
)
from mathq.evaluate.grading.equivalence import DEFAULT_TIMEOUT_S
from mathq.evaluate.summaries import Rate


def _pct(r: Rate) -> str:
    return f"{100 * r.value:5.1f}% ({r.k}/{r.n}, 95% CI {100 * r.low:.1f}-{100 * r.high:.1f})"


@click.command()
@click.argument("source", metavar="RECIPE|GGUF", type=FileOrName())
@click.option("--recipe", "recipe_for_gguf", metavar="RECIPE", type=FileOrName(),
              default=None,
              help="With a GGUF path: the recipe whose prompt format, problems and token limit "
                   "to use, e.g. deepseek-math-7b-rl.")
@click.option("--quant", "-Q", "quant_list", metavar="TYPES",
              help="Comma-separated variants, e.g. Q4_K_M,Q8_0 or Q4_K_M-imat (default: the "
                   "recipe's). Not with a GGUF path.")
@click.option("--suite", metavar="SUITE|FILE", type=FileOrName(), default=None,
              help="Problem set: a suite name (`mathq problems`) or a JSONL file "
                   "(default: the recipe's, math500).")
@click.option("--n", "n", type=Int(0, MAX_PROBLEMS), default=None,
              help="Problems to take, keeping the subject and level mix (default: the "
                   "recipe's; 0: all).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the subset; the same seed picks the same problems everywhere.")
@click.option("--subject", "subjects", multiple=True,
              help="Only this subject (repeatable).")
@click.option("--level", "levels", type=Int(1, 5), multiple=True,
              help="Only this MATH level, 1-5 (repeatable).")
@click.option("--max-tokens", type=Int(1, MAX_TOKENS), default=None,
              help="New tokens per answer at most (default: the recipe's, 1024).")
@parallel_option
@threads_option
@gpu_layers_option
@click.option("--ollama", "ollama_url", metavar="URL", default=None, callback=check_url,
              help="Test the recipe's Ollama tags on this server instead, e.g. "
                   "http://127.0.0.1:11434.")
@click.option("--endpoint", "endpoints", metavar="URL", multiple=True, callback=check_url,
              help="OpenAI-compatible server (llama-server, vLLM) to use instead; repeat to "
                   "spread the problems over several.")
@click.option("--served-model", metavar="NAME", default=None,
              help="Model name to ask the servers for (default: the recipe's Ollama name, or "
                   "the first one /v1/models lists).")
@click.option("--timeout", "timeout_s", type=Float(1, MAX_SECONDS), default=600.0,
              show_default=True, help="Seconds a server may take for one answer.")
@click.option("--grade-timeout", "grade_timeout_s", type=Float(0.1, MAX_SECONDS),
              default=DEFAULT_TIMEOUT_S, show_default=True,
              help="Seconds one answer comparison may take (an overrun counts as wrong).")
@click.option("--ignore-eos", is_flag=True,
              help="Generate exactly --max-tokens tokens per answer, never stopping at EOS "
                   "or a stop string (llama.cpp's --ignore-eos): for speed measurements on "
                   "models with random weights; accuracy is then meaningless.")
@click.option("--no-draft", "no_draft", is_flag=True,
              help="Decode one token per step. By default llama.cpp in process also checks "
                   "drafted tokens in batches (BF16's answer to the same problem, and text "
                   "from the prompt): the same greedy answers in fewer steps.")
@click.option("--restart", is_flag=True,
              help="Discard earlier results of these variants instead of resuming them.")
@click.option("--out-dir", type=OutputPath(folder=True), default=None,
              help="Write results and summaries here instead of build/<model>/smoke/ (with a "
                   "GGUF path: default a smoke/ folder beside it).")
@build_dir_option
@quiet_option
@json_option
def smoke(source: str, recipe_for_gguf: str | None, quant_list: str | None, suite: str | None,
          n: int | None, seed: int, subjects: tuple[str, ...], levels: tuple[int, ...],
          max_tokens: int | None,
          parallel: int, threads: int, gpu_layers: int | None, ollama_url: str | None,
          endpoints: tuple[str, ...], served_model: str | None, timeout_s: float,
          grade_timeout_s: float, ignore_eos: bool, no_draft: bool, restart: bool,
          out_dir: Path | None,
          build_dir: Path | None, quiet: bool, as_json: bool) -> None:
    """Smoke-test variants on MATH: greedy answers, graded, with accuracy and speed.

    Each problem gets the recipe's exact prompt (DeepSeek's chat format and chain-of-thought
    suffix, or the 4-shot format for the base model), is answered greedily up to
    --max-tokens new tokens, stopping at EOS or a stop string, and is graded at once.
    llama.cpp runs in this process and decodes --parallel problems together in one
    context, taking the next problem as soon as one ends; with a GPU build every layer is
    offloaded and `auto` fits as many sequences as the free GPU memory holds. Results go to
    build/<model>/smoke/<QUANT>.jsonl (one line per problem, written as it is graded) and
    <QUANT>.summary.json (accuracy with a 95% interval, by subject and level, tokens/s,
    the paper's figure). Interrupted? Run the same command again: finished problems are
    kept and only the rest are asked.

    In process, each step also checks drafted tokens in one batch and keeps those the model
    would have chosen: BF16's answer to the same problem (its results in the build folder
    or --out-dir) while the variant's text follows it, and n-grams of the prompt and the
    answer so far. The number checked adapts to how often drafts are kept and to what rows
    cost; the summary records drafted and kept tokens. --no-draft turns it off.

    RECIPE|GGUF may also be the path of any GGUF file (as `llama-bench -m` takes one), with
    --recipe naming the prompt format and problems to use; its results are named after the
    file.

    \b
    Examples:
      mathq smoke deepseek-math-7b-rl --quant Q4_K_M --n 100
      mathq smoke deepseek-math-7b-rl -Q Q4_K_M,Q8_0 --n 500 --parallel 16 --gpu-layers 20
      mathq smoke deepseek-math-7b-rl --ollama http://127.0.0.1:11434 --parallel 4
      mathq smoke deepseek-math-7b-rl --endpoint http://gpu1:8080 --endpoint http://gpu2:8080
      mathq smoke model-Q4_K_M.gguf --recipe deepseek-math-7b-rl --n 100
    """
    from mathq.cli.render import progress_for
    from mathq.evaluate.backends.base import BackendSpec
    from mathq.evaluate.smoke import SmokeOptions
    from mathq.evaluate.stage import run_smoke, run_smoke_files
    from mathq.recipes.recipe import load_recipe

    if ollama_url and endpoints:
        raise click.UsageError("--ollama and --endpoint are different backends; give one")
    if gpu_layers is not None and (ollama_url or endpoints):
        raise click.UsageError("--gpu-layers is for llama.cpp in process; a server has its own")
    if ignore_eos and (ollama_url or endpoints):
        raise click.UsageError("--ignore-eos is for llama.cpp in process")
    kind = "ollama" if ollama_url else "openai" if endpoints else "llama"
    spec = BackendSpec(kind=kind, urls=(ollama_url,) if ollama_url else endpoints,
                       model=served_model, parallel=parallel, threads=threads,
                       gpu_layers=gpu_layers, timeout_s=timeout_s, ignore_eos=ignore_eos,
                       draft=not no_draft)
    gguf = Path(source) if is_gguf_path(source) else None
    if gguf is not None:
        if recipe_for_gguf is None:
            raise click.UsageError("a GGUF path needs --recipe NAME for its prompt format and "
                                   "problems, e.g. --recipe deepseek-math-7b-rl")
        if quant_list:
            raise click.UsageError("--quant picks a recipe's variants; a GGUF path is one file")
        if kind != "llama":
            raise click.UsageError("a GGUF path is run by llama.cpp in process; --ollama and "
                                   "--endpoint test served models")
        if not gguf.is_file():
            raise click.BadParameter(f"{gguf} not found", param_hint="RECIPE|GGUF")
    elif recipe_for_gguf is not None:
        raise click.UsageError("--recipe is for a GGUF path; RECIPE is already a recipe")
    rec = load_recipe(recipe_for_gguf or source)
    options = SmokeOptions(suite=suite, n=n, seed=seed, subjects=subjects, levels=levels,
                           max_tokens=max_tokens, backend=spec, restart=restart,
                           grade_timeout_s=grade_timeout_s, out_dir=out_dir)
    if gguf is not None:
        outcomes = run_smoke_files([gguf], rec, options, build_dir, progress_for(quiet))
    else:
        quants = list(rec.variant_names(quant_list))
        outcomes = run_smoke(rec, quants, options, build_dir, progress_for(quiet))
    if as_json:
        echo_json(outcomes)
        return
    for o in outcomes:
        s = o.summary
        ref = (f", paper {s.reference_accuracy:.1f}%" if s.reference_accuracy is not None
               else "")
        speed = (f"{s.generation_tokens_per_second:.1f} tok/s"
                 if s.generation_tokens_per_second else "- tok/s")
        if s.drafted_tokens:
            speed += (f"  drafts {100 * (s.accepted_tokens or 0) / s.drafted_tokens:.0f}% "
                      f"kept, {s.tokens_per_step or 0:.2f} tok/step")
        resumed = f", {o.resumed} resumed" if o.resumed else ""
        click.echo(f"{o.quant:<8} {_pct(s.accuracy)}{ref}  {speed}  P={s.parallel}  "
                   f"{s.wall_seconds:.0f}s ({o.answered} answered{resumed})  {o.results}")
