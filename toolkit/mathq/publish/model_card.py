"""The README.md model card of a GGUF repo on the Hugging Face Hub, from the build's report.

The card is generated, never hand-written, and carries the report's decision to the people
who download: metadata (``base_model``, licence, tags) through huggingface_hub's
:class:`~huggingface_hub.ModelCardData`; "Which file should I use?" (the report's pick per
size class with its one-sentence why, and the best file per memory budget, see
:mod:`mathq.publish.choice`); the files sorted by size under BF16's baseline row, each with
its MATH accuracy, paired difference from BF16 (interval and McNemar's p), mean KL divergence,
same-top-token share, memory at the stated contexts and the report's advice word; what tuned
and imatrix variants are; the exact prompt format from :mod:`mathq.recipes.prompt`; and how
to run the files with Ollama (with the Modelfiles uploaded beside them) and llama.cpp.

Every figure comes from the same :class:`~mathq.report.table.ReportData` the report renders,
so card and report cannot disagree. A missing measurement shows as a dash, never as zero.
Nothing of the publisher's machine appears: a local checkpoint is named by its model name,
problem sets and texts by their titles or file names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mathq.fsutil import format_bytes
from mathq.layout import BuildLayout
from mathq.manifest import Manifest
from mathq.publish.choice import (
    BUDGET_SHARE,
    budget_candidates,
    by_budget,
    measured_contexts,
    recommended,
    stated_context,
)
from mathq.publish.plan import GGUFFile
from mathq.recipes.prompt import BOS, COT_SUFFIXES, render_prompt, stop_strings, user_suffix
from mathq.recipes.recipe import Recipe
from mathq.report.advice import QUALIFIES, pct_pp, qualifies, why_not
from mathq.report.cells import MISSING, kld_from, kld_text, rate_text, status
from mathq.report.table import FULL_PRECISION, ReportData, VariantRow, base_type

CARD_TAGS = ("gguf", "llama.cpp", "ollama", "quantized", "math", "deepseek", "mathq")
EXAMPLE_QUESTION = r"What is the sum of the first 10 positive odd integers?"
# Licences the Hub knows by identifier; any other is "other" with a name and a link.
_HUB_LICENSES = {"mit": "mit", "apache-2.0": "apache-2.0", "apache 2.0": "apache-2.0",
                 "bsd-3-clause": "bsd-3-clause", "cc-by-4.0": "cc-by-4.0"}


@dataclass(frozen=True)
class CardFile:
    """One row of the files table: a GGUF of the repo (None: BF16's baseline row, when the
    repo does not hold BF16), its Modelfile, and the report's row for it."""

    quant: str
    gguf: GGUFFile | None
    modelfile: str | None
    row: VariantRow | None

    @property
    def size(self) -> int:
        """The file's size (0 when unknown), for sorting."""
        if self.gguf is not None:
            return self.gguf.size
        return self.row.size_bytes or 0 if self.row else 0


def card_files(data: ReportData, files: Sequence[GGUFFile],
               modelfiles: dict[str, str]) -> list[CardFile]:
    """The repo's GGUFs with their report rows, largest first, below BF16's baseline row
    when BF16 was smoke-tested and is not itself uploaded."""
    rows = {r.quant: r for r in data.rows}
    out = [CardFile(f.quant, f, modelfiles[f.quant], rows.get(f.quant)) for f in files]
    baseline = rows.get(FULL_PRECISION)
    if baseline is not None and baseline.accuracy is not None \
            and all(f.quant != FULL_PRECISION for f in files):
        out.append(CardFile(FULL_PRECISION, None, None, baseline))
    return sorted(out, key=lambda c: (-c.size, c.quant))


def _license(recipe: Recipe) -> dict[str, str]:
    name = recipe.model.license_name
    known = _HUB_LICENSES.get(name.strip().lower())
    if known:
        return {"license": known}
    slug = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.") or "custom"
    return {"license": "other", "license_name": slug, "license_link": recipe.model.license_url}


def _bash_quoted(text: str) -> str:
    """``text`` as a bash ``$'...'`` word: newlines stay visible as ``\\n``."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"$'{escaped}'"


def _source(recipe: Recipe, build_root: Path | None) -> str:
    """Where the weights came from, without any path of the publisher's machine."""
    m = recipe.model
    if not m.hf_repo:
        return f"`{recipe.name}`, a checkpoint that is not on the Hugging Face Hub"
    record = Manifest(BuildLayout.for_model(recipe.name, build_root).manifest).get("hf")
    commit = record.inputs.get("commit") if record else None
    at = f" at commit `{commit}`" if commit else f" (revision `{m.revision}`)"
    return f"[{m.hf_repo}](https://huggingface.co/{m.hf_repo}){at}"


