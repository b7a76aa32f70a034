"""mathq build on the bundled demo model: end to end, resumable, and safe to kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mathq.cli import cli
from mathq.convert.gguf_info import read_gguf_summary
from mathq.manifest import Manifest
from mathq.pipeline import default_options, plan_build

REPO = Path(__file__).resolve().parent.parent
QUANTS = "Q8_0,Q4_K_M"
N = 6  # smoke problems per variant: enough to resume half-way, quick on the demo model


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output + result.stderr
    return result


def build_args(root: Path, *extra: str) -> list[str]:
    return ["build", "tiny-demo", "--quant", QUANTS, "--n", str(N), "--build-dir", str(root),
            *extra]


def statuses(stderr: str) -> dict[str, str]:
    out = {}
    for line in stderr.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("done", "skipped"):
            out[rest.split(" in ")[0].split(" (")[0].strip()] = status
    return out


def test_dry_run_plans_everything_and_writes_nothing(tmp_path):
    out = run(*build_args(tmp_path, "--dry-run")).stdout
    *steps, summary = out.splitlines()
    lines = [line.split()[0:3] for line in steps]
    assert ["would", "run", "convert"] in lines
    assert any(w == ["would", "run", "quantize"] for w in lines)
    assert all(w[:2] == ["would", "run"] for w in lines)  # nothing is current yet
    assert summary.startswith(f"{len(steps)} of {len(steps)} steps would run, 0 are current, "
                              "needing about ")
    assert summary.endswith("of disk; nothing was done (--dry-run).")
    assert not (tmp_path / "tiny-demo").exists()


def test_build_then_rerun_redoes_nothing(tmp_path):
    first = run(*build_args(tmp_path))
    root = tmp_path / "tiny-demo"
    manifest = Manifest(root / "manifest.json")
    for q in ("BF16", "Q8_0", "Q4_K_M"):
        path = root / f"tiny-demo-{q}.gguf"
        assert read_gguf_summary(path).file_type_name == q
        assert manifest.get(path.name) is not None
        smoke = json.loads((root / "smoke" / f"{q}.summary.json").read_text())
        assert smoke["accuracy"]["n"] == N  # the reference is smoke-tested too
        if q != "BF16":  # variants draft from BF16's answers, smoke-tested first
            assert smoke["draft_reference"] == str(root / "smoke" / "BF16.jsonl")
            assert smoke["drafted_tokens"] > 0 and smoke["draft_off"] is None
        assert manifest.get(f"smoke/{q}.summary.json").stage == "smoke"
        assert manifest.get(f"bench/{q}.json").inputs["gguf"]["name"] == path.name
    assert manifest.get("kld/BF16.json") is None  # the reference, not measured against itself
    assert manifest.get("kld/Q4_K_M.json").settings["reference"] == "BF16"
    assert sorted(p.name for p in (root / "modelfiles").iterdir()) == [
        "latest.Modelfile", "q4_K_M.Modelfile", "q8_0.Modelfile"]
    report = json.loads((root / "report" / "report.json").read_text())
    rows = {r["quant"]: r for r in report["rows"]}
    assert all(rows[q]["accuracy"] and rows[q]["generation_tps"] for q in ("BF16", "Q8_0",
                                                                          "Q4_K_M"))
    assert rows["Q8_0"]["mean_kld"] < rows["Q4_K_M"]["mean_kld"]
    # The recipe's Q2_K was not built: its row is there, empty, not zero.
    assert rows["Q2_K"]["size_bytes"] is rows["Q2_K"]["accuracy"] is None
    done = statuses(first.stderr)
    assert set(done.values()) == {"done"}
    assert list(done) == ["convert", "quantize Q8_0", "quantize Q4_K_M", "modelfiles",
                          "smoke BF16", "smoke Q8_0", "smoke Q4_K_M", "bench BF16",
                          "bench Q8_0", "bench Q4_K_M", "kld Q8_0", "kld Q4_K_M", "report"]
    # It ends with the report's table (one row per variant) and where the report is.
    table = first.stdout.splitlines()
    assert table[0].split()[:3] == ["Quant", "Advice", "MiB"]
    assert [line.split()[0] for line in table[2:6]] == ["BF16", "Q8_0", "Q4_K_M", "Q2_K"]
    assert f"Report: {root / 'report' / 'report.html'}" in first.stdout
    second = run(*build_args(tmp_path))
    assert set(statuses(second.stderr).values()) == {"skipped"}
    plan = json.loads(run(*build_args(tmp_path, "--dry-run", "--json")).stdout)
    assert {p["status"] for p in plan} == {"skipped"}
    *current, summary = run(*build_args(tmp_path, "--dry-run")).stdout.splitlines()
    assert all(line.startswith("current ") for line in current)
    assert summary == (f"0 of {len(current)} steps would run, {len(current)} are current; "
                       "nothing was done (--dry-run).")
    # A smoke results file replaced since (fewer records): its summary no longer describes
    # it, so that smoke test runs again, and the report that reads both.
    results = root / "smoke" / "Q4_K_M.jsonl"
    results.write_text("".join(results.read_text().splitlines(keepends=True)[:5]))
    plan = {p["name"]: p["status"] for p in
            json.loads(run(*build_args(tmp_path, "--dry-run", "--json")).stdout)}
    assert {name for name, status in plan.items() if status == "planned"} == {
        "smoke Q4_K_M", "report"}


def test_changed_input_replans_what_reads_it(tmp_path):
    run(*build_args(tmp_path, "--files-only"))
    root = tmp_path / "tiny-demo"
    assert not (root / "smoke").exists() and not (root / "report").exists()
    bf16 = root / "tiny-demo-BF16.gguf"
    os.utime(bf16)  # as if reconverted: every variant made from it is out of date
    plan = {p["name"]: p["status"] for p in
            json.loads(run(*build_args(tmp_path, "--dry-run", "--json")).stdout)}
    assert plan["convert"] == "skipped"
    assert plan["quantize Q8_0"] == plan["quantize Q4_K_M"] == "planned"
    assert plan["smoke Q8_0"] == plan["kld Q4_K_M"] == plan["report"] == "planned"


KILLER = """
import os, signal, sys
from dataclasses import replace
from pathlib import Path
from mathq.pipeline import default_options, plan_build, run_steps
from mathq.layout import BuildLayout
from mathq.manifest import Manifest
from mathq.pipeline import default_options, plan_build
from mathq.recipes.recipe import load_recipe

