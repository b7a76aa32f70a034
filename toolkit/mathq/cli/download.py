"""``mathq download``: fetch a recipe's checkpoint from the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import click

from mathq.cli.common import build_dir_option, echo_json, json_option, quiet_option
from mathq.cli.render import progress_for
from mathq.cli.types import FileOrName, OutputPath
from mathq.fsutil import format_bytes


@click.command()
@click.argument("recipe", type=FileOrName())
@click.option("--revision", metavar="REV",
              help="Branch, tag or commit to fetch instead of the recipe's revision.")
@click.option("--dir", "dest", metavar="DIR", type=OutputPath(folder=True),
              help="Folder to download into (default: <build root>/<model>/hf).")
@build_dir_option
@quiet_option
@json_option
def download(recipe: str, revision: str | None, dest: Path | None, build_dir: Path | None,
             quiet: bool, as_json: bool) -> None:
    """Download a recipe's checkpoint from the Hugging Face Hub.

    Fetches config.json, generation_config.json, the tokenizer files and the safetensors
    shards, all from one commit, and checks each file against the hash the Hub lists, so
    convert never reads a truncated or tampered shard. The resolved commit goes into the
    build manifest. Run it again after an interruption: finished files are kept and a
    half-fetched shard resumes where it stopped. Repos with only pickle weights (*.bin,
    *.pt) are refused, and free disk space is checked before the transfer starts.

    RECIPE is a bundled name (see `mathq recipes`) or a path to a TOML file.
    HF_TOKEN (a read token, for private or gated repos) and HF_ENDPOINT (a mirror) are
    honoured; the token is sent only to the Hub and never printed.

    \b
    Examples:
      mathq download deepseek-math-7b-rl
      mathq download deepseek-math-7b-rl --revision 0123abcd...  # a pinned commit
      mathq download ./my-recipe.toml --dir /data/ckpt/rl
      HF_ENDPOINT=https://my-mirror.example mathq download deepseek-math-7b-base
    """
    from mathq.download.stage import download_recipe
    from mathq.recipes.recipe import load_recipe

    render = progress_for(quiet)
    try:
        result = download_recipe(load_recipe(recipe), revision=revision, dest=dest,
                                 build_root=build_dir, progress=render)
    finally:
        render.close()
    if as_json:
        echo_json(result)
        return
    fetched = (f"{format_bytes(result.fetched_bytes)} transferred" if result.fetched_bytes
               else "all files were already there")
    click.echo(f"{result.repo_id} at {result.commit} in {result.dest}: "
               f"{len(result.files)} files, {format_bytes(result.total_bytes)} ({fetched})")
