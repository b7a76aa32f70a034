"""Class 3, stop signals: every long-running command, stopped by Ctrl-C and by SIGTERM at a
seeded point of its run.

Generated from the command list (:data:`tests.hostile.runs.LONG_RUNS`, checked against
``mathq.cli.cli.commands``). Each command first runs uninterrupted in a folder of its own
(the CPU time it takes, workers included, and the paths it adds are the yardstick); then,
in a fresh folder, it is signalled once it has used a seeded share (30-80 %) of that CPU
time: the command's own clock, which a machine loaded by other work slows no more than the
command itself, so each case hits about the same step on every run of the suite. SIGINT goes
to the whole process group, as a terminal's Ctrl-C does (grading and benchmark workers
included); SIGTERM to the command alone, as ``kill`` does. A run that finished before the
signal (or as it was exiting: the signal is then ignored) is started again with half the
wait, once; if that one finishes too the case fails.
Commands that wait on a server that never answers are signalled 0.8-1.3 s after launch.

Asserted: exit code 130 (SIGINT) or 143 (SIGTERM), one ``Error: stopped by SIG...`` line, no
traceback, no "Exception ignored" (ctypes dropping an exception in a llama.cpp callback), no
process of the group left running, nothing left that an uninterrupted run does not make
(no ``*.partial``, no lock file, no empty new folder), and the same command run again
finishes with exactly the paths of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mathq.cli import cli
from tests.hostile.runs import (
    LONG_RUNS,
    REPO,
    Folder,
    LongRun,
    assert_clean_stderr,
    debris,
    error_lines,
    group_cpu_seconds,
    long_runs,
    make_folder,
)

RNG = random.Random(24)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
# (command, signal, share of an uninterrupted run's time to wait): seeded
CASES = [(name, sig, round(RNG.uniform(0.3, 0.8), 2))
         for name in long_runs() for sig in SIGNALS]
MIN_CPU_S = 0.25  # the interpreter's start, before main() handles signals


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_build_imatrix import write_calibration

    return write_calibration(tmp_path_factory.mktemp("calib") / "calib.jsonl", 60)


@pytest.fixture(scope="module")
def clean_runs() -> dict[str, tuple[float, set[str]]]:
    """Per command, filled on first use: an uninterrupted run's CPU seconds and the paths
    it adds to its folder."""
    return {}


def uninterrupted(name: str, runs: dict[str, tuple[float, set[str]]], root: Path,
                  pristine: Path, calib: Path, urls: dict[str, str]) -> tuple[float, set[str]]:
    if name not in runs:
        folder = make_folder(root / f"clean-{name}", pristine, calib, urls)
        before = folder.paths()
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = folder.start(long_runs()[name])
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"the table's {name} run fails by itself: {err}"
        now = resource.getrusage(resource.RUSAGE_CHILDREN)  # its workers included
        cpu = now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime
        runs[name] = (cpu, folder.paths() - before)
    return runs[name]


def wait_for_group(pgid: int, seconds: float = 10) -> bool:
    """True once no process of the group is left."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def signalled(folder: Folder, run: LongRun, sig: int, wait: float) -> tuple[int, str]:
    """Start the command, signal it once it has used ``wait`` CPU seconds (a server-bound
    one: ``wait`` seconds after launch), and return its exit code and stderr."""
    proc = folder.start(run)
    if run.server:
        time.sleep(wait)
    deadline = time.monotonic() + 120
    while not run.server and group_cpu_seconds(proc.pid) < wait and proc.poll() is None:
        assert time.monotonic() < deadline, f"{run.args[0]} made no progress in 120 s"
        time.sleep(0.005)
    with contextlib.suppress(ProcessLookupError):  # it may have just finished
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # a terminal's Ctrl-C reaches the whole group
        else:
            proc.send_signal(sig)
    try:
        _out, err = proc.communicate(timeout=60)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert wait_for_group(proc.pid), f"processes of {run.args[0]} outlived it"
    return proc.returncode, err


@pytest.mark.parametrize(("name", "sig", "share"), CASES,
                         ids=[f"{n}-{signal.Signals(s).name}-{round(100 * d)}%"
                              for n, s, d in CASES])
def test_a_stop_signal_unwinds_the_command(name: str, sig: int, share: float, tmp_path: Path,
                                           pristine: Path, calib: Path,
                                           servers: dict[str, str],
                                           clean_runs: dict[str, tuple[float, set[str]]]):
    run = long_runs()[name]
    if run.server:
        finished: set[str] = set()
        waits = [0.5 + share]
    else:
        seconds, finished = uninterrupted(name, clean_runs, tmp_path, pristine, calib, servers)
        waits = [max(share * seconds, MIN_CPU_S), max(share * seconds / 2, MIN_CPU_S)]
    for attempt, wait_s in enumerate(waits):
        folder = make_folder(tmp_path / f"run-{attempt}", pristine, calib, servers)
        before = folder.paths()
        code, err = signalled(folder, run, sig, wait_s)
        if code != 0:
            break
        assert_clean_stderr(err)
        assert debris(folder, before, finished) == []
    assert code != 0, f"{name} finished before the signal ({waits}): nothing was tested"
    assert_clean_stderr(err)
    assert code == 128 + sig, err
    assert error_lines(err) == [f"Error: stopped by {signal.Signals(sig).name}; unfinished "
                                "files were removed (run the same command again: finished "
                                "work is kept)"], err
    assert debris(folder, before, finished) == []
    if run.server:
        return  # the server never answers: a rerun cannot finish either
    again = folder.start(run)
    _out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert folder.paths() - before == finished


