"""``mathq publish``: Ollama tags (create and push) and a Hugging Face GGUF repo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from mathq.cli.common import build_dir_option, echo_json, json_option, quiet_option
from mathq.cli.render import progress_for
from mathq.cli.types import FileOrName
from mathq.fsutil import format_bytes
from mathq.recipes.recipe import name_problem


def _namespace(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None and (problem := name_problem(value, "namespace")):
        raise click.BadParameter(problem)
    return value


def _tags(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    tags = [t.strip() for v in values for t in v.split(",") if t.strip()]
    if values and not tags:
        raise click.BadParameter("no tag given; name one or more of the recipe's tags, e.g. "
                                 "--tag latest")
    for tag in tags:
        if problem := name_problem(tag, "tag"):
            raise click.BadParameter(problem)
    return tuple(dict.fromkeys(tags))


@click.command()
@click.argument("recipe", type=FileOrName())
@click.option("--namespace", metavar="NS", callback=_namespace,
              help="Ollama registry namespace (your ollama.com user name): each tag is "
                   "created and pushed as NS/<model>:<tag>.")
@click.option("--tag", "tags", multiple=True, metavar="TAG[,TAG...]", callback=_tags,
              help="Only these tags of the recipe (comma-separated or repeated; default: "
                   "all). On the Hub: only their GGUF files.")
@click.option("--ollama-host", metavar="URL",
              help="Ollama server to create the models on (default: $OLLAMA_HOST, else "
                   "http://127.0.0.1:11434).")
@click.option("--no-push", is_flag=True,
              help="Only create the models on the Ollama server (as <model>:<tag> without "
                   "--namespace); push nothing.")
@click.option("--hf-repo", metavar="USER/NAME",
              help="Hugging Face model repo for the GGUF files, their Modelfiles and a "
                   "generated README.md model card (needs HF_TOKEN with write access).")
@click.option("--private", is_flag=True,
              help="Create the Hub repo as private (an existing repo keeps its visibility).")
@click.option("--dry-run", is_flag=True,
              help="Print exactly what would be uploaded and created; send nothing.")
@click.option("--force", is_flag=True,
              help="Create and push again although publish.json says it was done (blobs "
                   "the server already has are still not sent).")
@build_dir_option
@json_option
@quiet_option
def publish(recipe: str, namespace: str | None, tags: tuple[str, ...],
            ollama_host: str | None, no_push: bool, hf_repo: str | None, private: bool,
            dry_run: bool, force: bool, build_dir: Path | None, as_json: bool,
            quiet: bool) -> None:
    """Publish a recipe's GGUFs as Ollama tags and/or a Hugging Face GGUF repo.

    For each tag the GGUF is sent to the Ollama server as a blob (unless the server has
    it), the model is created from the tag's generated Modelfile (template, stop strings,
    parameters, licence; checked by Ollama's rules first) and pushed to the registry as
    NS/<model>:<tag>. With --hf-repo the GGUFs, a Modelfile for each and a model card
    (files, measured accuracy and KL divergence when the build has them, prompt format,
    how to run) go to a Hugging Face repo. Reruns send nothing that is already there.

    Pushing to ollama.com needs the Ollama server's public key (~/.ollama/id_ed25519.pub)
    added to your account at https://ollama.com/settings/keys.

    \b
    Examples:
      mathq publish deepseek-math-7b-rl --namespace me --dry-run
      mathq publish deepseek-math-7b-rl --namespace me --tag latest,Q8
      mathq publish deepseek-math-7b-rl --no-push --ollama-host http://gpu-box:11434
      HF_TOKEN=hf_... mathq publish deepseek-math-7b-rl --hf-repo me/deepseek-math-7b-rl-GGUF
    """
    from mathq.publish.hf import plan_hub, publish_hub, require_online
    from mathq.publish.ollama import plan_ollama, publish_ollama
    from mathq.publish.ollama_api import ollama_base_url
    from mathq.recipes.recipe import load_recipe

    to_ollama = namespace is not None or no_push
    if not to_ollama and not hf_repo:
        raise click.UsageError("say where to publish: --namespace NS (Ollama registry), "
                               "--no-push (Ollama server only) or --hf-repo USER/NAME")
    if private and not hf_repo:
        raise click.UsageError("--private applies to --hf-repo only")
    if ollama_host and not to_ollama:
        raise click.UsageError("--ollama-host needs --namespace or --no-push")
    loaded = load_recipe(recipe)
    if hf_repo and not dry_run:
        require_online()  # before hashing gigabytes for an upload that cannot happen
    render = progress_for(quiet)
    try:
        oplan = hplan = None
        if to_ollama:
            base_url = ollama_base_url(ollama_host)
            oplan = plan_ollama(loaded, namespace=namespace, base_url=base_url, tags=tags,
                                push=not no_push, build_root=build_dir, progress=render,
                                dry_run=dry_run,
                                before_hashing=None if dry_run else lambda: _ask(base_url))
        if hf_repo:
            hplan = plan_hub(loaded, hf_repo, private=private, tags=tags,
                             namespace=None if no_push else namespace,
                             build_root=build_dir, progress=render, dry_run=dry_run)
        if dry_run:
            if as_json:
                echo_json({"dry_run": True, "ollama": oplan, "hub": hplan})
            else:
                _echo_dry_run(oplan, hplan)
            return
        oresult = hresult = None
        if oplan is not None:
            oresult = publish_ollama(oplan, build_root=build_dir, force=force,
                                     progress=render)
        if hplan is not None:
            hresult = publish_hub(hplan, progress=render)
    finally:
        render.close()
    if as_json:
        echo_json({"dry_run": False, "ollama": oresult, "hub": hresult})
        return
    if oresult is not None:
        width = max(len(t.name) for t in oresult.tags)
        for t in oresult.tags:
            click.echo(f"{t.name:<{width}}  blob {t.blob}, {t.create}, {t.push}"
                       + (f"  {RECOMMENDED}" if t.recommended else ""))
        click.echo(f"Ollama at {oresult.base_url}: {len(oresult.tags)} tag(s), "
                   f"{format_bytes(oresult.uploaded_bytes)} uploaded")
        _echo_recommended(oresult.recommended, [t.name for t in oresult.tags if t.recommended])
    if hresult is not None:
        sent = [p for p, what in hresult.files if what == "uploaded"]
        if hresult.commit:
            click.echo(f"{hresult.url}: commit {hresult.commit[:12]} with {len(sent)} file(s) "
                       f"({', '.join(sent)}); {len(hresult.files) - len(sent)} unchanged")
        else:
            click.echo(f"{hresult.url}: all {len(hresult.files)} files unchanged, no commit")


RECOMMENDED = "★ recommended"


def _echo_recommended(why: str | None, names: list[str]) -> None:
    """The report's pick among the tags, or that it picks none of them."""
    if why is None:
        click.echo("No tag is recommended: the build's report picks none of these files "
                   "(see `mathq report`).")
    else:
        click.echo(f"Recommended: {', '.join(names)}, {why}")


