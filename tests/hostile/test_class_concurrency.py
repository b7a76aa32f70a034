"""Class 4, two runs at once: every command that writes, started twice at the same moment
into the same folder (a concurrent twin); and the locks of :func:`mathq.fsutil.atomic_outputs`
that refuse (or, for a small text file, queue) the second writer.

Generated from :data:`tests.hostile.runs.LONG_RUNS` (every writing command of the command
list, on the demo model). Asserted for each pair: each run either finishes (exit 0) or is
refused at once with one ``Error: another mathq ... is writing|computing ...`` line (exit
1); at least one finishes; no traceback; nothing half-written, no lock file and no empty new
folder left; every GGUF and JSON file they added reads back whole; and the same command run
again afterwards finishes, adding nothing the twins had not (so the twins left no debris
the rerun would not make anyway).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mathq.convert.gguf_info import read_gguf_header
from mathq.errors import OutputBusyError
from mathq.fsutil import atomic_outputs
from tests.hostile.runs import assert_clean_stderr, error_lines, long_runs, make_folder

TWINS = sorted(long_runs(writing=True))
BUSY = re.compile(r"Error: another mathq \w+ is (writing|computing) .+ \(wait for it to "
                  r"finish, .+\)")


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_build_imatrix import write_calibration

    return write_calibration(tmp_path_factory.mktemp("calib") / "calib.jsonl", 60)


@pytest.mark.parametrize("name", TWINS)
def test_two_runs_at_once(name: str, tmp_path: Path, pristine: Path, calib: Path,
                          servers: dict[str, str]):
    run = long_runs(writing=True)[name]
    folder = make_folder(tmp_path / "w", pristine, calib, servers)
    before = folder.paths()
    twins = [folder.start(run), folder.start(run)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in twins]
    for code, err in results:
        assert_clean_stderr(err)
        assert code in (0, 1), err
        if code:
            assert len(error_lines(err)) == 1 and BUSY.fullmatch(error_lines(err)[0]), err
    assert 0 in [code for code, _ in results], results
    added = folder.paths() - before
    assert [p for p in added if p.endswith((".partial", ".lock"))] == []
    assert [p for p in added if (folder.root / p).is_dir()
            and not any(q.is_file() for q in (folder.root / p).rglob("*"))] == []
    for rel in added:
        path = folder.root / rel
        if rel.endswith(".gguf"):
            assert read_gguf_header(path).summary.tensors, rel
        elif rel.endswith(".json"):
            json.loads(path.read_text(encoding="utf-8"))
    again = folder.start(run)
    _out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert added <= folder.paths() - before


def test_a_second_writer_of_a_set_is_refused_before_it_writes(tmp_path: Path):
    """Locks on every file of the set are taken before the block runs: the second writer
    learns at once, writes nothing and deletes nothing of the first one's."""
    files = [tmp_path / "report.md", tmp_path / "accuracy.png"]
    with atomic_outputs(*files) as first:
        with pytest.raises(OutputBusyError) as e, atomic_outputs(files[1]):
            pytest.fail("the second writer got in")
        assert str(e.value) == (f"another mathq command is writing {files[1]} (wait for it "
                                "to finish, then run this again)")
        for f in files:
            first[f].write_text("first")
    assert [f.read_text() for f in files] == ["first", "first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "report.md"]


def test_a_small_text_file_waits_its_turn(tmp_path: Path):
    """Summaries and the digest cache are written in an instant: a second writer waits for
    the first instead of failing the whole command at its very end; the later text stays."""
    import threading
    import time

    from mathq.fsutil import write_text_atomic

    final = tmp_path / "digests.json"
    holding = threading.Event()

    def first() -> None:
        with atomic_outputs(final) as staged:
            holding.set()
            time.sleep(0.3)
            staged[final].write_text("first")

    writer = threading.Thread(target=first)
    writer.start()
    holding.wait(5)
    write_text_atomic(final, "second")
    writer.join()
    assert final.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["digests.json"]


def test_a_long_computation_is_refused_before_it_starts(tmp_path: Path):
    """An importance matrix or a benchmark writes its file only at the end: the second run
    is refused when it starts, not after its work; the lock file and a folder made for it
    go when the first run ends."""
    from mathq.fsutil import output_lock

    final = tmp_path / "new" / "m.imatrix.gguf"
    with output_lock(final):
        with pytest.raises(OutputBusyError), output_lock(final):
            pytest.fail("the second run got in")
        assert (final.parent / "m.imatrix.gguf.lock").exists()
    assert list(final.parent.iterdir()) == []
    failed = tmp_path / "other" / "m.imatrix.gguf"
    with pytest.raises(RuntimeError), output_lock(failed):
        raise RuntimeError("the computation failed")
    assert not failed.parent.exists()
