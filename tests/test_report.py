"""The report: table model, plots, report.md/.html/.json, and the page in Chromium.

The statistics and the recommendation have their own tests (test_report_advice.py); here a
build folder of hand-written summaries and per-problem results goes through the whole
report, whose HTML is then read back: by a parser, against report.json number by number, and
by a real headless Chromium at desktop and phone widths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
from html import unescape as html_unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mathq.cli import cli
from mathq.evaluate.summaries import (
    BenchSummary,
    KldSummary,
    MeanSd,
    SmokeSummary,
    save_summary,
    wilson_rate,
)
from mathq.fsutil import format_bytes
from mathq.layout import BuildLayout
from mathq.report.cells import MISSING
from mathq.report.stage import build_report
from tests.buildfolder import TINY_MODEL, link_ggufs, write_tiny_recipe
from tests.test_report_advice import assert_options_exist

VARIANTS = ("Q8_0", "Q6_K", "Q4_K_M", "Q2_K")
ORDER = ["BF16", "Q8_0", "Q6_K", "Q4_K_M", "Q2_K"]


ENV = {"mathq": "0.1.0", "llama_cpp_python": "0.3.36", "llama_cpp_commit": "0c1e570",
       "ggml": "0.25.3", "cpu": "Test CPU 9000", "cores": "16", "threads": "16",
       "os": "Linux 6.1", "python": "3.11.7", "date": "2025-03-01 10:00 UTC"}


def _smoke(quant: str, correct: int) -> SmokeSummary:
    acc = wilson_rate(correct, 100)
    return SmokeSummary(
        model=TINY_MODEL, quant=quant, gguf=f"{TINY_MODEL}-{quant}.gguf", suite="math500",
        suite_source="tests/fixtures/math500/test.jsonl", backend="llama.cpp", parallel=1,
        max_tokens=1024, accuracy=acc,
        by_subject={"Algebra": wilson_rate(min(correct, 60) // 2, 60),
                    "Geometry": wilson_rate(max(correct - 30, 0), 40)},
        by_level={"1": wilson_rate(min(correct, 50), 50),
                  "5": wilson_rate(max(correct - 50, 0), 50)},
        prompt_tokens=21_400, completion_tokens=48_250, generation_tokens_per_second=9.8,
        wall_seconds=4921.0, reference_accuracy=51.7, reference_source="DeepSeekMath paper",
        environment=ENV)


def _results(layout: BuildLayout, quant: str, correct: int) -> None:
    """Per-problem verdicts: problems p0..p99, the first ``correct`` of them solved, so a
    variant's misses always include the reference's (its losses are all one-sided)."""
    path = layout.smoke_results(quant)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"p{i}", "answer": "1", "completion": "x",
                                        "verdict": "correct" if i < correct else "wrong"})
                            + "\n" for i in range(100)), encoding="utf-8")


def _bench(quant: str, size: int, bpw: float, pp: float, tg: float, rss: int) -> BenchSummary:
    return BenchSummary(
        model=TINY_MODEL, quant=quant, gguf=f"{TINY_MODEL}-{quant}.gguf", file_size=size,
        bits_per_weight=bpw, threads=16, load_seconds=2.1, peak_rss_bytes=rss,
        prompt_tokens_per_second=MeanSd(pp, pp * 0.02, 5),
        generation_tokens_per_second=MeanSd(tg, tg * 0.03, 5),
        throughput_by_parallel={"1": tg, "4": tg * 2.9}, baseline_rss_bytes=140 << 20,
        llama_buffers={"model": size, "kv_cache": 256 << 20, "compute": 300 << 20,
                       "output": 400 << 10},
        buffers_context=512, environment=ENV)


def _kld(quant: str, mean: float, same: int) -> KldSummary:
    return KldSummary(
        model=TINY_MODEL, quant=quant, reference="BF16", corpus="mathq's bundled math notes",
        n_tokens=4335, mean_kld=mean, mean_kld_err=mean * 0.01,
        kld_percentiles={"max": mean * 60, "99.9": mean * 30, "99": mean * 12, "95": mean * 4,
                         "90": mean * 2.5, "median": mean * 0.3, "10": 0.0, "5": 0.0,
                         "1": 0.0, "0.1": 0.0, "min": -1e-5},
        same_top=wilson_rate(same, 4335), rms_delta_p=4 * mean ** 0.5 / 10,
        rms_delta_p_err=0.0004, ppl=4.1, ppl_reference=4.0, n_ctx=512, n_chunks=17,
        environment=ENV)


@pytest.fixture
def build(tmp_path: Path, tiny_quant_ggufs: dict[str, Path]) -> tuple[Path, BuildLayout]:
    """BF16, Q8_0, Q4_K_M as real GGUFs; Q2_K measured but its GGUF deleted; Q6_K nothing."""
    recipe = write_tiny_recipe(tmp_path / "tiny.toml", VARIANTS)
    layout = link_ggufs(tmp_path / "build", tiny_quant_ggufs)
    for quant, correct in (("BF16", 52), ("Q8_0", 51), ("Q4_K_M", 47), ("Q2_K", 31)):
        summary = _smoke(quant, correct)
        if quant == "Q8_0":  # drafted from BF16's answers
            summary = dataclasses.replace(summary, draft_reference="smoke/BF16.jsonl",
                                          drafted_tokens=42_000, accepted_tokens=41_160,
                                          decode_steps=8_772, tokens_per_step=5.5)
        save_summary(layout.smoke_summary(quant), summary)
        _results(layout, quant, correct)
    bf16, q8 = layout.gguf("BF16").stat().st_size, layout.gguf("Q8_0").stat().st_size
    save_summary(layout.bench_summary("BF16"), _bench("BF16", bf16, 16.0, 61.0, 3.9, 14 << 30))
    save_summary(layout.bench_summary("Q8_0"), _bench("Q8_0", q8, 8.5, 83.0, 7.1, 8 << 30))
    save_summary(layout.bench_summary("Q2_K"),
                 _bench("Q2_K", 2_532_000_000, 2.96, 95.0, 15.2, 3 << 30))
    save_summary(layout.kld_summary("Q8_0"), _kld("Q8_0", 0.00121, 4280))
    save_summary(layout.kld_summary("Q4_K_M"), _kld("Q4_K_M", 0.0302, 3990))
    save_summary(layout.kld_summary("Q2_K"), _kld("Q2_K", 0.441, 3300))
    return recipe, layout


def test_report_json_has_every_figure_and_missing_ones_as_null(build) -> None:
    recipe, layout = build
    result = build_report(recipe, build_root=layout.root.parent)
    assert result.markdown == layout.report_dir / "report.md"
    data = json.loads(result.json.read_text(encoding="utf-8"))
    rows = {r["quant"]: r for r in data["rows"]}
    assert [r["quant"] for r in data["rows"]] == ORDER
    for q in ("BF16", "Q8_0", "Q4_K_M"):
        path = layout.gguf(q)
        assert rows[q]["size_bytes"] == path.stat().st_size  # read from the GGUF
        assert rows[q]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rows["Q2_K"]["size_bytes"] == 2_532_000_000  # GGUF gone: bench's figure
    assert rows["Q2_K"]["bits_per_weight"] == 2.96 and rows["Q2_K"]["sha256"] is None
    assert rows["Q8_0"]["accuracy"] == {"k": 51, "n": 100, "value": 0.51,
                                        "low": pytest.approx(0.4135, abs=1e-4),
                                        "high": pytest.approx(0.6058, abs=1e-4)}
    # Paired with BF16 on the same 100 problems: Q8_0 misses one BF16 solved, Q2_K 21.
    q8 = rows["Q8_0"]["paired"]
    assert (q8["n"], q8["both"], q8["reference_only"], q8["variant_only"]) == (100, 51, 1, 0)
    assert q8["difference"] == pytest.approx(-0.01) and q8["p_value"] == 1.0
    assert not q8["significant_loss"]
    q2 = rows["Q2_K"]["paired"]
    assert q2["reference_only"] == 21 and q2["p_value"] == pytest.approx(2 / 2**21)
    assert q2["significant_loss"] and q2["high"] < 0
    assert rows["BF16"]["paired"] is None  # it is the reference
    assert rows["Q8_0"]["delta_vs_paper_pp"] == pytest.approx(51 - 51.7)
    assert rows["BF16"]["is_kld_reference"] and rows["BF16"]["mean_kld"] is None
    assert rows["Q4_K_M"]["mean_kld"] == 0.0302 and rows["Q4_K_M"]["kld_p99"] == 0.0302 * 12
    assert rows["Q4_K_M"]["prompt_tps"] is None and rows["Q4_K_M"]["peak_rss_bytes"] is None
    # Memory: llama.cpp's buffers, and the peak RSS over the baseline before loading.
    assert rows["Q8_0"]["llama_buffers"]["kv_cache"] == 256 << 20
    assert rows["Q8_0"]["llama_total_bytes"] == (rows["Q8_0"]["size_bytes"] + (556 << 20)
                                                 + (400 << 10))
    assert rows["Q8_0"]["rss_over_baseline_bytes"] == (8 << 30) - (140 << 20)
    assert rows["Q8_0"]["by_subject"]["Geometry"]["k"] == 21
    assert rows["Q8_0"]["kind"] == "stock" and rows["Q8_0"]["size_class"] == 8
    # The smoke run's work: wall time, and what drafting did where it drafted.
    assert (rows["Q8_0"]["smoke_seconds"], rows["Q8_0"]["tokens_per_step"],
            rows["Q8_0"]["drafts_kept"]) == (4921.0, 5.5, pytest.approx(0.98))
    assert (rows["BF16"]["tokens_per_step"], rows["BF16"]["drafts_kept"]) == (None, None)
    q6 = dict(rows["Q6_K"])  # in the recipe, never built or measured
    assert q6.pop("quant") == "Q6_K" and q6.pop("nominal_bpw") == 6.5625
    assert q6.pop("ollama_tags") == [f"{TINY_MODEL}:q6_k"] and q6.pop("is_kld_reference") is False
    assert q6.pop("kind") == "stock" and q6.pop("size_class") == 6
    assert {k: v for k, v in q6.items() if v not in (None, {})} == {}
    assert rows["Q2_K"]["ollama_tags"] == [f"{TINY_MODEL}:latest", f"{TINY_MODEL}:q2_k"]
    advice = data["advice"]
    assert advice["quant"] == "Q4_K_M" and advice["frontier"] == ["Q4_K_M", "Q8_0"]
    assert [(p["label"], p["quant"]) for p in advice["picks"]] == [
        ("2-bit", None), ("4-bit", "Q4_K_M"), ("6-bit", None), ("8-bit", "Q8_0")]
    assert advice["picks"][1]["publish_command"] == (
        f"mathq publish {recipe} --tag q4_k_m --namespace NS")
    assert data["accuracy_reference"] == "BF16" and data["kld"]["reference"] == "BF16"
    assert data["paper"]["accuracy"] == 51.7
    assert data["environment"]["cpu"] == "Test CPU 9000"
    assert data["recipe_sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()
    assert data["sources"]["kld/Q2_K"] == "kld/Q2_K.json"
    assert {p: v["points"] for p, v in data["plots"].items()} == {
        "accuracy": 3, "kld": 3, "speed": 6}


def test_markdown_table_shows_missing_as_a_dash_never_zero(build) -> None:
    recipe, layout = build
    result = build_report(recipe, build_root=layout.root.parent)
    text = result.markdown.read_text(encoding="utf-8")
    section = text.split("### Every variant\n\n", 1)[1].split("\n\n", 1)[0]
    table = section.splitlines()
    assert len(table) == 2 + len(ORDER)
    assert [line.split("|")[1].strip() for line in table[2:]] == ORDER
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:8] == ["Quant", "Advice", "GiB", "Bits/weight", "MATH % [95 % CI]",
                          "Δ vs BF16 (pp) [95 % CI]", "p", "Δ vs paper (pp)"]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in table[2:]}
    q6 = cells["Q6_K"]
    assert q6[0] == "Q6_K" and q6[1] == "not measured" and set(q6[2:-1]) == {MISSING}
    q4 = cells["Q4_K_M"]
    assert q4[1] == "★ 4-bit pick" and q4[4] == "47.0 [37.5, 56.7]"
    # 5 losses, no gain: the interval just excludes 0 while the (conservative) exact test
    # gives p = 2/32; the advice follows the test, and the notes say so.
    assert q4[5] == "−5.0 [−9.6, −0.3]" and q4[6] == "0.06" and q4[7] == "−4.7"
    assert q4[8] == "0.0302 ± 0.0003" and q4[9] == "92.04"
    assert q4[10] == q4[11] == MISSING and q4[12] == "4921 s"  # undrafted: time only
    assert cells["Q8_0"][12] == "4921 s · 5.5 tok/step · 98 % kept"
    assert cells["Q2_K"][1] == "loses accuracy" and cells["Q2_K"][6] == "< 0.001"
    bf16 = cells["BF16"]
    assert bf16[1] == bf16[5] == bf16[6] == bf16[8] == "reference"
    memory = layout.gguf("BF16").stat().st_size + (556 << 20) + (400 << 10)
    assert bf16[13] == format_bytes(memory)
    assert text.startswith(f"## {TINY_MODEL}: which file to publish\n\n**Publish Q4_K_M (")
    assert "| 4-bit | Q4_K_M ★ | Q4_K_M (" in text
    assert f"`mathq publish {recipe} --tag q4_k_m --namespace NS`" in text
    for name, title in (("accuracy", "MATH accuracy against BF16 by bits per weight"),
                        ("kld", "KL divergence from BF16 by bits per weight, with the frontier"),
                        ("speed", "Tokens per second by bits per weight")):
        assert f"![{title}]({name}.png)" in text
    for heading in ("Accuracy by subject", "Accuracy by level", "Memory", "Files",
                    "Environment", "How these figures were measured"):
        assert f"### {heading}\n" in text
    assert "| Geometry | 22/40 (55.0 %) | 21/40 (52.5 %) | 17/40 (42.5 %) | 1/40 (2.5 %) |" \
        in text
    assert f"| {TINY_MODEL}-Q8_0.gguf | {layout.gguf('Q8_0').stat().st_size} | " in text
    assert "- CPU: Test CPU 9000\n" in text and "- measured: 2025-03-01 10:00 UTC\n" in text
    assert "MATH accuracy: `mathq smoke` on 100 problems from " in text
    assert "the recommendation follows the test" in text
    assert "problems of problems" not in text and "--kld-bound" not in text
    assert_options_exist(text)


def _not_blank(png: Path) -> None:
    import matplotlib.image

    pixels = matplotlib.image.imread(png)[..., :3]
    inked = (pixels < 0.9).any(axis=2).mean()
    assert 0.01 < inked < 0.6, f"{png.name}: {inked:.1%} of pixels drawn"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_plots_are_wide_drawn_and_reproducible(build) -> None:
    recipe, layout = build
    first = build_report(recipe, build_root=layout.root.parent)
    blue = np.array([0x1f, 0x5f, 0x99]) / 255  # the colour of stock variants
    gold = np.array([0xd4, 0xa2, 0x0a]) / 255  # the ring around a pick
    import matplotlib.image

    for plot in first.plots:
        assert plot.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        _not_blank(plot.png)
        pixels = matplotlib.image.imread(plot.png)[..., :3]
        assert pixels.shape[1] >= 1800, plot.name  # >= 900 px at 2x
        assert (np.abs(pixels - blue).max(axis=2) < 0.05).sum() > 30, plot.name
        svg = plot.svg.read_text(encoding="utf-8")
        assert "<svg" in svg and "bits per weight (log scale)" in svg
        if plot.name != "speed":
            assert (np.abs(pixels - gold).max(axis=2) < 0.05).sum() > 30, plot.name
    kld_svg = first.plots[1].svg.read_text(encoding="utf-8")
    assert "frontier (qualifying, undominated)" in kld_svg and "★ recommended" in kld_svg
    assert "faded: loses accuracy vs BF16" in kld_svg
    before = {p: p.read_bytes() for p in first.markdown.parent.iterdir()}
    build_report(recipe, build_root=layout.root.parent)
    after = {p: p.read_bytes() for p in first.markdown.parent.iterdir()}
    assert sorted(p.name for p in after) == sorted(
        ["report.md", "report.html", "report.json", "accuracy.png", "accuracy.svg", "kld.png",
         "kld.svg", "speed.png", "speed.svg"])
    for p in after:
        if p.suffix != ".png":  # PNG bytes may differ by zlib build; the rest must not
            assert after[p] == before[p], p.name


def test_plots_join_no_two_variants_with_a_line(build) -> None:
    """Each variant is one marker: apart from the frontier's step line and the reference
    lines, no drawn line has more than one point."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.lines import Line2D

    from mathq.report import plots as plots_module
    from mathq.report.advice import with_advice
    from mathq.report.table import collect

    recipe, layout = build
    from mathq.recipes.recipe import load_recipe

    data = with_advice(collect(load_recipe(recipe), layout))
    import matplotlib.pyplot as plt

    for name, draw in (("accuracy", plots_module._accuracy), ("kld", plots_module._kld)):
        fig, ax = plt.subplots()
        draw(ax, data)
        for line in ax.get_lines():
            if isinstance(line, Line2D) and len(line.get_xdata()) > 1:
                xs = set(np.round(np.asarray(line.get_xdata(), dtype=float), 6))
                label = line.get_label()
                # axhline spans the axes (x 0..1 in axes coordinates); the frontier is a step
                assert label.startswith(("BF16", "frontier")) or xs == {0.0, 1.0}, \
                    (name, label, xs)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2)
    plots_module._speed(axes, data)
    for ax in axes:
        assert all(len(line.get_xdata()) <= 2 and line.get_linestyle() in ("None", "-")
                   for line in ax.get_lines())
        assert not [line for line in ax.get_lines() if len(line.get_xdata()) > 1
                    and line.get_marker() not in ("", "None", None, "_")]
    plt.close(fig)


