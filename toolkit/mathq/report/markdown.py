"""report.md: the recommendation, the table, the plots and how it was measured, fit for a
model card.

Plain GitHub-flavoured Markdown with images by relative path (the PNGs sit next to it), no
front matter and no HTML, so a model card can include it as it is. The sections and their
sentences come from the same functions as report.html's (:func:`sections`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mathq.report.advice import Advice
from mathq.report.cells import (
    MISSING,
    PICK_MARK,
    breakdown_rows,
    columns,
    file_rows,
    imatrix_lines,
    kind_note,
    memory_header,
    memory_rows,
)
from mathq.report.paired import ALPHA
from mathq.report.plots import Plot
from mathq.report.table import ReportData

ENVIRONMENT_LABELS = (
    ("mathq", "mathq"), ("llama_cpp_python", "llama-cpp-python"),
    ("llama_cpp_commit", "llama.cpp commit"), ("ggml", "ggml"), ("cpu", "CPU"),
    ("cpu_features", "CPU features llama.cpp uses"), ("cores", "cores"),
    ("threads", "threads"), ("os", "OS"), ("python", "Python"), ("date", "measured"))


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def measured_notes(data: ReportData) -> list[str]:
    """Sentences saying how each kind of figure was measured (shared with the HTML page)."""
    notes = []
    if data.smoke_suite:
        n = f"{data.smoke_n} problems from " if data.smoke_n else "problems from "
        title = data.smoke_suite_title
        suite = (f"{title} ({data.smoke_suite})" if title and title != data.smoke_suite
                 else data.smoke_suite)
        notes.append(f"MATH accuracy: `mathq smoke` on {n}{suite}, greedy decoding, "
                     f"with a Wilson {100 * data.confidence:g} % interval.")
    if data.accuracy_reference:
        notes.append(f"Δ vs {data.accuracy_reference}: each variant's accuracy minus "
                     f"{data.accuracy_reference}'s on the problems both answered, with "
                     f"Newcombe's paired {100 * data.confidence:g} % interval (method 10) "
                     "and McNemar's exact p-value; a loss is significant when p < "
                     f"{ALPHA:g}. Pairing counts only the problems one solved and the other "
                     "did not, so it resolves differences two separate intervals cannot. The "
                     "exact test is the more conservative of the two: with few discordant "
                     "problems the interval can exclude 0 while p is not below "
                     f"{ALPHA:g}; the recommendation follows the test.")
    if data.paper_accuracy is not None:
        notes.append(f"Paper: {data.paper_accuracy:g} % — {data.paper_source}.")
    if data.kld_reference:
        where = f" on {data.kld_corpus}" if data.kld_corpus else ""
        count = f" ({data.kld_positions} scored positions)" if data.kld_positions else ""
        notes.append(f"KL divergence: `mathq kld` against {data.kld_reference}{where}{count}, "
                     "llama-perplexity's --kl-divergence statistics (the text is the recipe's "
                     "`[kld] corpus`).")
    if data.bench_threads:
        s = data.bench_settings
        tests = (f"pp{s['n_prompt']} and tg{s['n_gen']}, {s['repetitions']} repetitions"
                 if {"n_prompt", "n_gen", "repetitions"} <= set(s) else "pp512 and tg128")
        notes.append(f"Speed: `mathq bench`, llama-bench's method ({tests}), "
                     f"{data.bench_threads} threads.")
        notes.append("Memory: llama.cpp's own buffer sizes as it logs them when allocating "
                     "(model weights, KV cache and compute buffer for one sequence), and the "
                     "process's peak resident set minus its peak before the model was loaded "
                     "(so the interpreter and libraries are not counted); the peak also covers "
                     "the larger context of the throughput test.")
    note = kind_note(data)
    if note:
        notes.append(note)
    notes.append(f"{MISSING} marks a figure that was not measured.")
    return notes


@dataclass(frozen=True)
class Section:
    """A titled table of the report: header, rows, and sentences below it."""

    key: str
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: tuple[str, ...] = ()
    collapsed: bool = False


def picks_section(data: ReportData, advice: Advice) -> Section:
    """One row per size class: the pick, why, and the command that publishes it."""
    rows = []
    for p in advice.picks:
        command = f"`{p.publish_command}`" if p.publish_command else (p.publish_note or MISSING)
        rows.append([p.label, f"{p.quant} {PICK_MARK}" if p.quant else MISSING, p.reason,
                     command])
    notes = tuple(dict.fromkeys(p.publish_note for p in advice.picks
                                if p.publish_command and p.publish_note))
    return Section("picks", "Which file to publish", ["Size", "Pick", "Why", "Publish with"],
                   rows, (*notes, advice.rule))


def sections(data: ReportData) -> list[Section]:
    """The tables after the main one: accuracy by subject and level, memory, files and
    environment."""
    out = []
    if any(r.by_subject for r in data.rows):
        header, rows = breakdown_rows(data, "subject")
        out.append(Section("by-subject", "Accuracy by subject", header, rows, collapsed=True))
    if any(r.by_level for r in data.rows):
        header, rows = breakdown_rows(data, "level")
        out.append(Section("by-level", "Accuracy by level", header, rows, collapsed=True))
    if any(r.llama_buffers or r.rss_over_baseline_bytes is not None for r in data.rows):
        out.append(Section("memory", "Memory", memory_header(data), memory_rows(data),
                           ("llama.cpp's figures are from its allocation log; the peak RSS "
                            "is the bench process's peak minus its peak before loading the "
                            "model.",), collapsed=True))
    files = file_rows(data)
    if files:
        out.append(Section("files", "Files", ["File", "Bytes", "SHA-256"], files,
                           collapsed=True))
    env = [[label, data.environment[key]] for key, label in ENVIRONMENT_LABELS
           if data.environment.get(key)]
    recipe = [["recipe", data.recipe_ref],
              ["recipe SHA-256", data.recipe_sha256 or MISSING]]
    out.append(Section("environment", "Environment", ["", ""], env + recipe, collapsed=True))
    return out


def _table(header: list[str], rows: list[list[str]],
           numeric: list[bool] | None = None) -> list[str]:
    numeric = numeric or [False] * len(header)
    lines = ["| " + " | ".join(_escape(h) for h in header) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(data: ReportData, advice: Advice, plots: tuple[Plot, ...]) -> str:
    """The whole report.md text."""
    cols = columns(data)
    picks = picks_section(data, advice)
    lines = [f"## {data.model}: which file to publish", "", f"**{advice.text}**", ""]
    lines += _table(picks.header, picks.rows)
    lines += [""] + [f"{n}" for n in picks.notes] + [""]
    lines += ["### Every variant", ""]
    lines += _table([c.header for c in cols],
                    [[c.cell(row, data) for c in cols] for row in data.rows],
                    [c.numeric for c in cols])
    lines.append("")
    comparisons = imatrix_lines(data)
    if comparisons:
        lines += ["### With and without an importance matrix", ""]
        lines += [f"- {_escape(c)}" for c in comparisons]
        lines.append("")
    for plot in plots:
        lines += [f"![{plot.title}]({plot.png.name})", ""]
    for s in sections(data):
        lines += [f"### {s.title}", ""]
        lines += _table(s.header, s.rows) if s.key != "environment" else \
            [f"- {k}: {v}" for k, v in s.rows]
        lines += [""] + [*s.notes] + ([""] if s.notes else [])
    lines += ["### How these figures were measured", ""]
    lines += [f"- {n}" for n in measured_notes(data)]
    lines += ["", "Columns:", ""]
    lines += [f"- **{_escape(c.header)}**: {c.note}." for c in cols]
    return "\n".join(lines) + "\n"
