"""mathq build --imatrix on the demo model: the matrix as one build step, every type it helps
made plain and as <QUANT>-imat side by side, reruns, replanning, and the report's comparison."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from mathq.convert.gguf_info import read_gguf_header, read_gguf_summary
from mathq.fsutil import sha256_file
from mathq.manifest import Manifest
from mathq.quantize.imatrix_file import load_imatrix, write_imatrix_gguf
from tests.test_build import run, statuses

REPO = Path(__file__).resolve().parent.parent
N = 6
KV_FILE = "quantize.imatrix.file"


def _demo_data():
    """scripts/tiny_demo_data.py, the generator of the demo model's training problems."""
    spec = importlib.util.spec_from_file_location("tiny_demo_data",
                                                  REPO / "scripts" / "tiny_demo_data.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tiny_demo_data", module)
    spec.loader.exec_module(module)
    return module


def write_calibration(path: Path, n: int) -> Path:
    """``n`` of the demo model's training problems (never its held-out smoke problems)."""
    data = _demo_data()
    held_out = {p.problem for p in data.heldout_problems()}
    rows = [{**data.to_math_record(p, i), "unique_id": f"calib/{i}"}
            for i, p in enumerate(data.training_problems(n, held_out))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_calibration(tmp_path_factory.mktemp("calib") / "calib.jsonl", 60)


def build(root: Path, quants: str, *extra: str, code: int = 0):
    return run("build", "tiny-demo", "--quant", quants, "--build-dir", str(root), *extra,
               code=code)


def plan(root: Path, quants: str, *extra: str) -> dict[str, str]:
    out = build(root, quants, "--dry-run", "--json", *extra).stdout
    return {p["name"]: p["status"] for p in json.loads(out)}


def tensor(path: Path, name: str) -> bytes:
    from gguf import GGUFReader

    return next(bytes(t.data) for t in GGUFReader(path).tensors if t.name == name)


def test_imatrix_build_makes_both_variants_reruns_nothing_and_replans_on_a_new_matrix(
        tmp_path, calib):
    args = ("--imatrix", "-c", str(calib), "--files-only")
    first = build(tmp_path, "Q4_K_M,Q8_0", *args)
    assert list(statuses(first.stderr).items()) == [
        ("convert", "done"), ("imatrix", "done"), ("quantize Q4_K_M", "done"),
        ("quantize Q4_K_M-imat", "done"), ("quantize Q8_0", "done"), ("modelfiles", "done")]
    root = tmp_path / "tiny-demo"
    matrix = root / "tiny-demo.imatrix.gguf"
    plain, imat = root / "tiny-demo-Q4_K_M.gguf", root / "tiny-demo-Q4_K_M-imat.gguf"
    assert read_gguf_summary(imat).file_type_name == "Q4_K_M"
    header = read_gguf_header(imat).values
    # Names, not paths: the GGUF may be uploaded, and no folder of this machine goes with it.
    assert header[KV_FILE] == matrix.name
    assert header["quantize.imatrix.dataset"] == calib.name
    assert KV_FILE not in read_gguf_header(plain).values
    assert tensor(plain, "blk.0.ffn_down.weight") != tensor(imat, "blk.0.ffn_down.weight")
    assert not (root / "tiny-demo-Q8_0-imat.gguf").exists()  # 8 bits: the matrix is not used
    assert (root / "tiny-demo.imatrix.txt").read_text(encoding="utf-8").startswith("User: ")
    manifest = Manifest(root / "manifest.json")
    record = manifest.get(matrix.name)
    assert record.stage == "imatrix" and record.inputs["model"] == "tiny-demo-BF16.gguf"
    assert (record.settings["n_ctx"], record.settings["chunks"]) == (512, 100)  # the defaults
    assert manifest.get(imat.name).inputs["imatrix_sha256"] == sha256_file(matrix)
    assert "imatrix_sha256" not in manifest.get(plain.name).inputs
    # The Modelfiles point at the plain variants the recipe tags.
    assert "tiny-demo-Q4_K_M.gguf" in (root / "modelfiles" / "q4_K_M.Modelfile").read_text()

    again = build(tmp_path, "Q4_K_M,Q8_0", *args)
    assert set(statuses(again.stderr).values()) == {"skipped"}
    assert set(plan(tmp_path, "Q4_K_M,Q8_0", *args).values()) == {"skipped"}

    # Other calibration text: the matrix and what reads it are due, the rest is current.
    other = write_calibration(tmp_path / "other.jsonl", 30)
    replanned = plan(tmp_path, "Q4_K_M,Q8_0", "--imatrix", "-c", str(other), "--files-only")
    assert {k for k, v in replanned.items() if v == "planned"} == {
        "imatrix", "quantize Q4_K_M-imat"}
    # A matrix replaced behind the build's back: its record still matches, but the
    # variant made from the old bytes is due again.
    old = load_imatrix(matrix)
    write_imatrix_gguf(matrix, {n: v * 2 + 1 for n, v in old.entries.items()},
                       {n: np.array([1.0]) for n in old.entries}, old.datasets, 1, 512)
    swapped = plan(tmp_path, "Q4_K_M,Q8_0", *args)
    assert {k for k, v in swapped.items() if v == "planned"} == {"quantize Q4_K_M-imat"}
    assert swapped["imatrix"] == "skipped"
    # Without --imatrix the build is what it always was.
    assert plan(tmp_path, "Q4_K_M,Q8_0", "--files-only") == {
        "convert": "skipped", "quantize Q4_K_M": "skipped", "quantize Q8_0": "skipped",
        "modelfiles": "skipped"}


def test_types_that_need_a_matrix_are_built_only_with_it(tmp_path, calib):
    refused = build(tmp_path, "IQ2_XXS", "--files-only", code=2)
    assert refused.output.strip() == ("Error: IQ2_XXS needs an importance matrix (add "
                                      "--imatrix: the build computes one and makes "
                                      "IQ2_XXS-imat)")
    assert not (tmp_path / "tiny-demo").exists()
    done = build(tmp_path, "IQ2_XXS", "--imatrix", "-c", str(calib), "--files-only")
    assert list(statuses(done.stderr)) == ["convert", "imatrix", "quantize IQ2_XXS-imat"]
    root = tmp_path / "tiny-demo"
    assert read_gguf_summary(root / "tiny-demo-IQ2_XXS-imat.gguf").file_type_name == "IQ2_XXS"
    assert not (root / "tiny-demo-IQ2_XXS.gguf").exists()

    # `mathq quantize` names a variant made with a matrix the same way, and takes the
    # build's matrix for a -imat name.
    out = run("quantize", "tiny-demo", "-Q", "Q2_K-imat", "--build-dir", str(tmp_path)).stdout
    q2 = root / "tiny-demo-Q2_K-imat.gguf"
    assert str(q2) in out
    assert read_gguf_header(q2).values[KV_FILE] == "tiny-demo.imatrix.gguf"
    missing = run("quantize", "tiny-demo", "-Q", "Q4_K_M-imat", "--build-dir",
                  str(tmp_path / "fresh"), code=2)
    assert missing.output.strip() == (
        "Error: Q4_K_M-imat needs an importance matrix (run `mathq imatrix tiny-demo` "
        "first, or pass --imatrix FILE)")


def test_imat_variants_are_measured_and_reported_beside_the_plain_ones(tmp_path, calib):
    build(tmp_path, "Q4_K_M", "--imatrix", "-c", str(calib), "--files-only")
    measured = plan(tmp_path, "Q4_K_M", "--imatrix", "-c", str(calib), "--n", str(N))
    assert [k for k, v in measured.items() if v == "planned"] == [
        "smoke BF16", "smoke Q4_K_M", "smoke Q4_K_M-imat", "bench BF16", "bench Q4_K_M",
        "bench Q4_K_M-imat", "kld Q4_K_M", "kld Q4_K_M-imat", "report"]
    root = tmp_path / "tiny-demo"
    matrix = "tiny-demo.imatrix.gguf"  # as the GGUF names it: the file, not its folder

    # Each measuring command takes the -imat name, and records what build will skip.
    kld = run("kld", "tiny-demo", "--quant", "Q4_K_M,Q4_K_M-imat", "--build-dir", str(tmp_path))
    assert [line.split()[0] for line in kld.stdout.splitlines()[1:]] == ["Q4_K_M",
                                                                        "Q4_K_M-imat"]
    smoke = run("smoke", "tiny-demo", "--quant", "Q4_K_M-imat", "--n", str(N),
                "--build-dir", str(tmp_path))
    assert smoke.stdout.startswith("Q4_K_M-imat ")
    summary = json.loads((root / "smoke" / "Q4_K_M-imat.summary.json").read_text())
    assert summary["accuracy"]["n"] == N and summary["imatrix"] == matrix
    assert summary["gguf"] == "tiny-demo-Q4_K_M-imat.gguf"
    bench = run("bench", "tiny-demo", "-Q", "Q4_K_M-imat", "-r", "1", "-p", "16", "-n", "4",
                "--parallel", "", "--build-dir", str(tmp_path))
    assert bench.stdout.splitlines()[1].startswith("Q4_K_M-imat ")
    assert json.loads((root / "bench" / "Q4_K_M-imat.json").read_text())["imatrix"] == matrix
    after = plan(tmp_path, "Q4_K_M", "--imatrix", "-c", str(calib), "--n", str(N))
    assert after["kld Q4_K_M-imat"] == after["smoke Q4_K_M-imat"] == "skipped"
    assert after["bench Q4_K_M-imat"] == "planned"  # measured with other settings

    out = run("report", "tiny-demo", "--build-dir", str(tmp_path)).stdout
    report = json.loads((root / "report" / "report.json").read_text(encoding="utf-8"))
    rows = {r["quant"]: r for r in report["rows"]}
    assert [r["quant"] for r in report["rows"]] == ["BF16", "Q8_0", "Q4_K_M", "Q4_K_M-imat",
                                                    "Q2_K"]
    plain, imat = rows["Q4_K_M"], rows["Q4_K_M-imat"]
    assert imat["imatrix"] == matrix and plain["imatrix"] is None
    assert imat["imatrix_dataset"] == calib.name
    assert plain["mean_kld"] > 0 and imat["mean_kld"] > 0
    assert plain["accuracy"] is None and imat["accuracy"]["n"] == N
    [pair] = report["imatrix_comparisons"]
    assert pair["variant"] == "Q4_K_M-imat" and pair["plain"] == "Q4_K_M"
    assert pair["mean_kld"] == [plain["mean_kld"], imat["mean_kld"]]
    change = 100 * (imat["mean_kld"] - plain["mean_kld"]) / plain["mean_kld"]
    assert pair["kld_change_pct"] == pytest.approx(change, abs=1e-5)
    assert pair["accuracy"] == [None, summary["accuracy"]["value"]]
    assert pair["accuracy_change_pp"] is None  # one side missing: no difference, not zero

    md = (root / "report" / "report.md").read_text(encoding="utf-8")
    section = md.split("### Every variant\n\n", 1)[1].split("\n\n", 1)[0]
    table = [line.split("|")[1].strip() for line in section.splitlines()[2:]]
    assert table == ["BF16", "Q8_0", "Q4_K_M", "Q4_K_M-imat †", "Q2_K"]
    [line] = [x for x in md.splitlines() if x.startswith("- Q4_K_M-imat vs Q4_K_M: ")]
    decimals = max(4, 2 - int(np.floor(np.log10(min(plain["mean_kld"], imat["mean_kld"])))))
    sign = "+" if change >= 0 else "−"
    assert line.startswith(
        f"- Q4_K_M-imat vs Q4_K_M: mean KLD {plain['mean_kld']:.{decimals}f} → "
        f"{imat['mean_kld']:.{decimals}f} ({sign}{abs(change):.0f} %); same top ")
    assert line.endswith(f"; MATH — → {100 * summary['accuracy']['value']:.1f} %")
    assert (f"- † quantized with an importance matrix (tiny-demo.imatrix.gguf, calibrated on "
            f"{calib.name})") in md
    html = (root / "report" / "report.html").read_text(encoding="utf-8")
    assert f'data-quant="Q4_K_M-imat" data-kind="imatrix" data-imatrix="{matrix}"' in html
    assert '<ul id="imatrix"><li>Q4_K_M-imat vs Q4_K_M: mean KLD' in html
    assert line[2:] in out  # the table `report` and `build` print compares them too


def test_help_and_quants_table_document_the_imatrix_variants():
    text = run("build", "--help").output
    assert "with the matrix as <QUANT>-imat" in " ".join(text.split())
    assert "mathq build deepseek-math-7b-rl --quant Q4_K_M,IQ3_XXS --imatrix" in text
    assert re.search(r"--imatrix\s+Also compute the recipe's importance matrix", text)
    assert re.search(r"-c, --calibration FILE\|SET\s+With --imatrix: the calibration", text)
    assert "[default: math-train]" in text
    rows = {line.split()[0]: line for line in run("quants").output.splitlines()[1:]}
    assert " helps " in rows["Q4_K_M"] and " helps " in rows["Q2_K"]
    assert " required " in rows["IQ2_XXS"]
    assert "helps" not in rows["Q6_K"] and "helps" not in rows["Q4_0"]
