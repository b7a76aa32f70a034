"""``mathq recipes`` and ``mathq quants``: what can be built, and into which types."""

from __future__ import annotations

import click

from mathq.cli.common import echo_json, json_option
from mathq.cli.types import FileOrName
from mathq.recipes.quants import QUANT_TYPES
from mathq.recipes.recipe import bundled_recipe_names, load_recipe, resolve_recipe_path


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
def recipes(ctx: click.Context, as_json: bool) -> None:
    """List the bundled recipes (one TOML file per model).

    A recipe names the Hugging Face repo and revision, the prompt format, the quantized
    variants to build, the Ollama tags and the smoke-test settings. Every command that
    takes RECIPE accepts a bundled name or the path of your own TOML file.

    \b
    Examples:
      mathq recipes
      mathq recipes show deepseek-math-7b-rl
      mathq recipes show ./my-recipe.toml --json
    """
    if ctx.invoked_subcommand is not None:
        return
    loaded = [load_recipe(name) for name in bundled_recipe_names()]
    if as_json:
        echo_json([{"name": r.name, "path": r.path, "hf_repo": r.model.hf_repo,
                    "kind": r.model.kind, "variants": r.quants.variants} for r in loaded])
        return
    for r in loaded:
        source = r.model.hf_repo or str(r.model.local_dir)
        click.echo(f"{r.name:<26} {r.model.kind:<5} {source:<36} {','.join(r.quants.variants)}")


@recipes.command()
@click.argument("recipe", type=FileOrName())
@json_option
def show(recipe: str, as_json: bool) -> None:
    """Print one recipe: its TOML as written, or validated values with --json.

    RECIPE is a bundled name (see `mathq recipes`) or a path to a TOML file.
    The recipe is validated first, so a broken file is reported, not printed.
    """
    loaded = load_recipe(recipe)
    if as_json:
        echo_json(loaded)
        return
    path = resolve_recipe_path(recipe)
    click.echo(f"# {path}")
    click.echo(path.read_text(encoding="utf-8"), nl=False)


@click.command()
@json_option
def quants(as_json: bool) -> None:
    """List every quantization type mathq can produce through llama.cpp.

    BPW is the nominal bits per weight of the type's main tensors (mixes such as Q4_K_M
    keep a few tensors wider). IMATRIX marks types llama.cpp refuses to make without an
    importance matrix (required; see `mathq quantize --imatrix`) and those a matrix
    improves most (helps: 4 bits and below), which `mathq build --imatrix` also makes as
    <QUANT>-imat.
    """
    if as_json:
        echo_json(list(QUANT_TYPES))
        return
    click.echo(f"{'TYPE':<8} {'FTYPE':>5} {'BPW':>7}  {'IMATRIX':<8} DESCRIPTION")
    for q in QUANT_TYPES:
        mark = "required" if q.requires_imatrix else "helps" if q.imatrix_helps else ""
        click.echo(f"{q.name:<8} {q.ftype:>5} {q.bpw:>7.4g}  {mark:<8} {q.description}")