def _context_words(n_ctx: int) -> str:
    return f"{n_ctx // 1024}k" if n_ctx % 1024 == 0 and n_ctx >= 4096 else f"{n_ctx:,}"


def render_model_card(recipe: Recipe, repo_id: str, data: ReportData,
                      rows: Sequence[CardFile], *, namespace: str | None = None,
                      build_root: Path | None = None) -> str:
    """The README.md text: metadata, which file to use, files, prompt format, how to run."""
    from huggingface_hub import ModelCardData

    meta = ModelCardData(
        base_model=recipe.model.hf_repo, base_model_relation="quantized" if recipe.model.hf_repo
        else None, pipeline_tag="text-generation", tags=list(CARD_TAGS), **_license(recipe))
    uploaded = [c for c in rows if c.gguf is not None]
    measured = (" and measured against the full-precision (BF16) model on the same problems "
                "and text" if data.accuracy_reference and data.kld_reference else "")
    lines = [
        "---", meta.to_yaml(), "---", "",
        f"# {recipe.name} GGUF", "",
        f"GGUF files of {_source(recipe, build_root)}, quantized with llama.cpp's quantizer "
        f"by mathq{measured}.", "",
    ]
    lines += _which_file(recipe, data, rows)
    table = _files_table(data, rows)
    lines += table
    lines += _kind_lines(data, uploaded)
    lines += _measurement_notes(recipe, data, rows, table)
    lines += _prompt_section(recipe)
    lines += _run_sections(recipe, repo_id, data, uploaded, namespace)
    return "\n".join(lines)


# --- which file ---------------------------------------------------------------------------


def _which_file(recipe: Recipe, data: ReportData, rows: Sequence[CardFile]) -> list[str]:
    uploaded = [c.quant for c in rows if c.gguf is not None]
    names = {c.quant: c.gguf.path.name for c in rows if c.gguf is not None}
    lines = ["## Which file should I use?", ""]
    advice = data.advice
    pick = recommended(data, uploaded)
    if pick is None:
        lines += [f"No file of this repo is recommended: {_no_pick(data, uploaded)}", ""]
    else:
        why = (f"Its size class is the smallest with a file that qualifies ({QUALIFIES})."
               if pick.quant == advice.quant else
               f"mathq's first choice, {advice.quant}, is not in this repo; this is the pick "
               "of the smallest size class that is.")
        lines += [f"**Recommended: `{names[pick.quant]}`** ({pick.label} pick). {pick.reason} "
                  f"{why}", ""]
    if advice is not None and advice.picks:
        lines += ["The pick of each size class:", ""]
        for p in advice.picks:
            where = "" if p.quant is None or p.quant in uploaded else " (not in this repo)"
            lines.append(f"- **{p.label}**{where}: {p.reason}")
        lines += ["", f"How files are picked: {advice.rule}", ""]
    lines += _budget_lines(recipe, data, uploaded, pick is not None)
    return lines


def _no_pick(data: ReportData, uploaded: Sequence[str]) -> str:
    """Why none of the repo's files is recommended, for someone choosing one."""
    rows = {r.quant: r for r in data.rows}
    reasons = []
    for quant in uploaded:
        r = rows.get(quant)
        if r is None or quant == FULL_PRECISION:
            continue
        reasons.append(f"{quant} qualifies, but another file of its size class is picked"
                       if qualifies(r) else why_not(r, data))
    elsewhere = [p.quant for p in (data.advice.picks if data.advice else ())
                 if p.quant and p.quant not in uploaded]
    if elsewhere:
        reasons.append(f"the files mathq picks ({', '.join(elsewhere)}) are not in this repo")
    return "; ".join(reasons) + "." if reasons else "nothing was measured for these files."


def _budget_lines(recipe: Recipe, data: ReportData, uploaded: Sequence[str],
                  after_pick: bool) -> list[str]:
    n_ctx = stated_context(data, recipe.ollama.num_ctx, uploaded)
    candidates = budget_candidates(data, uploaded)
    if n_ctx is None:
        return ["Memory was not measured for these files, so no choice by memory budget is "
                "made.", ""]
    if not candidates:
        return ["No file of this repo qualifies, so no choice by memory budget is made.", ""]
    share = f"{100 * BUDGET_SHARE:.0f} %"
    lead = ("The recommendation is the smallest file that qualifies; with more memory, a "
            "file closer to BF16 may fit. " if after_pick else "")
    lines = [f"{lead}By memory (RAM for the CPU, VRAM for a GPU): the qualifying file closest "
             f"to BF16 (lowest mean KLD) whose llama.cpp buffers (model, KV cache and compute) "
             f"for one {_context_words(n_ctx)}-token context take at most {share} of the "
             "memory, leaving the rest to the system.", ""]
    unmeasured = [r.quant for r in candidates if r.memory_at(n_ctx) is None]
    if unmeasured:
        lines += [f"Memory at {_context_words(n_ctx)} tokens was not measured for "
                  f"{', '.join(unmeasured)}, which the table leaves out.", ""]
    lines += [f"| Memory | File | Needs at {_context_words(n_ctx)} tokens |", "|---|---|---|"]
    for c in by_budget(candidates, n_ctx):
        if c.quant is None:
            lines.append(f"| {c.label} | no qualifying file fits | {MISSING} |")
        else:
            lines.append(f"| {c.label} | {c.quant} | {format_bytes(c.memory_bytes or 0)} |")
    return [*lines, ""]


