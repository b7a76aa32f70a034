"""The README.md model card of a GGUF repo on the Hugging Face Hub, from what mathq knows.

The card is generated, never hand-written: metadata (``base_model``, licence, tags) through
huggingface_hub's :class:`~huggingface_hub.ModelCardData`, a table of the files (quant, size,
bits per weight from the GGUF itself, and MATH accuracy and KL divergence from the build's
smoke and KLD summaries when they exist), the exact prompt format from :mod:`mathq.recipes.prompt`
(no system prompt, the chain-of-thought suffix), and how to run the files with Ollama (with
the Modelfiles uploaded beside them) and llama.cpp. A missing measurement shows as a dash,
never as zero.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mathq.evaluate.summaries import KldSummary, Rate, SmokeSummary, load_summary
from mathq.fsutil import format_bytes
from mathq.layout import BuildLayout
from mathq.manifest import Manifest
from mathq.publish.plan import GGUFFile
from mathq.recipes.prompt import BOS, COT_SUFFIXES, render_prompt, stop_strings, user_suffix
from mathq.recipes.recipe import Recipe

CARD_TAGS = ("gguf", "llama.cpp", "ollama", "quantized", "math", "deepseek", "mathq")
EXAMPLE_QUESTION = r"What is the sum of the first 10 positive odd integers?"
# Licences the Hub knows by identifier; any other is "other" with a name and a link.
_HUB_LICENSES = {"mit": "mit", "apache-2.0": "apache-2.0", "apache 2.0": "apache-2.0",
                 "bsd-3-clause": "bsd-3-clause", "cc-by-4.0": "cc-by-4.0"}


@dataclass(frozen=True)
class CardFile:
    """One row of the files table: the GGUF, its Modelfile and what was measured."""

    gguf: GGUFFile
    modelfile: str
    smoke: SmokeSummary | None
    kld: KldSummary | None


def card_files(recipe: Recipe, files: Sequence[GGUFFile], modelfiles: dict[str, str],
               build_root: Path | None = None) -> list[CardFile]:
    """Pair each GGUF with its Modelfile name and the summaries the build holds for it."""
    layout = BuildLayout.for_model(recipe.name, build_root)
    rows = []
    for f in files:
        smoke_path, kld_path = layout.smoke_summary(f.quant), layout.kld_summary(f.quant)
        smoke = load_summary(smoke_path, SmokeSummary) if smoke_path.is_file() else None
        kld = load_summary(kld_path, KldSummary) if kld_path.is_file() else None
        rows.append(CardFile(f, modelfiles[f.quant], smoke, kld))
    return rows


def _license(recipe: Recipe) -> dict[str, str]:
    name = recipe.model.license_name
    known = _HUB_LICENSES.get(name.strip().lower())
    if known:
        return {"license": known}
    slug = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.") or "custom"
    return {"license": "other", "license_name": slug, "license_link": recipe.model.license_url}


def _pct(rate: Rate) -> str:
    return f"{100 * rate.value:.1f} %"


def _accuracy(s: SmokeSummary | None) -> str:
    if s is None:
        return "–"
    a = s.accuracy
    return f"{_pct(a)} ({100 * a.low:.1f}–{100 * a.high:.1f}, {a.k}/{a.n})"


def _kld(k: KldSummary | None) -> str:
    if k is None:
        return "–"
    return f"{k.mean_kld:.4f} ± {k.mean_kld_err:.4f} (same top token {_pct(k.same_top)})"


def _bash_quoted(text: str) -> str:
    """``text`` as a bash ``$'...'`` word: newlines stay visible as ``\\n``."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"$'{escaped}'"


def _source(recipe: Recipe, build_root: Path | None) -> str:
    m = recipe.model
    if not m.hf_repo:
        return f"the local checkpoint `{m.local_dir}`"
    record = Manifest(BuildLayout.for_model(recipe.name, build_root).manifest).get("hf")
    commit = record.inputs.get("commit") if record else None
    at = f" at commit `{commit}`" if commit else f" (revision `{m.revision}`)"
    return f"[{m.hf_repo}](https://huggingface.co/{m.hf_repo}){at}"


