"""``mathq modelfile``: write Ollama Modelfiles from a recipe, or check Modelfiles."""

from __future__ import annotations

from pathlib import Path

import click

from mathq.cli.common import build_dir_option, echo_json, json_option, quiet_option
from mathq.cli.render import progress_for
from mathq.cli.types import FileOrName, OutputPath
from mathq.modelfile.options import OLLAMA_OPTIONS

_OPTION_TABLE = "\n".join(f"  {o.name:<18} {o.kind:<12} {o.description}"
                          for o in OLLAMA_OPTIONS)


@click.command(epilog="\b\nPARAMETER names Ollama's create accepts:\n" + _OPTION_TABLE)
@click.argument("targets", nargs=-1, metavar="[RECIPE | FILE...]", type=FileOrName())
@click.option("--tag", "tags", multiple=True, metavar="TAG",
              help="Only this Ollama tag of the recipe (repeatable; default: every tag).")
@click.option("--out", type=OutputPath(folder=True), default=None,
              help="Folder for the Modelfiles (default: <build-dir>/<model>/modelfiles; "
                   "with --all: ./modelfiles, one subfolder per model).")
@click.option("--all", "all_recipes", is_flag=True,
              help="Regenerate the Modelfiles of every bundled recipe (the repository's "
                   "modelfiles/ folder).")
@click.option("--check", "check", is_flag=True,
              help="Check the given Modelfiles by Ollama's rules instead of writing any.")
@build_dir_option
@json_option
@quiet_option
def modelfile(targets: tuple[str, ...], tags: tuple[str, ...], out: Path | None,
              all_recipes: bool, check: bool, build_dir: Path | None, as_json: bool,
              quiet: bool) -> None:
    """Write one Ollama Modelfile per tag of a recipe, or check Modelfiles.

    Each Modelfile points FROM at the tag's GGUF (a path relative to the Modelfile) and
    spells out DeepSeek's prompt template, stop strings, sampling parameters and the
    model licence, so Ollama never guesses a template (its guess for this model is wrong
    after the first turn). The text is read back by Ollama's rules before it is written.
    --check reports every problem as FILE:LINE: PROBLEM and exits 1 if there is one.

    \b
    Examples:
      mathq modelfile deepseek-math-7b-rl            build/deepseek-math-7b-rl/modelfiles/
      mathq modelfile deepseek-math-7b-rl --tag latest --out .
      mathq modelfile --all                          regenerate ./modelfiles from ./build
      mathq modelfile --check modelfiles/*/*.Modelfile
      ollama create deepseek-math-7b-rl -f build/deepseek-math-7b-rl/modelfiles/latest.Modelfile
    """
    from mathq.errors import ModelfileError
    from mathq.modelfile.check import check_modelfile
    from mathq.modelfile.stage import write_all_modelfiles, write_modelfiles
    from mathq.recipes.recipe import load_recipe

    if check and all_recipes:
        raise click.UsageError("--check and --all do not go together")
    if check:
        if not targets:
            raise click.UsageError("--check needs one or more Modelfile paths")
        if tags or out:
            raise click.UsageError("--tag and --out only apply when writing Modelfiles")
        for t in targets:  # a missing file or a pipe is bad input, not a Modelfile problem
            if not Path(t).exists():
                raise click.BadParameter(f"{t} does not exist", param_hint="FILE")
            if not Path(t).is_file():
                raise click.BadParameter(f"{t} is not a regular file", param_hint="FILE")
        results = [check_modelfile(Path(t)) for t in targets]
        if as_json:
            echo_json([{"path": r.path, "ok": r.ok, "problems": r.problems} for r in results])
        else:
            for r in results:
                for line in r.lines() or [f"{r.path}: ok"]:
                    click.echo(line)
        bad = [r for r in results if not r.ok]
        if bad:
            count = sum(len(r.problems) for r in bad)
            raise ModelfileError(f"{count} problem(s) in {len(bad)} of {len(results)} "
                                 "Modelfile(s)", "fix the lines listed above")
        return
    progress = progress_for(quiet)
    if all_recipes:
        if targets or tags:
            raise click.UsageError("--all takes no RECIPE and no --tag")
        results = write_all_modelfiles(out or Path("modelfiles"), build_dir or Path("build"),
                                       progress=progress)
    else:
        if len(targets) != 1:
            raise click.UsageError("give one RECIPE (or --all, or --check FILE...)")
        results = (write_modelfiles(load_recipe(targets[0]), out, build_dir, tags,
                                    progress=progress),)
    if as_json:
        echo_json(list(results))
        return
    for result in results:
        for f in result.files:
            click.echo(f"{f.path}  ({result.model}:{f.tag}, FROM {f.from_path})")
        for path in result.removed:
            click.echo(f"{path}  (removed: the recipe has no such tag any more)")