stage, after, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
recipe = load_recipe("tiny-demo")
options = replace(default_options(recipe, "{quants}"), n={n},
                  measure=stage.startswith("smoke"))
layout = BuildLayout.for_model(recipe.name, root)

def progress(event):
    if event.stage.startswith(stage) and event.done >= after:
        os.kill(os.getpid(), signal.SIGKILL)

run_steps(recipe.name, layout.root, plan_build(recipe, options, root),
          Manifest(layout.manifest), progress)
""".replace("{quants}", QUANTS).replace("{n}", str(N))


@pytest.mark.parametrize(("stage", "after", "finished_before"), [
    ("convert", 2, set()),
    ("quantize Q4_K_M", 3, {"convert", "quantize Q8_0"}),
])
def test_sigkill_mid_stage_then_rerun_finishes_without_redoing(tmp_path, stage, after,
                                                               finished_before):
    proc = subprocess.run([sys.executable, "-c", KILLER, stage, str(after), str(tmp_path)],
                          cwd=REPO, env={**os.environ}, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    root = tmp_path / "tiny-demo"
    leftovers = sorted(p.name for p in root.glob("*.partial"))
    assert leftovers, "the kill should land while an artifact is being written"
    rerun = run(*build_args(tmp_path, "--files-only"))
    done = statuses(rerun.stderr)
    assert {name for name, s in done.items() if s == "skipped"} == finished_before
    assert not list(root.glob("*.partial"))
    for q in ("BF16", "Q8_0", "Q4_K_M"):
        assert read_gguf_summary(root / f"tiny-demo-{q}.gguf").file_type_name == q


def test_sigkill_mid_smoke_then_rerun_resumes_the_problems(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLER, "smoke Q8_0", "3", str(tmp_path)],
                          cwd=REPO, env={**os.environ}, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    root = tmp_path / "tiny-demo"
    results = root / "smoke" / "Q8_0.jsonl"
    before = results.read_bytes()
    answered = before.count(b"\n")
    assert 3 <= answered < N and not (root / "smoke" / "Q8_0.summary.json").exists()
    rerun = run(*build_args(tmp_path))
    done = statuses(rerun.stderr)
    assert {name for name, s in done.items() if s == "skipped"} == {
        "convert", "quantize Q8_0", "quantize Q4_K_M", "modelfiles", "smoke BF16"}
    after = results.read_bytes()
    assert after.startswith(before)  # finished problems were kept, not asked again
    ids = [json.loads(line)["id"] for line in after.decode().splitlines()]
    assert len(ids) == len(set(ids)) == N
    summary = json.loads((root / "smoke" / "Q8_0.summary.json").read_text())
    assert summary["accuracy"]["n"] == N  # each problem counted once


def test_no_draft_smoke_tests_token_by_token(tmp_path):
    """--no-draft reaches every smoke test; drafting decides no answer, so turning it back
    on leaves the finished tests current."""
    args = ["build", "tiny-demo", "--quant", "Q8_0", "--n", "4", "--build-dir", str(tmp_path)]
    run(*args, "--no-draft")
    smoke = tmp_path / "tiny-demo" / "smoke"
    for q in ("BF16", "Q8_0"):
        summary = json.loads((smoke / f"{q}.summary.json").read_text())
        assert summary["draft_off"] == "--no-draft" and summary["drafted_tokens"] == 0
        assert summary["draft_reference"] is None
    assert set(statuses(run(*args).stderr).values()) == {"skipped"}


def test_the_plan_sizes_the_kld_reference_and_refuses_what_would_not_fit(tmp_path,
                                                                          monkeypatch):
    """The KLD reference pass (52 MB a chunk at 7B) is in the disk the plan checks up front,
    bounded from above: a build one byte short is refused before any file is written, and
    the real pass fits in what was planned for it."""
    from dataclasses import replace

    from mathq.fsutil import format_bytes
    from mathq.recipes.recipe import load_recipe

    recipe = load_recipe("tiny-demo")
    options = replace(default_options(recipe, "Q8_0,Q2_K"), skip_smoke=True)
    steps = plan_build(recipe, options, tmp_path)
    kld_needs = [s.needs_bytes for s in steps if s.stage == "kld"]
    assert kld_needs[0] > 0 and kld_needs[1:] == [0]  # one pass serves every variant
    total = sum(s.needs_bytes for s in steps)
    argv = ["build", "tiny-demo", "--quant", "Q8_0,Q2_K", "--skip-smoke", "--build-dir",
            str(tmp_path)]
    monkeypatch.setattr("mathq.pipeline.free_bytes", lambda _path: total - 1)
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 1 and f"needs about {format_bytes(total)}" in result.output
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    run(*argv[:-3], "--files-only", *argv[-2:])  # the files; then the pass, as the build runs it
    run("kld", "tiny-demo", "-Q", "Q8_0", "--build-dir", str(tmp_path))
    # The GGUFs were planned by llama.cpp's own arithmetic: BF16 to the byte, each variant
    # (the mixes keep output.weight wider: Q2_K's estimate from its nominal bits fell short)
    # at most 128 KiB over.
    for step in steps:
        if step.stage in ("convert", "quantize"):
            size = step.artifact.stat().st_size
            slack = 0 if step.stage == "convert" else 128 << 10
            assert size <= step.needs_bytes <= size + slack, (step.name, size, step.needs_bytes)
    (reference,) = (tmp_path / "tiny-demo" / "kld").glob("reference-BF16-*.logits")
    assert 0 < reference.stat().st_size <= kld_needs[0]
    assert [s.needs_bytes for s in plan_build(recipe, options, tmp_path)
            if s.stage == "kld"] == [0, 0]  # cached: nothing more to plan for


def test_a_dry_run_says_what_the_run_would_about_disk(tmp_path, monkeypatch):
    """A plan that does not fit is printed, then refused with the run's own line."""
    monkeypatch.setattr("mathq.pipeline.free_bytes", lambda _path: 1000)
    for extra in ((), ("--json",)):
        result = CliRunner().invoke(cli, build_args(tmp_path, "--dry-run", *extra))
        assert result.exit_code == 1, result.output
        assert "this build needs about" in result.stderr and "1000 B is free" in result.stderr
        assert "would run" in result.stdout or "planned" in result.stdout
    assert not (tmp_path / "tiny-demo").exists()