# --- files ------------------------------------------------------------------------------


def _files_table(data: ReportData, rows: Sequence[CardFile]) -> list[str]:
    contexts = measured_contexts(data, [c.quant for c in rows])
    ref = data.accuracy_reference or FULL_PRECISION
    header = ["File", "Size", "Bits/weight", "MATH % [95 % CI]",
              f"Δ vs {ref} (pp) [95 % CI], p", "Mean KLD", "Same top %",
              *(f"Memory at {_context_words(c)} tokens" for c in contexts), "Advice",
              "Ollama tags"]
    lines = ["## Files", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for c in rows:
        r = c.row
        name = (f"[{c.gguf.path.name}](./{c.gguf.path.name})" if c.gguf is not None
                else f"{c.quant} (baseline, not in this repo)")
        size = c.gguf.size if c.gguf is not None else (r.size_bytes if r else None)
        bpw = c.gguf.bits_per_weight if c.gguf is not None else (r.bits_per_weight if r else None)
        tags = ", ".join(f"`{t}`" for t in c.gguf.tags) if c.gguf is not None else MISSING
        cells = [name, format_bytes(size) if size is not None else MISSING,
                 f"{bpw:.2f}" if bpw is not None else MISSING,
                 rate_text(r.accuracy) if r else MISSING, _paired(r, data),
                 _kld(r, data), _same_top(r),
                 *(_memory(r, n) for n in contexts),
                 status(r, data) if r else MISSING, tags]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _paired(r: VariantRow | None, data: ReportData) -> str:
    if r is not None and r.quant == data.accuracy_reference and r.accuracy is not None:
        return "baseline"
    return pct_pp(r.paired) if r is not None and r.paired is not None else MISSING


def _kld(r: VariantRow | None, data: ReportData) -> str:
    if r is not None and r.is_kld_reference:
        return "0 (reference)"
    return kld_text(r) + kld_from(r, data) if r is not None else MISSING


def _same_top(r: VariantRow | None) -> str:
    if r is not None and r.is_kld_reference:
        return "100"
    return f"{100 * r.same_top.value:.1f}" if r is not None and r.same_top else MISSING


def _memory(r: VariantRow | None, n_ctx: int) -> str:
    value = r.memory_at(n_ctx) if r is not None else None
    return format_bytes(value) if value is not None else MISSING


def _kind_lines(data: ReportData, uploaded: Sequence[CardFile]) -> list[str]:
    """One line per uploaded variant that is not llama.cpp's stock mix of its type."""
    lines = []
    for c in uploaded:
        r, f = c.row, c.gguf
        if r is None or f is None or (r.kind == "stock" and not r.made_with_imatrix):
            continue
        if r.kind.endswith("tuned"):
            meta = dict(f.tuned)
            text = meta.get("calibration", "").removeprefix("calibration: ")
            on = f", calibrated on {text}" if text else ""
            again = (f"; `{f.overrides.name}` beside it reproduces it with "
                     "`llama-quantize --tensor-type-file`" if f.overrides else "")
            lines.append(f"- `{f.path.name}`: tuned: each tensor's type chosen by `mathq tune` "
                         f"for the lowest KL divergence from BF16 within the size of "
                         f"llama.cpp's {base_type(r.quant).name} mix{on} (never on the text "
                         f"it is measured on here){again}.")
        if r.made_with_imatrix:
            matrix = f" `{Path(r.imatrix).name}`" if r.imatrix else ""
            text = f", computed on {r.imatrix_dataset}" if r.imatrix_dataset else ""
            lines.append(f"- `{f.path.name}`: quantized with an importance matrix{matrix}"
                         f"{text}: llama.cpp spends the type's bits where the calibration "
                         "text's activations are large.")
    return ["Variants that are not llama.cpp's stock mix:", "", *lines, ""] if lines else []


def _measurement_notes(recipe: Recipe, data: ReportData, rows: Sequence[CardFile],
                       table: Sequence[str]) -> list[str]:
    """How each column was measured; ``table`` is the files table as rendered (a note
    explains its dashes, if it has any)."""
    notes: list[str] = []
    if data.smoke_n or data.smoke_suite_title:
        n = f" ({data.smoke_n} problems)" if data.smoke_n else ""
        ref = ""
        if data.paper_accuracy is not None:
            ref = (f" The full-precision model scores {data.paper_accuracy:g} % on the whole "
                   f"MATH test set ({data.paper_source or 'published figure'}).")
        notes.append(f"MATH accuracy on {data.smoke_suite_title or 'the smoke test'}{n}: "
                     "greedy decoding, answers checked with math-verify, with a 95 % Wilson "
                     "interval. "
                     f"Δ vs {data.accuracy_reference or FULL_PRECISION}: the paired "
                     "difference on the same problems, with Newcombe's 95 % interval and "
                     f"McNemar's exact p.{ref}")
    if data.kld_reference:
        corpus = f" over {data.kld_positions:,} tokens" if data.kld_positions else ""
        text = f" of {data.kld_corpus}" if data.kld_corpus else ""
        notes.append(f"Mean KLD: the mean per-token KL divergence of each file's next-token "
                     f"distribution from {data.kld_reference}'s{corpus}{text}, with its "
                     "standard error (lower is closer); same top %: how often both pick the "
                     "same most likely token.")
    if any(r.buffers_by_context for c in rows if (r := c.row)):
        notes.append("Memory: llama.cpp's model, KV-cache (F16), compute and output buffers "
                     "for one sequence of that context, as `mathq bench` measured them; add "
                     "a few hundred MB for the program itself.")
    num_ctx = recipe.ollama.num_ctx
    trained = min((c.gguf.context_length for c in rows
                   if c.gguf is not None and c.gguf.context_length), default=None)
    if num_ctx and trained and num_ctx > trained:
        notes.append(f"The Modelfiles set num_ctx {num_ctx:,}, beyond the {trained:,} tokens "
                     "the model was trained on: text past that length is unlikely to be "
                     "answered well, and takes more memory than the table says.")
    if any(f" {MISSING} " in line for line in table):
        notes.append("A dash means not measured for this release.")
    return [*(f"{n}\n" for n in notes)]


# --- prompt and running -----------------------------------------------------------------


def _prompt_section(recipe: Recipe) -> list[str]:
    spec = recipe.prompt
    system = ("No system prompt: DeepSeek advises against one." if spec.system_prompt == "none"
              else "A system prompt is passed through (DeepSeek advises against one).")
    lines = [
        "## Prompt format", "",
        f"{system} The tokenizer adds BOS (`{BOS}`) itself, so prompts never contain it.", "",
        "```text", render_prompt(spec, "{question}"), "```", "",
    ]
    if user_suffix(spec):
        lines += ["Every question is followed by DeepSeek's chain-of-thought instruction, on a "
                  f"new line: `{COT_SUFFIXES[spec.cot_suffix].strip()}`", ""]
    stops = " and ".join(f"`{json.dumps(s, ensure_ascii=False)[1:-1]}`"
                         for s in stop_strings(spec))
    return [*lines, f"DeepSeek's evaluation decodes greedily (temperature 0, no repeat "
                    f"penalty), up to {recipe.smoke.max_tokens} new tokens, and stops at "
                    f"{stops}.", ""]


def _run_sections(recipe: Recipe, repo_id: str, data: ReportData,
                  uploaded: Sequence[CardFile], namespace: str | None) -> list[str]:
    """How to run the recommended file (else the largest) with Ollama and llama.cpp."""
    pick = recommended(data, [c.quant for c in uploaded])
    first = next((c for c in uploaded if pick and c.quant == pick.quant), uploaded[0])
    assert first.gguf is not None and first.modelfile is not None
    tag0 = first.gguf.tags[0]
    lines = [
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
    if user_suffix(recipe.prompt):
        lines += ["The template appends the chain-of-thought instruction itself: send "
                  "questions without it.", ""]
    if namespace:
        lines += ["The same models are on the Ollama registry:", "", "```bash",
                  *(f"ollama run {namespace}/{recipe.ollama.model}:{c.gguf.tags[0]}"
                    for c in uploaded if c.gguf is not None), "```", ""]
    example = render_prompt(recipe.prompt, EXAMPLE_QUESTION)
    params = dict(recipe.ollama.parameters)
    n_ctx = recipe.ollama.num_ctx or 0
    temp, penalty = params.get("temperature", 0.0), params.get("repeat_penalty", 1.0)
    return [*lines,
            "## Run with llama.cpp", "",
            "The Modelfiles' sampling settings, as llama.cpp's options"
            + ("" if n_ctx else " (`-c 0`: the model's own context)") + ":", "",
            "```bash",
            f"llama-cli --hf-repo {repo_id} --hf-file {first.gguf.path.name} -no-cnv --temp "
            f"{temp:g} --repeat-penalty {penalty:g} -n {recipe.smoke.max_tokens} -c {n_ctx} \\",
            f"  -p {_bash_quoted(example)}",
            "```", ""]
