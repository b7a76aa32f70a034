"""SIGKILL and SIGTERM at seeded random moments of ``mathq build tiny-demo``.

``build --files-only -Q Q8_0,Q4_K_M`` runs in a child process (convert, two quantizations,
Modelfiles) and is signalled after a seeded random share (20-90 %) of the time an
uninterrupted build takes, so each case hits another step and every run of the suite hits
about the same ones; a case whose build finished before the signal fails. Afterwards:

- SIGTERM: the command ends with exit code 143, no traceback, one ``Error:`` line saying
  it was stopped, and no ``*.partial`` file is left (they are deleted on the way out);
- SIGKILL: nothing can clean up, so half-written files may stay, but only as ``*.partial``;
- in both cases the same command run again succeeds, leaves no ``*.partial``, and the
  folder then holds exactly the files of an uninterrupted build, each GGUF readable.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mathq.convert.gguf_info import read_gguf_header

REPO = Path(__file__).resolve().parents[2]
TOOLKIT = REPO / "toolkit"
ARGS = ("build", "tiny-demo", "--files-only", "-Q", "Q8_0,Q4_K_M", "--quiet")
RNG = random.Random(16)
# (signal, share of an uninterrupted build's time to wait before sending it): seeded
KILLS = [(sig, round(RNG.uniform(0.2, 0.9), 2))
         for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM)]


def _env(build: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TOOLKIT), str(REPO),
                                       os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "MATHQ_BUILD_DIR": str(build),
            "HF_HUB_OFFLINE": "1", "MATHQ_NO_PROGRESS": "1"}


def _mathq(build: Path) -> list[str]:
    return [sys.executable, "-c", "from mathq.cli import main; main()", *ARGS]


def _files(build: Path) -> set[str]:
    return {str(p.relative_to(build)) for p in build.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def clean_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[set[str], float]:
    """The files an uninterrupted build leaves, and the seconds it takes."""
    build = tmp_path_factory.mktemp("clean")
    started = time.monotonic()
    done = subprocess.run(_mathq(build), env=_env(build), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return _files(build), time.monotonic() - started


@pytest.mark.parametrize(("sig", "share"), KILLS,
                         ids=[f"{signal.Signals(s).name} at {round(100 * d)}%" for s, d in KILLS])
def test_build_survives_a_signal(sig: int, share: float, tmp_path: Path,
                                 clean_build: tuple[set[str], float]):
    files, seconds = clean_build
    build = tmp_path / "build"
    proc = subprocess.Popen(_mathq(build), env=_env(build), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(share * seconds)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the build finished before the signal: nothing was tested"
    assert "Traceback" not in err, err
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err
        errors = [line for line in err.splitlines() if line.startswith("Error:")]
        assert errors == ["Error: stopped by SIGTERM; unfinished files were removed (run the "
                          "same command again: finished work is kept)"], err
        assert not list(build.rglob("*.partial"))
    else:
        assert proc.returncode == -signal.SIGKILL
        leftovers = [p for p in build.rglob("*") if p.is_file()
                     and p.name.endswith(".partial")]
        assert all(p.suffix == ".partial" for p in leftovers)
    again = subprocess.run(_mathq(build), env=_env(build), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert not list(build.rglob("*.partial"))
    assert _files(build) == files
    for gguf in build.rglob("*.gguf"):
        assert read_gguf_header(gguf).summary.tensors