class _TableRows(HTMLParser):
    """Counts <tr class="variant"> inside table#variants' tbody, and <svg> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.in_table = self.in_body = False
        self.rows: list[str] = []
        self.svgs = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("id") == "variants":
            self.in_table = True
        elif tag == "tbody" and self.in_table:
            self.in_body = True
        elif tag == "tr" and self.in_body and a.get("class") == "variant":
            self.rows.append(a.get("data-quant") or "")
        elif tag == "svg":
            self.svgs += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self.in_body = False
        elif tag == "table":
            self.in_table = False


def test_html_is_self_contained(build) -> None:
    recipe, layout = build
    page = build_report(recipe, build_root=layout.root.parent).html.read_text(encoding="utf-8")
    for forbidden in ("<script", "<link", "<img", " src=", "@import", "url(http", "<iframe"):
        assert forbidden not in page
    assert "<?xml" not in page and "<!DOCTYPE svg" not in page
    parser = _TableRows()
    parser.feed(page)
    assert parser.rows == ORDER and parser.svgs == 3
    assert '<tr class="variant" data-quant="Q4_K_M" data-kind="stock" data-pick="4-bit">' in page
    for section in ("by-subject", "by-level", "memory", "files", "environment"):
        assert f'<details id="{section}"><summary>' in page  # collapsed until opened
    assert_options_exist(re.sub(r"<[^>]+>", "", page))


class _Text(HTMLParser):
    """The page's visible text: everything outside <head>, <style> and the plots' <svg>."""

    def __init__(self) -> None:
        super().__init__()
        self.skip = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("head", "style", "svg"):
            self.skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("head", "style", "svg"):
            self.skip -= 1

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


_NUMBER = re.compile(r"(?<![\w.])[−+-]?\d+(?:\.\d+)?(?![\w.])")
# report.json's strings whose numbers the page may repeat verbatim (names, versions, hashes,
# commands); every other number must be a numeric value of report.json, formatted.
_VERBATIM = ("environment", "model", "recipe_ref", "quant", "gguf", "sha256", "ollama_tags",
             "suite", "corpus", "publish_command", "label", "by_subject", "by_level",
             "source")


def _json_leaves(value: object, key: str = "", verbatim: bool = False,
                 numbers: list[float] | None = None, words: set[str] | None = None
                 ) -> tuple[list[float], set[str]]:
    numbers = [] if numbers is None else numbers
    words = set() if words is None else words
    verbatim = verbatim or key in _VERBATIM
    if isinstance(value, dict):
        for k, v in value.items():
            if verbatim:
                words.update(m.group() for m in _NUMBER.finditer(str(k)))
            _json_leaves(v, k, verbatim, numbers, words)
    elif isinstance(value, list):
        for v in value:
            _json_leaves(v, key, verbatim, numbers, words)
    elif isinstance(value, bool) or value is None:
        pass
    elif isinstance(value, (int, float)):
        numbers.append(float(value))
    elif isinstance(value, str) and verbatim:
        words.update(m.group() for m in _NUMBER.finditer(value))
    return numbers, words


def _from_json(token: str, numbers: list[float], words: set[str]) -> bool:
    if token in words:
        return True
    plain = token.replace("−", "-").lstrip("+")
    decimals = len(plain.split(".")[1]) if "." in plain else 0
    target = abs(float(plain))
    for x in numbers:
        for scale in (1, 100, 2**-10, 2**-20, 2**-30):
            if format(abs(x) * scale, f".{decimals}f") == format(target, f".{decimals}f"):
                return True
    return False


def test_every_number_in_the_html_comes_from_report_json(build) -> None:
    recipe, layout = build
    result = build_report(recipe, build_root=layout.root.parent)
    data = json.loads(result.json.read_text(encoding="utf-8"))
    numbers, words = _json_leaves(data)
    parser = _Text()
    parser.feed(result.html.read_text(encoding="utf-8"))
    text = " ".join(parser.parts)
    tokens = [m.group() for m in _NUMBER.finditer(text)]
    assert len(tokens) > 150  # the page is full of figures; each must come from the JSON
    strays = sorted({t for t in tokens if not _from_json(t, numbers, words)})
    assert not strays, strays
    # The check bites: a figure the JSON does not hold is caught.
    assert not _from_json("47.3", numbers, words) and _from_json("47.0", numbers, words)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; CI must install Debian's chromium "
                        "(.ci/run does: apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    return exe


def _headless(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
             f"--user-data-dir={profile}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120,
                          check=False)


# Injected into a copy of the page (the report itself has no script): opens every <details>,
# then records the page's and each table's width against the viewport, on the page and,
# when it is framed, for the frame's parent.
_MEASURE = """<script>
window.addEventListener("load", () => {
  document.querySelectorAll("details").forEach(d => { d.open = true; });
  const tables = [...document.querySelectorAll("table")].map(t => {
    const r = t.getBoundingClientRect();
    return {id: t.id, left: r.left, right: r.right, scroll: t.scrollWidth, client: t.clientWidth};
  });
  const edge = document.documentElement.clientWidth + 1;
  const wide = [...document.querySelectorAll("body *")]
    .filter(e => e.getBoundingClientRect().right > edge).slice(0, 5)
    .map(e => `${e.tagName}#${e.id}.${e.className} ${(e.textContent || "").slice(0, 60)}`);
  const out = JSON.stringify({viewport: document.documentElement.clientWidth,
                              page: document.documentElement.scrollWidth, tables, wide});
  document.body.setAttribute("data-measure", out);
  if (window.parent !== window) window.parent.postMessage(out, "*");
});
</script>"""

# Headless Chromium will not make a window narrower than 500 px, so a phone's 390 px
# viewport is a 390 px frame: media queries and widths inside it are the phone's.
_PHONE_FRAME = """<!DOCTYPE html><html><body style="margin:0">
<iframe src="{src}" style="border:0; width:{width}px; height:1600px"></iframe>
<script>window.addEventListener("message", e => {{
  document.body.setAttribute("data-measure", e.data); }});</script>
