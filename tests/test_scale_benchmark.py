"""benchmarks/scale.py at tiny widths, so the 7B benchmark cannot rot between its runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(work: Path, *extra: str) -> str:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--tiny",
                           "--no-peers", "--work", str(work), *extra],
                          check=True, capture_output=True, text=True, timeout=900).stdout


def test_every_stage_is_measured_resumably_and_the_build_rerun_redoes_nothing(tmp_path):
    out = _run(tmp_path)
    results = json.loads((tmp_path / "scale.json").read_text())
    for key in ("convert:mathq", "quantize Q8_0:mathq", "quantize Q4_K_M:mathq",
                "quantize Q2_K:mathq", "imatrix:mathq", "kld:mathq", "bench:mathq",
                "smoke:mathq", "build:mathq", "build:rerun"):
        r = results[key]
        assert r["exit_code"] == 0 and r["seconds"] > 0, key
        assert r["peak_rss_bytes"] > 20 * 2**20, key  # at least a Python interpreter
    assert results["convert:cp"]["exit_code"] == 0
    # The converter wrote the BF16 file: its disk high-water mark is at least that size.
    bf16 = tmp_path / "build" / "scale" / "scale-BF16.gguf"
    assert results["convert:mathq"]["disk_bytes"] >= 0.9 * bf16.stat().st_size
    # Peers off: each says so. The tune runs in the build's folder, beside a plain quantize,
    # and brings its phases' times from its record.
    assert results["quantize Q4_K_M:llama-quantize"] == {"skipped": "peers off (--no-peers)"}
    for key in ("tune:quantize Q4_K_M", "tune:mathq"):
        assert results[key]["exit_code"] == 0 and results[key]["seconds"] > 0, key
    assert set(results["tune:mathq"]["phase_seconds"]) == {"prepare", "costs", "probes",
                                                           "write", "measure"}
    assert results["tune:mathq"]["size"] <= results["tune:mathq"]["stock_size"]
    assert "| tune | mathq |" in out
    assert results["build:rerun"]["redone"] == []  # the rerun of build redoes nothing
    assert "| build | rerun |" in out and "| quantize Q2_K | mathq |" in out
    # A second run keeps every measurement and measures nothing again.
    again = _run(tmp_path, "--only", "convert,quantize")
    assert again.count("kept from an earlier run") == 9  # convert: 3 commands, quantize: 6
    assert json.loads((tmp_path / "scale.json").read_text()) == results
