"""The machinery of `benchmarks/gpu.py run`: its options, the time budget, child processes,
and the record it keeps in ``$OUT`` (``gpu.json``, ``gpu.txt``) and in its work folder
(``state.json``: what a rerun can reuse).

Every phase runs under :meth:`Runner.phase`: skipped when an earlier one stopped the run or the
budget cannot fit it, reused when a previous run finished it, timed, and recorded, with the
record rewritten after every phase so that a run killed from outside still leaves it.
Commands run in children (:meth:`Runner.child`) that are killed, with their whole process
group, when they reach the time left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.gpu_report import render_text

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("BF16", "Q8_0", "Q4_K_M")
MARGIN_S = 15  # kept back from every phase's time limit, to write the results
MATHQ = "import sys; from mathq.cli import main; sys.argv[0] = 'mathq'; main()"


@dataclass(frozen=True)
class Config:
    """What one run measures; :meth:`model_key` names the model files it makes."""

    layers: int = 8
    hidden: int = 4096
    ffn: int = 11008
    heads: int = 32
    kinds: tuple[str, ...] = KINDS
    n: int = 128
    max_tokens: int = 128
    loop_n: int = 16
    bench_parallel: str = "1,8,32,64"
    bench_reps: int = 5
    arch: str = "90"
    jobs: int = 16
    llama: str = "cuda"  # cuda | cpu (build the sdist) | installed (--cpu-dry-run)

    def model_key(self) -> str:
        return f"L{self.layers}-H{self.hidden}-F{self.ffn}-A{self.heads}"

    def measure_key(self, kind: str, what: str) -> str:
        extra = {"bench": f"p{self.bench_parallel}-r{self.bench_reps}",
                 "smoke": f"n{self.n}-m{self.max_tokens}",
                 "loop": f"n{self.n}-k{self.loop_n}-m{self.max_tokens}"}.get(what, "")
        return f"{what} {kind} {self.model_key()} {extra} {self.llama}".strip()


class Budget:
    """Seconds left of ``--budget-s``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()


class PhaseError(Exception):
    """A phase failed; the message says why (the run stops after it)."""


class OutOfTime(Exception):
    """A phase was stopped at its time limit, or there was no time left to start it."""


class Runner:
    """Runs the phases under the budget, keeping the record in ``$OUT`` and ``state.json``."""

    def __init__(self, config: Config, out: Path, work: Path, budget: Budget) -> None:
        self.config, self.out, self.work, self.budget = config, out, work, budget
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        self.state_path = self.work / "state.json"
        self.state: dict[str, Any] = (json.loads(self.state_path.read_text())
                                      if self.state_path.is_file() else {})
        self.report: dict[str, Any] = {
            "config": dataclasses.asdict(config), "budget_s": budget.seconds,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "phases": [], "results": {},
            "notes": [
                "random weights; every answer is exactly max_tokens tokens (mathq smoke "
                "--ignore-eos; the loop bans end-of-generation tokens), so accuracy is "
                "meaningless and problems/h compare equal work",
                "timings start after the model is loaded"]}
        self.stopped = False

    # -- bookkeeping ----------------------------------------------------------------------

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.budget.elapsed(), 1)
        for name, text in (("gpu.json", json.dumps(self.report, indent=2) + "\n"),
                           ("gpu.txt", render_text(self.report) + "\n")):
            tmp = self.out / (name + ".partial")
            tmp.write_text(text)
            tmp.replace(self.out / name)
        tmp = self.state_path.with_suffix(".partial")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.state_path)

    def phase(self, name: str, fn: Any, *args: Any, cache_key: str | None = None,
              min_s: float = 5.0) -> Any:
        """Run ``fn(*args)`` as phase ``name`` unless stopped, out of time, or cached."""
        record: dict[str, Any] = {"name": name}
        self.report["phases"].append(record)
        cached = self.state.get("done", {}).get(cache_key) if cache_key else None
        if cached is not None:
            record.update(status="cached", seconds=0.0)
            print(f"[{self.budget.elapsed():6.1f}s] {name}: reused from an earlier run",
                  flush=True)
            self.save()
            return cached
        if self.stopped:
            record.update(status="skipped", detail="an earlier phase stopped the run")
            self.save()
            return None
        if self.budget.left() - MARGIN_S < min_s:
            record.update(status="skipped", detail="budget spent")
            print(f"[{self.budget.elapsed():6.1f}s] {name}: skipped, budget spent", flush=True)
            self.stopped = True
            self.save()
            return None
        started = time.monotonic()
        try:
            result = fn(*args)
            record["status"] = "ok"
        except OutOfTime as e:
            record.update(status="timeout", detail=str(e))
            self.stopped = True
            result = None
        except PhaseError as e:
            record.update(status="failed", detail=str(e))
            self.stopped = True
            result = None
        record["seconds"] = round(time.monotonic() - started, 1)
        print(f"[{self.budget.elapsed():6.1f}s] {name}: {record['status']} in "
              f"{record['seconds']:.1f}s" + (f" ({record['detail']})" if "detail" in record
                                             else ""), flush=True)
        if record["status"] == "ok" and cache_key is not None:
            self.state.setdefault("done", {})[cache_key] = result if result is not None else True
        self.save()
        return result

    def limit(self) -> float:
        """Seconds the next child process may take."""
        left = self.budget.left() - MARGIN_S
        if left <= 1:
            raise OutOfTime("no time left")
        return left

    # -- child processes ------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment of every child: our packages first, mathq from toolkit/."""
        paths = [str(self.work / "site"), str(ROOT / "toolkit"), str(ROOT)]
        if self.config.llama != "installed":
            paths.insert(0, str(self.work / "llama"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [*paths, *filter(None, [os.environ.get("PYTHONPATH")])]),
            MATHQ_NO_PROGRESS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        cuda_libs = [str(p) for p in cuda_lib_dirs()]
        if cuda_libs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                [*cuda_libs, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
        return env

    def child(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None, capture: bool = True) -> str:
        """Run ``argv`` within the time left; its stderr (and stdout unless ``capture``)
        goes to logs/<name>.log, the captured stdout comes back. Raises OutOfTime when
        stopped at the limit, PhaseError on failure (with the log's tail)."""
        timeout = self.limit()
        log = self.work / "logs" / f"{name.replace(' ', '-')}.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE if capture else err,
                                    stderr=err, text=True, env=env or self.env(),
                                    cwd=cwd or ROOT, start_new_session=True)
            try:
                stdout, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise OutOfTime(f"stopped at the budget's limit after {timeout:.0f}s; "
                                f"log: {log}") from None
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-1500:]
            raise PhaseError(f"exit code {proc.returncode}; log {log}:\n{tail}")
        return stdout

    def mathq(self, name: str, *args: str) -> str:
        return self.child(name, [sys.executable, "-c", MATHQ, *args])


def cuda_lib_dirs() -> list[Path]:
    """The CUDA toolkit's library folders next to the nvcc on PATH (for libcudart and
    libcublas at run time)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    home = Path(os.path.realpath(nvcc)).parent.parent
    return [p for p in (home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib")
            if p.is_dir()]


def run_quiet(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({e.__class__.__name__})"
