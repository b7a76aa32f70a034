"""Class 5, all or nothing: a command that writes several files writes all of them or none,
and checks every cheap thing about its inputs before its expensive work.

- :func:`mathq.fsutil.atomic_outputs`: a set of files renamed into place together, all
  removed on any failure, a killed run's temporary file reused;
- ``report`` and ``modelfile`` on a disk that fills up in the middle of their set: no file
  of the new set, no new folder, the old set untouched, one ``Error:`` line;
- ``report --build-dir`` with a typo: an error that creates nothing (tests/test_report.py);
- ``kld`` with a damaged variant: refused before the BF16 reference pass, nothing written.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from click.testing import CliRunner

from mathq.cli import cli
from mathq.fsutil import atomic_outputs
from tests.hostile.conftest import World
from tests.hostile.harness import snapshot

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


def test_a_set_is_written_whole_or_not_at_all(tmp_path: Path):
    """A failure while a set is written (here the disk filling up at its third file) leaves
    the previous set untouched and no new file, however many were already written."""
    old = [tmp_path / f"{n}.txt" for n in ("a", "b")]
    for p in old:
        p.write_text("old")
    files = [*old, tmp_path / "c.txt", tmp_path / "d.txt"]
    with pytest.raises(OSError) as e, atomic_outputs(*files) as staged:
        for i, f in enumerate(files):
            if i == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            staged[f].write_text("new")
    assert "no space left on device" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    assert [p.read_text() for p in old] == ["old", "old"]


def test_a_partial_file_left_by_a_killed_run_is_reused(tmp_path: Path):
    """A killed run's ``.partial`` holds no lock any more: the next run takes it over."""
    final = tmp_path / "x.gguf"
    stale = tmp_path / "x.gguf.partial"
    stale.write_bytes(b"half a file")
    with atomic_outputs(final) as staged:
        staged[final].write_bytes(b"whole")
    assert final.read_bytes() == b"whole" and not stale.exists()


def fail_at_write(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make the ``n``-th ``Path.write_text`` of the run fail as a full disk would."""
    real = Path.write_text
    calls = [0]

    def write_text(self: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == n:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def run(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, [line for line in result.output.splitlines()
                              if line.startswith("Error:")]


def test_modelfile_with_room_for_two_of_four_writes_none(world: World,
                                                         monkeypatch: pytest.MonkeyPatch):
    folder = world.root / "mf"
    fail_at_write(monkeypatch, 3)
    code, errors = run("modelfile", "tiny-demo", "--out", str(folder))
    assert code == 1 and len(errors) == 1 and "no space left on device" in errors[0], errors
    assert not folder.exists()


def test_report_on_a_disk_that_fills_up_keeps_the_old_report(world: World,
                                                             monkeypatch: pytest.MonkeyPatch):
    assert run("report", "tiny-demo") == (0, [])
    report = world.build / "tiny-demo" / "report"
    for f in report.iterdir():  # an old report that the new one would differ from
        f.write_bytes(b"old " + f.name.encode())
    old = snapshot(report)
    fail_at_write(monkeypatch, 2)  # the plots are drawn, report.md written, then the disk
    code, errors = run("report", "tiny-demo")
    assert code == 1 and len(errors) == 1 and "no space left on device" in errors[0], errors
    assert snapshot(report) == old


def test_a_new_report_folder_is_removed_when_its_report_fails(world: World,
                                                             monkeypatch: pytest.MonkeyPatch):
    fail_at_write(monkeypatch, 3)
    code, _errors = run("report", "tiny-demo", "--out-dir", str(world.root / "site"))
    assert code == 1
    assert not (world.root / "site").exists()


def test_kld_refuses_a_damaged_variant_before_the_reference_pass(world: World):
    """A variant cut short is named in milliseconds, before the BF16 reference pass (an
    hour and gigabytes at 7B) is computed, let alone kept."""
    data = world.q8.read_bytes()
    world.q8.unlink()  # a hard link to the pristine file: never write through it
    world.q8.write_bytes(data[: len(data) // 2])
    before = snapshot(world.root)
    code, errors = run("kld", "tiny-demo", "-Q", "Q8_0")
    assert code != 0 and len(errors) == 1 and "tiny-demo-Q8_0.gguf" in errors[0], errors
    assert snapshot(world.root) == before  # no kld/ folder, no reference


def test_bench_checks_every_variant_before_measuring_the_first(world: World):
    """Q2_K was never made: said before Q8_0 is measured, not after (nothing written)."""
    before = snapshot(world.root)
    code, errors = run("bench", "tiny-demo", "-Q", "Q8_0,Q2_K")
    assert code == 1 and len(errors) == 1 and "no Q2_K GGUF" in errors[0], errors
    assert snapshot(world.root) == before