def render_model_card(recipe: Recipe, repo_id: str, rows: Sequence[CardFile], *,
                      namespace: str | None = None, build_root: Path | None = None) -> str:
    """The README.md text: YAML metadata, files table, prompt format, how to run."""
    from huggingface_hub import ModelCardData

    meta = ModelCardData(
        base_model=recipe.model.hf_repo, base_model_relation="quantized" if recipe.model.hf_repo
        else None, pipeline_tag="text-generation", tags=list(CARD_TAGS), **_license(recipe))
    spec = recipe.prompt
    prompt = render_prompt(spec, "{question}")
    example = render_prompt(spec, EXAMPLE_QUESTION)
    first = rows[0]
    tag0 = first.gguf.tags[0]
    lines = [
        "---", meta.to_yaml(), "---", "",
        f"# {recipe.name} GGUF", "",
        f"GGUF files of {_source(recipe, build_root)}, quantized with llama.cpp's quantizer "
        "by mathq and checked before upload: each file is a complete "
        "GGUF whose type matches its name.", "",
        "## Files", "",
        "| File | Quant | Size | Bits per weight | MATH accuracy | KL divergence | "
        "Ollama tags |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r.gguf
        lines.append(f"| [{f.path.name}](./{f.path.name}) | {f.quant} | "
                     f"{format_bytes(f.size)} | {f.bits_per_weight:.2f} | {_accuracy(r.smoke)} | "
                     f"{_kld(r.kld)} | {', '.join(f'`{t}`' for t in f.tags)} |")
    lines.append("")
    lines += _measurement_notes(recipe, rows)
    lines += [
        "## Prompt format", "",
        "No system prompt: DeepSeek advises against one. The tokenizer adds BOS "
        f"(`{BOS}`) itself, so prompts never contain it.", "",
        "```text", prompt, "```", "",
    ]
    if user_suffix(spec):
        lines += ["Every question is followed by DeepSeek's chain-of-thought instruction, on a "
                  f"new line: `{COT_SUFFIXES[spec.cot_suffix].strip()}`", ""]
    stops = " and ".join(f"`{json.dumps(s, ensure_ascii=False)[1:-1]}`"
                         for s in stop_strings(spec))
    lines += [f"DeepSeek's evaluation decodes greedily (temperature 0, no repeat penalty), up "
              f"to {recipe.smoke.max_tokens} new tokens, and stops at {stops}.", ""]
    lines += [
        "## Run with Ollama", "",
        "Each GGUF has a Modelfile beside it with this template, the stop strings and the "
        "sampling parameters (Ollama's own guess of a template for this model is wrong after "
        "the first turn):", "",
        "```bash",
        f"hf download {repo_id} {first.gguf.path.name} {first.modelfile} --local-dir .",
        f"ollama create {recipe.ollama.model}:{tag0} -f {first.modelfile}",
        f"ollama run {recipe.ollama.model}:{tag0} {_bash_quoted(EXAMPLE_QUESTION)}",
        "```", "",
    ]
    if user_suffix(spec):
        lines += ["The template appends the chain-of-thought instruction itself: send "
                  "questions without it.", ""]
    if namespace:
        lines += ["The same models are on the Ollama registry:", "", "```bash",
                  *(f"ollama run {namespace}/{recipe.ollama.model}:{t}"
                    for r in rows for t in r.gguf.tags[:1]), "```", ""]
    lines += [
        "## Run with llama.cpp", "",
        "```bash",
        f"llama-cli --hf-repo {repo_id} --hf-file {first.gguf.path.name} -no-cnv --temp 0 "
        f"--repeat-penalty 1 -n {recipe.smoke.max_tokens} -c 4096 \\",
        f"  -p {_bash_quoted(example)}",
        "```", "",
    ]
    return "\n".join(lines)


def _measurement_notes(recipe: Recipe, rows: Sequence[CardFile]) -> list[str]:
    smoke = next((r.smoke for r in rows if r.smoke), None)
    kld = next((r.kld for r in rows if r.kld), None)
    notes: list[str] = []
    if smoke:
        ref = ""
        if smoke.reference_accuracy is not None:
            ref = (f" The full-precision model scores {smoke.reference_accuracy:g} % "
                   f"({smoke.reference_source or 'published figure'}).")
        notes.append(f"MATH accuracy: {smoke.accuracy.n} problems of {smoke.suite}, greedy, "
                     f"up to {smoke.max_tokens} new tokens, answers checked with math-verify; "
                     f"95 % Wilson interval and correct/total in brackets.{ref}")
    if kld:
        notes.append(f"KL divergence: mean per-token KL divergence of each file's next-token "
                     f"distribution from {kld.reference}'s over {kld.n_tokens:,} tokens of "
                     f"{kld.corpus}, with its standard error; lower is closer.")
    if any(r.smoke is None or r.kld is None for r in rows):
        notes.append("A dash means not measured for this release.")
    return [*(f"{n}\n" for n in notes)]
