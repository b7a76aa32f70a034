"""Every command run for real in a child process, the way a user runs it: what the signal and
concurrency classes of the hostile suite share.

:data:`LONG_RUNS` says, for every command of ``mathq --help``, how to make it work for a
second or more on the bundled demo model (``models/tiny-demo``, ``recipes/tiny-demo.toml``)
in a folder holding a copy of its built files, or why it is exempt (it only prints, or it
writes nothing a second run could collide with). ``test_every_command_is_covered`` fails
when a command exists that the table neither covers nor exempts, so a new command is tested
the day it is added. llama.cpp runs on one thread (``--threads 1``): its CPU time is then
the work done, not the spinning of idle worker threads, so it serves as the command's clock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLKIT = REPO / "toolkit"


@dataclass(frozen=True)
class LongRun:
    """How to keep one command busy on the demo model.

    ``args`` are formatted with :meth:`Folder.values`. ``server`` marks a command that waits
    on a server that never answers (so it runs until stopped, and a rerun cannot finish:
    a rerun cannot finish either); ``writes`` is False for commands that write nothing a
    concurrent twin could collide with; ``instant`` says why a command that finishes in
    milliseconds is not stopped mid-run (it still gets a concurrent twin)."""

    args: tuple[str, ...]
    server: bool = False
    writes: bool = True
    instant: str = ""


LONG_RUNS: dict[str, LongRun | str] = {
    "build": LongRun(("build", "tiny-demo", "--files-only", "-Q", "Q8_0,Q4_K_M,Q2_K",
                      "--imatrix", "-c", "{calib}")),
    "download": LongRun(("download", "deepseek-math-7b-rl", "--dir", "{w}/hf"), server=True,
                        writes=False),
    "convert": LongRun(("convert", "tiny-demo", "--outtype", "f16")),
    "imatrix": LongRun(("imatrix", "tiny-demo", "-c", "{calib}", "--ctx", "16",
                        "--all-chunks", "--threads", "1")),
    "quantize": LongRun(("quantize", "tiny-demo", "-Q", "Q2_K,Q4_K_M,Q5_K_M,Q6_K",
                         "--threads", "1")),
    "tune": LongRun(("tune", "tiny-demo", "-c", "{calib}", "--match", "Q4_K_M", "--types",
                     "Q4_K,Q6_K", "--probe-chunks", "1", "--ctx-size", "64", "--threads", "1")),
    "modelfile": LongRun(("modelfile", "tiny-demo"),
                         instant="writes four small files in milliseconds: nothing to stop"),
    "smoke": LongRun(("smoke", "tiny-demo", "-Q", "Q8_0", "--n", "30", "--threads", "1")),
    "bench": LongRun(("bench", "tiny-demo", "-Q", "Q8_0", "-p", "256", "-n", "64", "-r", "3",
                      "--parallel", "1,4", "--threads", "1")),
    "kld": LongRun(("kld", "tiny-demo", "-Q", "Q8_0", "--chunks", "12", "--threads", "1")),
    "report": LongRun(("report", "tiny-demo")),
    "publish": LongRun(("publish", "tiny-demo", "--tag", "latest", "--namespace", "me",
                        "--ollama-host", "{url_hang}"), server=True, writes=False),
    "recipes": "prints the bundled recipes: reads only, in milliseconds",
    "quants": "prints llama.cpp's quantization types: reads only, in milliseconds",
    "problems": "prints the problem sets (a fetch is huggingface_hub's, into its own cache: "
                "the Hub rows of test_cases)",
    "grade": LongRun(("grade", "{w}/r.jsonl", "--out", "{w}/graded.jsonl")),
}


def long_runs(*, writing: bool = False) -> dict[str, LongRun]:
    """The commands to stop mid-run (with ``writing``: those a concurrent twin can collide
    with, the instant ones included)."""
    return {name: run for name, run in LONG_RUNS.items() if isinstance(run, LongRun)
            and (run.writes if writing else not run.instant)}


@dataclass
class Folder:
    """One case's folder: a copy of the demo model's built files under ``build/``, the
    calibration and results files the table's commands read, and the servers' URLs."""

    root: Path
    urls: dict[str, str]

    @property
    def build(self) -> Path:
        return self.root / "build"

    def values(self) -> dict[str, str]:
        return {"w": str(self.root), "calib": str(self.root / "calib.jsonl"),
                **{f"url_{k}": v for k, v in self.urls.items()}}

    def env(self, run: LongRun) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(TOOLKIT), str(REPO),
                                           os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "MATHQ_BUILD_DIR": str(self.build),
               "HF_HUB_OFFLINE": "1", "MATHQ_NO_PROGRESS": "1",
               "HF_HOME": str(self.root.parent / "hf-home")}
        if run.server:
            env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=self.urls["hang"])
        return env

    def start(self, run: LongRun) -> subprocess.Popen[str]:
        """Launch ``mathq ARGS`` as a terminal would: in its own process group, which a
        Ctrl-C reaches as a whole (workers included)."""
        args = [a.format(**self.values()) for a in run.args]
        return subprocess.Popen([sys.executable, "-c", "from mathq.cli import main; main()",
                                 *args], env=self.env(run), cwd=self.root,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def paths(self) -> set[str]:
        """Every file and folder under the folder, relative to it."""
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*")}


def make_folder(root: Path, pristine: Path, calib: Path, urls: dict[str, str]) -> Folder:
    """A fresh case folder: the pristine build copied (GGUFs hard-linked: mathq only ever
    renames new files over them), the calibration set and 3,000 results to grade."""
    root.mkdir(parents=True)

    def link_or_copy(s: str, d: str) -> None:
        if s.endswith(".gguf"):
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    shutil.copytree(pristine, root / "build", copy_function=link_or_copy)
    shutil.copy2(calib, root / "calib.jsonl")
    lines = (json.dumps({"id": str(i), "answer": str(i % 7),
                         "completion": f"so \\boxed{{{i % 5}}}"}) for i in range(3000))
    (root / "r.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Folder(root, urls)


_TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds spent so far by the process group ``pgid`` (a command started by
    :meth:`Folder.start` and its workers, the finished ones included): the command's own
    clock, which a loaded machine slows down no more than the command itself."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp; then utime, stime, cutime, cstime
            total += sum(int(x) for x in fields[11:15])
    return total / _TICK


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def assert_clean_stderr(stderr: str) -> None:
    """No traceback and nothing ctypes or the interpreter printed about a dropped exception."""
    assert "Traceback" not in stderr, stderr
    assert "Exception ignored" not in stderr, stderr
    assert "KeyboardInterrupt" not in stderr, stderr


def debris(folder: Folder, before: set[str], finished: set[str]) -> list[str]:
    """What a stopped or refused run left that it should not have: half-written or lock
    files, new paths an uninterrupted run does not make (``finished``: what it adds), and
    new folders with no file in them."""
    added = folder.paths() - before
    bad = sorted(p for p in added if p.endswith((".partial", ".lock")) and p not in finished)
    bad += sorted(p for p in added - finished)
    bad += sorted(p for p in added if (folder.root / p).is_dir()
                  and not any(q.is_file() for q in (folder.root / p).rglob("*")))
    return bad
