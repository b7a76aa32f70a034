"""mathq imatrix end to end: a recipe's build folder, reruns, the Hub calibration sets
(through a local fake Hub, then offline), and the errors a user can cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mathq.cli import cli
from mathq.manifest import Manifest
from mathq.quantize.imatrix_file import load_imatrix
from mathq.recipes.prompt import EOS
from tests.conftest import FIXTURES
from tests.hubserver import FakeHub

MATH500 = FIXTURES / "math500" / "test.jsonl"
# The demo recipe's smoke suite, whose problems a calibration text must not contain.
DEMO_PROBLEMS = (Path(__file__).resolve().parent.parent / "models" / "tiny-demo"
                 / "problems-distractor.jsonl")
SMALL = ["--ctx", "64", "--chunks", "2"]


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture()
def files(tmp_path) -> tuple[Path, Path]:
    """Calibration problems (MATH-500's first 300, plus 3 of the demo recipe's graded
    problems) and a graded set for GGUF inputs (MATH-500's other 200 and those 3)."""
    lines = MATH500.read_text(encoding="utf-8").splitlines(keepends=True)
    graded_demo = DEMO_PROBLEMS.read_text(encoding="utf-8").splitlines(keepends=True)[:3]
    copies = []
    for line in graded_demo:
        row = json.loads(line)
        row["unique_id"] = "copy/" + row["unique_id"]
        copies.append(json.dumps(row) + "\n")
    calib, smoke = tmp_path / "calib.jsonl", tmp_path / "smoke.jsonl"
    calib.write_text("".join(lines[:300] + copies), encoding="utf-8")
    smoke.write_text("".join(lines[300:] + graded_demo), encoding="utf-8")
    return calib, smoke


def _build_root(tmp_path: Path, gguf: Path) -> Path:
    root = tmp_path / "build"
    (root / "tiny-demo").mkdir(parents=True)
    (root / "tiny-demo" / "tiny-demo-BF16.gguf").symlink_to(gguf)
    return root


def test_recipe_build_folder_matrix_text_manifest_and_rerun(demo_bf16_gguf, tmp_path, files):
    calib, _ = files
    root = _build_root(tmp_path, demo_bf16_gguf)
    out = run("imatrix", "tiny-demo", "-c", str(calib), *SMALL, "--build-dir", str(root))
    folder = root / "tiny-demo"
    matrix, text = folder / "tiny-demo.imatrix.gguf", folder / "tiny-demo.imatrix.txt"
    lines = out.output.strip().splitlines()
    assert lines[0].startswith(f"{matrix}: 28 tensors, 2 chunks x 64 tokens (")
    # the recipe's smoke suite (models/tiny-demo/problems-distractor.jsonl) grades the 3 copies
    assert lines[1].startswith("calibration: ") and lines[1].endswith(
        f"from {calib}; 3 dropped (graded by problems-distractor); text in {text}")
    saved = text.read_text(encoding="utf-8")
    assert saved.startswith("User: ") and EOS in saved  # the recipe's chat format
    loaded = load_imatrix(matrix)
    assert loaded.datasets == (str(calib),) and loaded.chunk_count == 2
    record = Manifest(folder / "manifest.json").get("tiny-demo.imatrix.gguf")
    assert record is not None and record.stage == "imatrix"
    assert record.settings["n_ctx"] == 64 and record.settings["format"] == "deepseek-chat"
    before = matrix.stat().st_mtime_ns
    again = run("imatrix", "tiny-demo", "-c", str(calib), *SMALL, "--build-dir", str(root))
    assert "(up to date, not recomputed)" in again.output
    assert matrix.stat().st_mtime_ns == before
    changed = run("imatrix", "tiny-demo", "-c", str(calib), "--ctx", "64", "--chunks", "3",
                  "--build-dir", str(root), "--json")
    assert json.loads(changed.output)["result"]["chunks"] == 3
    assert matrix.stat().st_mtime_ns != before


def test_plain_layout_and_gguf_input(demo_bf16_gguf, tmp_path, files):
    calib, smoke = files
    dest = tmp_path / "m.imatrix.gguf"
    run("imatrix", str(demo_bf16_gguf), "-c", str(calib), "--smoke-suite", str(smoke),
        *SMALL, "--out", str(dest), "--quiet")
    text = (tmp_path / "m.imatrix.txt").read_text(encoding="utf-8")
    assert "User:" not in text and EOS not in text
    assert len(load_imatrix(dest).entries) == 28


def test_errors_are_one_line(demo_bf16_gguf, tmp_path, files):
    calib, smoke = files
    result = run("imatrix", str(tmp_path / "nope.gguf"), code=2)
    assert result.output.strip().splitlines()[-1] == (
        f"Error: Invalid value for 'RECIPE|GGUF': {tmp_path / 'nope.gguf'} does not exist")
    result = run("imatrix", "tiny-demo", "--build-dir", str(tmp_path / "b"), code=1)
    assert result.output.strip() == (
        f"Error: {tmp_path / 'b' / 'tiny-demo' / 'tiny-demo-BF16.gguf'} does not exist (run "
        "`mathq convert tiny-demo` first (or `mathq quantize tiny-demo -Q Q8_0`))")
    result = run("imatrix", str(demo_bf16_gguf), "-c", str(calib), "--smoke-suite",
                 str(smoke), "--ctx", "8", code=2)
    assert "Invalid value for '--ctx': 8 is not in the range 16 to " in result.output


def test_quantized_input_is_refused(demo_bf16_gguf, tmp_path, files):
    import ctypes

    import llama_cpp

    from mathq.llama.runtime import capture_llama_log
    from mathq.recipes.quants import get_quant

    calib, smoke = files
    q4 = tmp_path / "tiny-Q4_0.gguf"  # llama.cpp's quantizer straight (mathq's is tested
    params = llama_cpp.llama_model_quantize_default_params()  # elsewhere, and slower)
    params.ftype = get_quant("Q4_0").ftype
    with capture_llama_log(lambda _level, _line: None):
        assert llama_cpp.llama_model_quantize(str(demo_bf16_gguf).encode(), str(q4).encode(),
                                              ctypes.byref(params)) == 0
    result = run("imatrix", str(q4), "-c", str(calib), "--smoke-suite", str(smoke), *SMALL,
                 code=1)
    assert result.output.strip() == (
        "Error: tiny-Q4_0.gguf is Q4_0; an importance matrix measured on it would describe "
        "the quantized model (use the BF16 (or Q8_0) GGUF; accepted: F32, F16, BF16, Q8_0)")
    assert not list(tmp_path.glob("*.imatrix.*"))


def mathq(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # A fresh process: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import.
    code = "from mathq.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_hub_calibration_set_then_offline_from_the_cache(demo_bf16_gguf, tmp_path, files):
    calib, smoke = files
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "MATHQ_NO_PROGRESS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    args = ["imatrix", str(demo_bf16_gguf), "-c", "math-train", "--smoke-suite", str(smoke),
            *SMALL, "--out", str(tmp_path / "hub.imatrix.gguf")]
    with FakeHub() as hub:
        commit = hub.add_repo("HuggingFaceTB/math_tasks",
                              {"data/math/train.jsonl": calib.read_bytes()},
                              repo_type="dataset")
        online = mathq(*args, env={**env, "HF_ENDPOINT": hub.url})
        assert online.returncode == 0, online.stderr
    source = f"HuggingFaceTB/math_tasks@{commit}/data/math/train.jsonl"
    assert f"from {source}; 3 dropped (graded by smoke)" in online.stdout
    assert load_imatrix(tmp_path / "hub.imatrix.gguf").datasets == (source,)
    offline = mathq(*args, env={**env, "HF_HUB_OFFLINE": "1",
                                "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert offline.returncode == 0, offline.stderr
    assert f"from {source}" in offline.stdout