</body></html>"""


@pytest.mark.parametrize("width", [1280, 390])
def test_report_page_fits_desktop_and_phone_widths_in_chromium(build, tmp_path: Path,
                                                                width: int) -> None:
    exe = _chromium()
    recipe, layout = build
    page = build_report(recipe, build_root=layout.root.parent).html
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _MEASURE + "</body>"),
                     encoding="utf-8")
    target, window = probe, width
    if width < 500:
        target, window = page.with_name("phone.html"), 500
        target.write_text(_PHONE_FRAME.format(src=probe.name, width=width), encoding="utf-8")
    shot = tmp_path / "report.png"
    done = _headless(exe, tmp_path / "profile-1", f"--screenshot={shot}",
                     f"--window-size={window},1600", "--virtual-time-budget=5000",
                     target.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, window)
    _not_blank(shot)
    dom = _headless(exe, tmp_path / "profile-2", f"--window-size={window},1600",
                    "--virtual-time-budget=5000", "--dump-dom", target.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    if target == probe:
        parser = _TableRows()
        parser.feed(dom.stdout)
        assert parser.rows == ORDER  # one row per variant, as the browser parsed the page
        assert parser.svgs >= 3
    found = re.search(r'data-measure="([^"]+)"', dom.stdout)
    assert found, "the measuring script did not run"
    measure = json.loads(html_unescape(found.group(1)))
    assert measure["viewport"] == width
    assert measure["page"] <= width, measure["wide"]  # no sideways scrolling of the page
    tables = {t["id"]: t for t in measure["tables"]}
    assert {"picks", "variants", "memory-table", "files-table", "by-subject-table"} <= set(tables)
    for t in measure["tables"]:
        assert t["right"] <= width + 0.5 and t["scroll"] <= t["client"] + 1, t


def test_report_command_prints_the_recommendation_and_paths(build) -> None:
    recipe, layout = build
    root = str(layout.root.parent)
    result = CliRunner().invoke(cli, ["report", str(recipe), "--build-dir", root],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header, rule, *rows = lines[:2 + len(ORDER)]
    assert header.split()[:3] == ["Quant", "Advice", "GiB"] and set(rule) == {"-", " "}
    assert [r.split()[0] for r in rows] == ORDER  # the same table as report.md, as text
    rest = lines[2 + len(ORDER):]
    assert rest[0] == "" and rest[1].startswith("Publish Q4_K_M (")
    assert any(line.startswith("  4-bit: Q4_K_M (") for line in rest)
    assert f"    mathq publish {recipe} --tag q4_k_m --namespace NS" in rest
    assert rest[-1].startswith("5 variants: ") and rest[-1].endswith("report.json")
    assert_options_exist(result.output)
    gone = CliRunner().invoke(cli, ["report", str(recipe), "--kld-bound", "0.1"])
    assert gone.exit_code == 2 and "No such option '--kld-bound'" in gone.output
    out = Path(root) / "site"
    js = CliRunner().invoke(cli, ["report", str(recipe), "--build-dir", root, "--out-dir",
                                  str(out), "--json"], catch_exceptions=False)
    assert json.loads(js.output)["advice"]["quant"] == "Q4_K_M"
    assert (out / "report.html").is_file()


def test_a_build_with_no_measurements_reports_them_missing(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "tiny.toml", VARIANTS, reference_accuracy=None)
    (tmp_path / "build" / TINY_MODEL).mkdir(parents=True)  # made, nothing measured yet
    result = build_report(recipe, build_root=tmp_path / "build")
    assert [r.quant for r in result.data.rows] == ["Q8_0", "Q6_K", "Q4_K_M", "Q2_K"]
    assert result.advice.quant is None
    assert result.advice.text.startswith("No recommendation yet: BF16 was not smoke-tested")
    assert "no MATH accuracy measured yet" in result.plots[0].svg.read_text(encoding="utf-8")
    _not_blank(result.plots[0].png)  # the frame and the note are drawn
    md = result.markdown.read_text(encoding="utf-8")
    assert " 0.0 " not in md and "nan" not in md.lower()
    assert "Δ vs paper" not in md  # no published figure: no column of dashes
    assert_options_exist(md)


def test_a_mistyped_build_dir_is_an_error_that_creates_nothing(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "tiny.toml", VARIANTS)
    typo = tmp_path / "biuld"
    result = CliRunner().invoke(cli, ["report", str(recipe), "--build-dir", str(typo)])
    assert result.exit_code == 1, result.output
    assert result.output == (f"Error: no build folder of {TINY_MODEL} at {typo / TINY_MODEL} "
                             f"(check --build-dir, or make one: mathq build {TINY_MODEL})\n")
    assert not typo.exists()


def test_imatrix_variants_are_marked_and_compared_with_their_plain_sibling(build) -> None:
    recipe, layout = build
    # Q4_K_M-imat: a GGUF (here the plain file's bytes), smoke and KLD summaries naming its
    # matrix. Q2_K-imat: only a KLD summary. Q6_K-imat: a summary, but no plain sibling.
    layout.gguf("Q4_K_M-imat").symlink_to(layout.gguf("Q4_K_M").resolve())
    matrix = str(layout.root / f"{TINY_MODEL}.imatrix.gguf")
    imat_kld = dataclasses.replace(_kld("Q4_K_M-imat", 0.0268, 4010), imatrix=matrix)
    save_summary(layout.kld_summary("Q4_K_M-imat"), imat_kld)
    save_summary(layout.smoke_summary("Q4_K_M-imat"),
                 dataclasses.replace(_smoke("Q4_K_M-imat", 49), imatrix=matrix))
    save_summary(layout.kld_summary("Q2_K-imat"), _kld("Q2_K-imat", 0.39, 3350))
    save_summary(layout.kld_summary("Q6_K-imat"), _kld("Q6_K-imat", 0.004, 4200))
    result = build_report(recipe, build_root=layout.root.parent)
    order = [r.quant for r in result.data.rows]
    assert order == ["BF16", "Q8_0", "Q6_K", "Q6_K-imat", "Q4_K_M", "Q4_K_M-imat", "Q2_K",
                     "Q2_K-imat"]
    md = result.markdown.read_text(encoding="utf-8")
    table = md.split("### Every variant\n\n", 1)[1].split("\n\n", 1)[0]
    quant_cells = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert quant_cells == ["BF16", "Q8_0", "Q6_K", "Q6_K-imat †", "Q4_K_M", "Q4_K_M-imat †",
                           "Q2_K", "Q2_K-imat †"]
    section = md.split("### With and without an importance matrix\n\n", 1)[1].split("\n\n")[0]
    assert section.splitlines() == [
        "- Q4_K_M-imat vs Q4_K_M: mean KLD 0.0302 → 0.0268 (−11 %); same top 92.04 % → "
        "92.50 %; MATH 47.0 % → 49.0 % (+2.0 pp)",
        # Q2_K's accuracy was measured, its -imat sibling's not: missing, no difference.
        "- Q2_K-imat vs Q2_K: mean KLD 0.4410 → 0.3900 (−12 %); same top 76.12 % → 77.28 %; "
        "MATH 31.0 % → —",
    ]  # Q6_K-imat has no plain Q6_K figures to compare with
    assert (f"- † quantized with an importance matrix ({TINY_MODEL}.imatrix.gguf): llama.cpp "
            "spends the type's bits where the calibration text's activations are large.") in md
    data = json.loads(result.json.read_text(encoding="utf-8"))
    q4 = data["imatrix_comparisons"][0]
    assert q4["mean_kld"] == [0.0302, 0.0268] and q4["accuracy"] == [0.47, 0.49]
    assert q4["kld_change_pct"] == pytest.approx(-11.258278, abs=1e-5)
    assert q4["accuracy_change_pp"] == pytest.approx(2.0)
    assert data["imatrix_comparisons"][1]["accuracy_change_pp"] is None
    assert {r["quant"]: r["imatrix"] for r in data["rows"]}["Q4_K_M-imat"] == matrix
    html = result.html.read_text(encoding="utf-8")
    assert f'data-quant="Q4_K_M-imat" data-kind="imatrix" data-imatrix="{matrix}"' in html
    assert html.count("<li>Q") == 2 and "<li>Q2_K-imat vs Q2_K: mean KLD 0.4410" in html
    svg = next(p for p in result.plots if p.name == "kld").svg.read_text(encoding="utf-8")
    assert "importance matrix (-imat)" in svg  # the legend of the open diamonds


def test_tuned_variants_are_found_and_styled_apart(build) -> None:
    recipe, layout = build
    layout.gguf("Q4_K_M-tuned").symlink_to(layout.gguf("Q4_K_M").resolve())
    save_summary(layout.kld_summary("Q4_K_M-tuned"), _kld("Q4_K_M-tuned", 0.0251, 4050))
    save_summary(layout.smoke_summary("Q4_K_M-tuned"), _smoke("Q4_K_M-tuned", 50))
    _results(layout, "Q4_K_M-tuned", 50)
    result = build_report(recipe, build_root=layout.root.parent)
    order = [r.quant for r in result.data.rows]
    assert order.index("Q4_K_M-tuned") == order.index("Q4_K_M") + 1
    row = next(r for r in result.data.rows if r.quant == "Q4_K_M-tuned")
    assert row.kind == "tuned" and row.nominal_bpw == 4.5
    # Same size as Q4_K_M (the same bytes here) and closer to BF16: it takes the 4-bit pick,
    # and `mathq publish` cannot ship it, which the advice says instead of a command.
    pick = next(p for p in result.advice.picks if p.label == "4-bit")
    assert pick.quant == "Q4_K_M-tuned" and pick.publish_command is None
    md = result.markdown.read_text(encoding="utf-8")
    assert "| Q4_K_M-tuned ‡ | ★ 4-bit pick |" in md and "‡ a tuned variant" in md
    html = result.html.read_text(encoding="utf-8")
    assert 'data-quant="Q4_K_M-tuned" data-kind="tuned"' in html
    svg = result.plots[1].svg.read_text(encoding="utf-8")
    assert "tuned (-tuned)" in svg  # its own legend entry (triangles, green)


def test_help_documents_both_commands() -> None:
    for command in ("kld", "report"):
        text = CliRunner().invoke(cli, [command, "--help"]).output
        assert "Examples:" in text and f"mathq {command} deepseek-math-7b-rl" in text
    report_help = CliRunner().invoke(cli, ["report", "--help"]).output
    assert "which file do I publish?" in report_help and "--kld-bound" not in report_help


def test_imatrix_tuned_variants_follow_the_tuned_ones_with_their_own_marker(build) -> None:
    recipe, layout = build
    for name, kld in (("Q4_K_M-imat-tuned", 0.0201), ("Q4_K_M-tuned", 0.0251)):
        layout.gguf(name).symlink_to(layout.gguf("Q4_K_M").resolve())
        save_summary(layout.kld_summary(name), _kld(name, kld, 4050))
    result = build_report(recipe, build_root=layout.root.parent)
    order = [r.quant for r in result.data.rows]
    assert order.index("Q4_K_M-imat-tuned") == order.index("Q4_K_M-tuned") + 1
    row = next(r for r in result.data.rows if r.quant == "Q4_K_M-imat-tuned")
    assert row.kind == "imatrix-tuned" and row.nominal_bpw == 4.5
    assert "| Q4_K_M-imat-tuned †‡ |" in result.markdown.read_text(encoding="utf-8")
    svg = result.plots[1].svg.read_text(encoding="utf-8")
    assert "tuned with a matrix (-imat-tuned)" in svg


def test_a_perfect_score_plots(build) -> None:
    """At 100 % (or 0 %) the Wilson bound, computed in floating point, can land a hair on
    the wrong side of the value: 1.0 with an upper bound of 0.9999999999999999 made
    matplotlib refuse the error bar, and the report with it."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from mathq.recipes.recipe import load_recipe
    from mathq.report import plots as plots_module
    from mathq.report.advice import with_advice
    from mathq.report.table import collect

    recipe, layout = build
    data = with_advice(collect(load_recipe(recipe), layout))
    row = next(r for r in data.rows if r.accuracy is not None)
    perfect = dataclasses.replace(row.accuracy, value=1.0, low=0.7,
                                  high=0.9999999999999999)
    # without BF16's verdicts there are no paired differences: the plot shows accuracy
    data = dataclasses.replace(data, rows=tuple(
        dataclasses.replace(r, accuracy=perfect if r is row else r.accuracy, paired=None)
        for r in data.rows))
    fig, ax = plt.subplots()
    assert plots_module._accuracy(ax, data) > 0
    plt.close(fig)
