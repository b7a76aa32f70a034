"""The report: table model, advice, plots, report.md/.html/.json, and the page in Chromium."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
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
from mathq.layout import BuildLayout
from mathq.report.advice import DEFAULT_KLD_BOUND, advise
from mathq.report.cells import MISSING
from mathq.report.stage import build_report
from mathq.report.table import ReportData, VariantRow
from tests.buildfolder import TINY_MODEL, link_ggufs, write_tiny_recipe

VARIANTS = ("Q8_0", "Q6_K", "Q4_K_M", "Q2_K")
ORDER = ["BF16", "Q8_0", "Q6_K", "Q4_K_M", "Q2_K"]


def _smoke(quant: str, correct: int) -> SmokeSummary:
    acc = wilson_rate(correct, 100)
    return SmokeSummary(
        model=TINY_MODEL, quant=quant, gguf=f"{TINY_MODEL}-{quant}.gguf", suite="math500",
        suite_source="tests/fixtures/math500/test.jsonl", backend="llama.cpp", parallel=1,
        max_tokens=1024, accuracy=acc, by_subject={"Algebra": wilson_rate(correct // 4, 25)},
        by_level={"Level 5": wilson_rate(correct // 5, 20)}, prompt_tokens=21_400,
        completion_tokens=48_250, generation_tokens_per_second=9.8, wall_seconds=4921.0,
        reference_accuracy=51.7, reference_source="DeepSeekMath paper")


def _bench(quant: str, size: int, bpw: float, pp: float, tg: float, rss: int) -> BenchSummary:
    return BenchSummary(
        model=TINY_MODEL, quant=quant, gguf=f"{TINY_MODEL}-{quant}.gguf", file_size=size,
        bits_per_weight=bpw, threads=16, load_seconds=2.1, peak_rss_bytes=rss,
        prompt_tokens_per_second=MeanSd(pp, pp * 0.02, 5),
        generation_tokens_per_second=MeanSd(tg, tg * 0.03, 5),
        throughput_by_parallel={"1": tg, "4": tg * 2.9})


def _kld(quant: str, mean: float, same: int) -> KldSummary:
    return KldSummary(
        model=TINY_MODEL, quant=quant, reference="BF16", corpus="mathq's bundled math notes",
        n_tokens=4335, mean_kld=mean, mean_kld_err=mean * 0.01,
        kld_percentiles={"max": mean * 60, "99.9": mean * 30, "99": mean * 12, "95": mean * 4,
                         "90": mean * 2.5, "median": mean * 0.3, "10": 0.0, "5": 0.0,
                         "1": 0.0, "0.1": 0.0, "min": -1e-5},
        same_top=wilson_rate(same, 4335), rms_delta_p=4 * mean ** 0.5 / 10,
        rms_delta_p_err=0.0004, ppl=4.1, ppl_reference=4.0, n_ctx=512, n_chunks=17)


@pytest.fixture
def build(tmp_path: Path, tiny_quant_ggufs: dict[str, Path]) -> tuple[Path, BuildLayout]:
    """BF16, Q8_0, Q4_K_M as real GGUFs; Q2_K measured but its GGUF deleted; Q6_K nothing."""
    recipe = write_tiny_recipe(tmp_path / "tiny.toml", VARIANTS)
    layout = link_ggufs(tmp_path / "build", tiny_quant_ggufs)
    for quant, correct in (("BF16", 52), ("Q8_0", 51), ("Q4_K_M", 47), ("Q2_K", 31)):
        save_summary(layout.smoke_summary(quant), _smoke(quant, correct))
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
        assert rows[q]["size_bytes"] == layout.gguf(q).stat().st_size  # read from the GGUF
    assert rows["Q2_K"]["size_bytes"] == 2_532_000_000  # GGUF gone: bench's figure
    assert rows["Q2_K"]["bits_per_weight"] == 2.96
    assert rows["Q8_0"]["accuracy"] == {"k": 51, "n": 100, "value": 0.51,
                                        "low": pytest.approx(0.4135, abs=1e-4),
                                        "high": pytest.approx(0.6058, abs=1e-4)}
    assert rows["Q8_0"]["delta_vs_reference_pp"] == pytest.approx(-1.0)
    assert rows["Q8_0"]["delta_vs_paper_pp"] == pytest.approx(51 - 51.7)
    assert rows["BF16"]["delta_vs_reference_pp"] is None  # it is the reference
    assert rows["BF16"]["is_kld_reference"] and rows["BF16"]["mean_kld"] is None
    assert rows["Q4_K_M"]["mean_kld"] == 0.0302 and rows["Q4_K_M"]["kld_p99"] == 0.0302 * 12
    assert rows["Q4_K_M"]["prompt_tps"] is None and rows["Q4_K_M"]["peak_rss_bytes"] is None
    q6 = dict(rows["Q6_K"])  # in the recipe, never built or measured
    assert q6.pop("quant") == "Q6_K" and q6.pop("nominal_bpw") == 6.5625
    assert q6.pop("ollama_tags") == [f"{TINY_MODEL}:q6_k"] and q6.pop("is_kld_reference") is False
    assert set(q6.values()) == {None}
    assert rows["Q2_K"]["ollama_tags"] == [f"{TINY_MODEL}:latest", f"{TINY_MODEL}:q2_k"]
    assert data["advice"]["quant"] == "Q4_K_M" and data["advice"]["kld_bound"] == 0.05
    assert data["accuracy_reference"] == "BF16" and data["kld"]["reference"] == "BF16"
    assert data["paper"]["accuracy"] == 51.7
    assert data["sources"]["kld/Q2_K"] == "kld/Q2_K.json"
    assert {p: v["points"] for p, v in data["plots"].items()} == {
        "accuracy": 4, "kld": 3, "speed": 6}


def test_markdown_table_shows_missing_as_a_dash_never_zero(build) -> None:
    recipe, layout = build
    result = build_report(recipe, build_root=layout.root.parent)
    text = result.markdown.read_text(encoding="utf-8")
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(ORDER)
    assert [line.split("|")[1].strip() for line in table[2:]] == ORDER
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:6] == ["Quant", "GiB", "Bits/weight", "MATH % [95 % CI]",
                          "Δ vs BF16 (pp)", "Δ vs paper (pp)"]
    q6 = [c.strip() for c in table[4].strip("|").split("|")]
    assert q6[0] == "Q6_K" and set(q6[1:-1]) == {MISSING}
    q4 = [c.strip() for c in table[5].strip("|").split("|")]
    assert q4[3] == "47.0 [37.5, 56.7]" and q4[4] == "−5.0" and q4[5] == "−4.7"
    assert q4[6] == "0.0302 ± 0.0003" and q4[7] == "92.04"
    assert q4[8] == q4[9] == q4[10] == MISSING
    bf16 = [c.strip() for c in table[2].strip("|").split("|")]
    assert bf16[4] == "reference" and bf16[6] == "reference" and bf16[10] == "14.00 GiB"
    assert "**Advice:** Smallest variant whose MATH accuracy interval overlaps BF16's MATH " \
           "interval and whose mean KL divergence is under 0.05: Q4_K_M" in text
    for name, title in (("accuracy", "MATH accuracy vs file size"),
                        ("kld", "KL divergence vs file size"),
                        ("speed", "Tokens per second vs file size")):
        assert f"![{title}]({name}.png)" in text


def _not_blank(png: Path) -> None:
    import matplotlib.image

    pixels = matplotlib.image.imread(png)[..., :3]
    inked = (pixels < 0.9).any(axis=2).mean()
    assert 0.02 < inked < 0.6, f"{png.name}: {inked:.1%} of pixels drawn"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_plots_are_drawn_and_reproducible(build) -> None:
    recipe, layout = build
    first = build_report(recipe, build_root=layout.root.parent)
    blue = np.array([0x1f, 0x5f, 0x99]) / 255  # the colour of measured points
    for plot in first.plots:
        assert plot.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        _not_blank(plot.png)
        import matplotlib.image

        pixels = matplotlib.image.imread(plot.png)[..., :3]
        assert (np.abs(pixels - blue).max(axis=2) < 0.05).sum() > 30, plot.name
        assert "<svg" in plot.svg.read_text(encoding="utf-8")
    before = {p: p.read_bytes() for p in first.markdown.parent.iterdir()}
    build_report(recipe, build_root=layout.root.parent)
    after = {p: p.read_bytes() for p in first.markdown.parent.iterdir()}
    assert sorted(p.name for p in after) == sorted(
        ["report.md", "report.html", "report.json", "accuracy.png", "accuracy.svg", "kld.png",
         "kld.svg", "speed.png", "speed.svg"])
    for p in after:
        if p.suffix != ".png":  # PNG bytes may differ by zlib build; the rest must not
            assert after[p] == before[p], p.name


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
             "--disable-dev-shm-usage", f"--user-data-dir={profile}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_report_page_renders_in_headless_chromium(build, tmp_path: Path) -> None:
    exe = _chromium()
    recipe, layout = build
    page = build_report(recipe, build_root=layout.root.parent).html
    shot = tmp_path / "report.png"
    done = _headless(exe, tmp_path / "profile-1", f"--screenshot={shot}",
                     "--window-size=1400,2200", page.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2200, 1400)
    _not_blank(shot)
    dom = _headless(exe, tmp_path / "profile-2", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = _TableRows()
    parser.feed(dom.stdout)
    assert parser.rows == ORDER  # one row per variant, as the browser parsed the page
    assert parser.svgs >= 3


def test_report_command_prints_advice_and_paths(build) -> None:
    recipe, layout = build
    root = str(layout.root.parent)
    result = CliRunner().invoke(cli, ["report", str(recipe), "--build-dir", root,
                                      "--kld-bound", "0.01"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header, rule, *rows, blank, advice, files = lines
    assert header.split()[:2] == ["Quant", "GiB"] and set(rule) == {"-", " "} and blank == ""
    assert [r.split()[0] for r in rows] == ORDER  # the same table as report.md, as text
    assert advice == ("Smallest variant whose MATH accuracy interval overlaps BF16's MATH "
                      "interval and whose mean KL divergence is under 0.01: Q8_0, "
                      f"{layout.gguf('Q8_0').stat().st_size / 2**30:.2f} GiB.")
    assert files.startswith("5 variants: ") and files.endswith("report.json")
    bad = CliRunner().invoke(cli, ["report", str(recipe), "--kld-bound", "0"])
    assert bad.exit_code == 2 and "Invalid value for '--kld-bound'" in bad.output
    out = Path(root) / "site"
    js = CliRunner().invoke(cli, ["report", str(recipe), "--build-dir", root, "--out-dir",
                                  str(out), "--json"], catch_exceptions=False)
    assert json.loads(js.output)["advice"]["quant"] == "Q4_K_M"
    assert (out / "report.html").is_file()


def test_a_build_with_no_measurements_reports_them_missing(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path / "tiny.toml", VARIANTS, reference_accuracy=None)
    result = build_report(recipe, build_root=tmp_path / "build")
    assert [r.quant for r in result.data.rows] == ["Q8_0", "Q6_K", "Q4_K_M", "Q2_K"]
    assert result.advice.quant is None
    assert result.advice.text.startswith("No advice yet: no quantized variant has both")
    assert "no MATH accuracy measured yet" in result.plots[0].svg.read_text(encoding="utf-8")
    _not_blank(result.plots[0].png)  # the frame and the note are drawn
    md = result.markdown.read_text(encoding="utf-8")
    assert " 0.0 " not in md and "nan" not in md.lower()


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
    quant_cells = [line.split("|")[1].strip() for line in md.splitlines()
                   if line.startswith("| ")][1:]
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
    assert f'data-quant="Q4_K_M-imat" data-imatrix="{matrix}"' in html
    assert html.count("<li>Q") == 2 and "<li>Q2_K-imat vs Q2_K: mean KLD 0.4410" in html
    svg = next(p for p in result.plots if p.name == "kld").svg.read_text(encoding="utf-8")
    assert "with importance matrix" in svg  # the legend of the open diamonds


def _row(quant: str, size: int, correct: int | None, kld: float | None) -> VariantRow:
    return VariantRow(
        quant=quant, gguf=None, size_bytes=size, bits_per_weight=None, nominal_bpw=4.5,
        accuracy=wilson_rate(correct, 100) if correct is not None else None,
        delta_vs_reference_pp=None, delta_vs_paper_pp=None, mean_kld=kld, mean_kld_err=None,
        kld_p99=None, same_top=None, rms_delta_p=None, is_kld_reference=quant == "BF16",
        prompt_tps=None, generation_tps=None, peak_rss_bytes=None, ollama_tags=(),
        imatrix=None)


def _data(rows: list[VariantRow], reference: str | None = "BF16",
          paper: float | None = 51.7) -> ReportData:
    return ReportData(model="m", recipe="r.toml", rows=tuple(rows), accuracy_reference=reference,
                      paper_accuracy=paper, paper_source="", smoke_suite=None, smoke_n=None,
                      kld_reference="BF16", kld_corpus=None, kld_positions=None,
                      bench_threads=None, sources={})


def test_advice_rules() -> None:
    bf16 = _row("BF16", 14 << 30, 52, None)
    q8, q4 = _row("Q8_0", 7 << 30, 51, 0.001), _row("Q4_K_M", 4 << 30, 47, 0.03)
    q3 = _row("Q3_K_M", 3 << 30, 45, 0.07)  # overlaps, but diverges too far
    q2 = _row("Q2_K", 2 << 30, 30, 0.04)    # close enough in KLD, but its interval is apart
    assert advise(_data([bf16, q8, q4, q3, q2])).quant == "Q4_K_M"
    assert advise(_data([bf16, q8, q4, q3, q2]), kld_bound=0.1).quant == "Q3_K_M"
    assert advise(_data([bf16, q8, q4]), kld_bound=0.0005).text == (
        "No variant both overlaps BF16's MATH interval and has a mean KL divergence under "
        "0.0005; keep the reference or raise --kld-bound knowingly.")
    # No BF16 accuracy: the published figure must lie inside the variant's interval.
    paper = advise(_data([q8, q4, q2], reference=None))
    assert paper.quant == "Q4_K_M" and "the published MATH figure (51.7 %)" in paper.text
    assert advise(_data([q8, q4], reference=None, paper=None)).text.startswith(
        "No advice yet: a reference MATH accuracy is unknown")
    # A variant without a KLD measurement never qualifies, however small.
    assert advise(_data([bf16, q8, _row("Q2_K", 1 << 30, 52, None)])).quant == "Q8_0"
    assert DEFAULT_KLD_BOUND == 0.05


def test_help_documents_both_commands() -> None:
    for command in ("kld", "report"):
        text = CliRunner().invoke(cli, [command, "--help"]).output
        assert "Examples:" in text and f"mathq {command} deepseek-math-7b-rl" in text
    assert re.search(r"--kld-bound FLOAT RANGE\s+Mean KL divergence", CliRunner().invoke(
        cli, ["report", "--help"]).output)