def _ask(base_url: str) -> None:
    """Make sure the Ollama server answers before any file is hashed for it."""
    from mathq.publish.ollama_api import OllamaAPI

    with OllamaAPI(base_url) as api:
        api.check()


def _echo_dry_run(oplan: Any, hplan: Any) -> None:
    click.echo("Dry run: nothing is sent.")
    if oplan is not None:
        click.echo(f"\nOllama server {oplan.base_url}")
        seen: set[str] = set()
        for t in oplan.tags:
            if t.digest not in seen:
                seen.add(t.digest)
                click.echo(f"  upload blob {t.digest}  {format_bytes(t.size)}  {t.gguf}  "
                           "(unless the server has it)")
            click.echo(f"  create {t.name}  from {t.gguf.name}"
                       + (f"  {RECOMMENDED}" if t.recommended else ""))
            if oplan.push:
                click.echo(f"  push {t.name}")
        _echo_recommended(oplan.recommended, [t.name for t in oplan.tags if t.recommended])
        for t in oplan.tags:
            click.echo(f"\n--- Modelfile of {t.name} ---\n{t.modelfile.rstrip()}")
            click.echo(f"\n--- POST /api/create for {t.name} ---")
            click.echo(json.dumps({**t.request, "stream": True}, indent=2, ensure_ascii=False))
    if hplan is not None:
        visibility = "private" if hplan.private else "public"
        click.echo(f"\nHugging Face repo {hplan.repo_id} ({visibility}) at {hplan.endpoint}")
        for f in hplan.files:
            where = f"  {f.local}" if f.local is not None else ""
            click.echo(f"  upload {f.path_in_repo}  {format_bytes(f.size)}  sha256:{f.sha256}"
                       f"{where}  (unless the repo has it)")
        for f in hplan.files:
            if f.text is not None:
                click.echo(f"\n--- {f.path_in_repo} ---\n{f.text.rstrip()}")