def test_every_command_is_covered():
    """A command the table neither covers nor exempts (with a reason) fails here."""
    assert set(LONG_RUNS) == set(cli.commands)
    for name, run in LONG_RUNS.items():
        why = run if isinstance(run, str) else run.instant
        assert not why or len(why) > 20, f"{name}: say why it is exempt"
        assert isinstance(run, str) or run.args[0] == name


def test_a_stop_signal_inside_a_callback_is_held_then_raised():
    """The handler may run inside a ctypes callback (llama.cpp's log, evaluation or abort
    callback), where ctypes would print and drop the exception; inside hold_termination it
    is held, termination_pending says so (the abort callback's answer), and it is raised
    with the signal's exit code when the block ends."""
    from mathq.errors import Terminated, hold_termination, terminate, termination_pending

    with pytest.raises(Terminated) as e, hold_termination():
        terminate(signal.SIGINT)
        assert termination_pending()
    assert (e.value.exit_code, e.value.signal_name) == (130, "SIGINT")
    assert not termination_pending()


def test_ctrl_c_inside_llama_cpp_aborts_the_evaluation(pristine: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]):
    """Ctrl-C while llama.cpp evaluates a chunk of an importance matrix: the handler runs in
    the evaluation (or log, or abort) callback, the only Python code running then; the signal
    is held there, the abort callback stops the evaluation, and Terminated is raised when
    llama_decode returns: the run stops at once, writes no matrix, and ctypes prints
    nothing ("Exception ignored on calling ctypes callback function")."""
    import threading

    from mathq.errors import Terminated, handle_stop_signals
    from mathq.quantize.imatrix import ImatrixOptions, compute_imatrix

    text = (REPO / "models" / "tiny-demo" / "kld-text.txt").read_text(encoding="utf-8") * 4
    dest = tmp_path / "m.imatrix.gguf"
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    handle_stop_signals()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    try:
        timer.start()
        with pytest.raises(Terminated) as e:
            compute_imatrix(pristine / "tiny-demo" / "tiny-demo-BF16.gguf", text, dest,
                            ImatrixOptions(n_ctx=64, chunks=None, threads=1), "text")
    finally:
        timer.cancel()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert e.value.signum == signal.SIGINT
    assert time.monotonic() - started < 30
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    assert "Exception ignored" not in capfd.readouterr().err


def test_a_stop_signal_before_the_command_line_is_imported_stops_it_in_one_line():
    """mathq.launch notes a Ctrl-C that arrives while the commands are imported; the
    command line then stops before the command starts, with the usual line and code."""
    script = ("import os, signal, sys; from mathq import launch; "
              "signal.signal(signal.SIGINT, launch._note); os.kill(os.getpid(), signal.SIGINT); "
              "from mathq.cli import main; sys.argv = ['mathq', 'recipes']; "
              "main(early_signals=launch._early)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "Error: stopped by SIGINT; unfinished files were removed (run the same command again: "
        "finished work is kept)"]


def _ignores_sigint(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    raise AssertionError("no SigIgn line")


def test_workers_start_with_ctrl_c_ignored_and_the_parent_keeps_it():
    """A grading worker is spawned with SIGINT ignored from its first instruction (a Ctrl-C
    to the process group while it starts up would print its traceback), and the parent's
    own handler is back once they run."""
    from mathq.errors import (
        handle_stop_signals,
        ignore_stop_signals,
        interrupts_ignored_by_children,
    )
    from mathq.evaluate.grading.isolation import JudgePool

    handle_stop_signals()
    try:
        before = signal.getsignal(signal.SIGINT)
        sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
        with interrupts_ignored_by_children():
            shielded = subprocess.Popen(sleeper)
        plain = subprocess.Popen(sleeper)
        time.sleep(1.0)  # both interpreters are up: Python left an ignored SIGINT ignored
        try:
            assert _ignores_sigint(shielded.pid) and not _ignores_sigint(plain.pid)
        finally:
            for proc in (shielded, plain):
                proc.kill()
                proc.wait()
        assert signal.getsignal(signal.SIGINT) is before
        with JudgePool(2) as pool:
            assert len(pool.pids()) == 2  # started on entering, in this (the main) thread
            assert signal.getsignal(signal.SIGINT) is before
    finally:
        ignore_stop_signals()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
