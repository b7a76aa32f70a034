"""Problem sets: local JSONL in MATH/GSM8K formats, errors with file:line, stratified
subsets, and the Hub path through a local HTTP server (then offline, from the cache)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import ClassVar

import pytest

from mathq.datasets.problems import (
    SUITES,
    filter_problems,
    get_suite,
    load_problem_set,
    read_problems_jsonl,
    select_problems,
    stratified_sample,
    write_problems_jsonl,
)
from mathq.errors import ProblemSetError
from tests.clirun import run
from tests.conftest import FIXTURES

MATH500 = FIXTURES / "math500" / "test.jsonl"


def write_lines(path: Path, *rows: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# --- loading ---------------------------------------------------------------------------

def test_math500_fixture_loads_with_every_field():
    pset = load_problem_set(MATH500)
    assert len(pset) == 500 and pset.source == str(MATH500)
    assert len(pset.subjects()) == 7 and {p.level for p in pset.problems} == {1, 2, 3, 4, 5}
    first = pset.problems[0]
    assert first.id == "test/precalculus/807.json" and first.subject == "Precalculus"
    assert first.answer == r"\left( 3, \frac{\pi}{2} \right)" and "\\boxed" in first.solution
    assert len(pset.by_id()) == 500


def test_original_math_and_gsm8k_spellings(tmp_path):
    math_file = write_lines(tmp_path / "math.jsonl", {
        "problem": "What is $1+1$?", "level": "Level 2", "type": "Prealgebra",
        "solution": r"We add: $1+1=\boxed{2}$."})
    (p,) = read_problems_jsonl(math_file)
    assert (p.answer, p.level, p.subject, p.id) == ("2", 2, "Prealgebra", "math/1")

    gsm_file = write_lines(tmp_path / "gsm.jsonl", {
        "question": "Janet's ducks lay 16 eggs...",
        "answer": "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 1,018"})
    (g,) = read_problems_jsonl(gsm_file)
    assert g.answer == "1018" and g.problem.startswith("Janet") and g.solution.endswith("eggs.")
    assert g.level is None and g.subject == ""


@pytest.mark.parametrize("line, message", [
    ('{"problem": "x", "answer": "1"', "not valid JSON (Expecting ',' delimiter at column 31)"),
    ('["problem"]', "expected a JSON object, got an array"),
    ('{"answer": "1"}', "missing field 'problem' or 'question'"),
    ('{"problem": "x"}', "missing field 'answer'"),
    ('{"problem": "x", "answer": 3.5, "level": "hard"}', "level must be 1-5 or 'Level N', "
                                                         "got 'hard'"),
    ('{"problem": "x", "solution": "no box here"}', "empty answer"),
    ('{"problem": ["x"], "answer": "1"}', "field 'problem' must be a string, got list"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", {"problem": "ok", "answer": "1"}, "", line)
    with pytest.raises(ProblemSetError) as err:
        read_problems_jsonl(path)
    assert err.value.message == f"{path}:3: {message}"
    assert (err.value.path, err.value.line) == (str(path), 3)


def test_repeated_id_is_refused(tmp_path):
    path = write_lines(tmp_path / "dup.jsonl", {"problem": "a", "answer": "1", "unique_id": "x"},
                       {"problem": "b", "answer": "2", "unique_id": "x"})
    with pytest.raises(ProblemSetError, match=r"dup.jsonl:2: id 'x' repeats line 1"):
        read_problems_jsonl(path)


def test_cli_reports_a_malformed_file_in_one_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", {"problem": "ok", "answer": "1"}, "{oops")
    result = run("problems", "show", str(path), code=2)
    assert result.output.splitlines() == [
        f"Error: {path}:2: not valid JSON (Expecting property name enclosed in double quotes "
        "at column 2) (each line must be one JSON object)"]


def test_unknown_suite_is_one_line_with_the_choices():
    result = run("problems", "show", "math5000", code=2)
    assert result.output.splitlines() == [
        "Error: no problem set named 'math5000' (known suites: math500, math, gsm8k; "
        "or give the path of a JSONL file)"]


# --- subsets ---------------------------------------------------------------------------

def test_stratified_sample_keeps_subject_and_level_mix():
    problems = load_problem_set(MATH500).problems
    sample = stratified_sample(problems, 100, seed=0)
    assert len(sample) == 100 and len({p.id for p in sample}) == 100
    order = {p.id: i for i, p in enumerate(problems)}
    assert [order[p.id] for p in sample] == sorted(order[p.id] for p in sample)
    for key in (lambda p: p.subject, lambda p: p.level, lambda p: (p.subject, p.level)):
        full, part = Counter(map(key, problems)), Counter(map(key, sample))
        for cell, count in full.items():
            assert abs(part[cell] - count * 100 / 500) <= 1.5, (cell, part[cell], count)


def test_stratified_sample_is_deterministic_and_seeded():
    problems = load_problem_set(MATH500).problems
    ids = [p.id for p in stratified_sample(problems, 50, seed=0)]
    assert ids == [p.id for p in stratified_sample(problems, 50, seed=0)]
    assert ids != [p.id for p in stratified_sample(problems, 50, seed=1)]
    # Pinned: the same seed picks the same problems on every machine and Python version.
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    assert (ids[:3], digest) == (PINNED_FIRST_IDS, PINNED_DIGEST)
    assert len(stratified_sample(problems, 600)) == 500


PINNED_FIRST_IDS = ["test/intermediate_algebra/1994.json", "test/algebra/2036.json",
                    "test/number_theory/1032.json"]
PINNED_DIGEST = "2f52045edf728872"


def test_filters_accept_any_subject_spelling():
    pset = load_problem_set(MATH500)
    nt = filter_problems(pset.problems, subjects=["number_theory"])
    assert nt and {p.subject for p in nt} == {"Number Theory"}
    both = filter_problems(pset.problems, subjects=["Counting & Probability", "algebra"],
                           levels=[5])
    assert {p.subject for p in both} == {"Counting & Probability", "Algebra"}
    assert {p.level for p in both} == {5}
    chosen = select_problems(pset, n=10, seed=3, subjects=["geometry"], levels=[1, 2])
    assert len(chosen) == 10 and {p.subject for p in chosen.problems} == {"Geometry"}
    with pytest.raises(ProblemSetError, match="no problems with subject 'topology'"):
        filter_problems(pset.problems, subjects=["topology"])


def test_cli_show_prints_and_writes_a_subset(tmp_path):
    out = run("problems", "show", str(MATH500), "--n", "20", "--level", "5").output
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "SUBJECT", "LVL", "ANSWER"] and len(lines) == 22
    assert lines[-1].startswith(f"20 of 500 problems from {MATH500}: ")
    target = tmp_path / "sub.jsonl"
    run("problems", "show", str(MATH500), "--n", "30", "--seed", "7", "--out", str(target))
    again = read_problems_jsonl(target)
    expected = select_problems(load_problem_set(MATH500), n=30, seed=7).problems
    assert tuple(again) == expected
    data = json.loads(run("problems", "show", str(target), "--json").output)
    assert len(data["problems"]) == 30 and data["problems"][0].keys() >= {"id", "answer"}


def test_write_read_round_trip(tmp_path):
    problems = load_problem_set(MATH500).problems[:5]
    write_problems_jsonl(tmp_path / "five.jsonl", problems)
    assert tuple(read_problems_jsonl(tmp_path / "five.jsonl")) == problems


# --- the Hub path, through a local server ----------------------------------------------

COMMIT = "a" * 40


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Serves one dataset file at its resolve URL, with the headers huggingface_hub reads."""

    files: ClassVar[dict[str, bytes]] = {}
    requests: ClassVar[list[str]] = []

    def _respond(self, body: bool) -> None:
        self.requests.append(f"{self.command} {self.path}")
        data = self.files.get(self.path.split("?")[0])
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("ETag", '"' + hashlib.sha1(data).hexdigest() + '"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def do_GET(self) -> None:
        self._respond(body=True)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def fake_hub(files: dict[str, bytes]):
    _FakeHub.files, _FakeHub.requests = files, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def mathq(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # A fresh process: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import.
    code = "from mathq.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_suite_downloads_from_the_hub_then_loads_offline(tmp_path):
    suite = get_suite("math500")
    data = b"".join(MATH500.read_bytes().splitlines(keepends=True)[:12])
    url = f"/datasets/{suite.repo_id}/resolve/{suite.revision}/{suite.filename}"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "MATHQ_NO_PROGRESS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    with fake_hub({url: data}) as endpoint:
        listed = mathq("problems", "--json", env={**env, "HF_ENDPOINT": endpoint})
        assert listed.returncode == 0, listed.stderr
        assert {r["name"]: r["cached"] for r in json.loads(listed.stdout)}["math500"] is False
        online = mathq("problems", "show", "math500", "--json",
                       env={**env, "HF_ENDPOINT": endpoint})
        assert online.returncode == 0, online.stderr
        assert any(r.startswith("GET ") and r.endswith(suite.filename)
                   for r in _FakeHub.requests)
    shown = json.loads(online.stdout)
    assert shown["source"] == f"{suite.repo_id}@{COMMIT}/{suite.filename}"
    assert [p["id"] for p in shown["problems"]][:2] == ["test/precalculus/807.json",
                                                         "test/intermediate_algebra/1994.json"]
    assert len(shown["problems"]) == 12
    # The server is gone: offline mode reads the cache.
    offline = mathq("problems", "show", "math500", "--n", "4", "--json",
                    env={**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert offline.returncode == 0, offline.stderr
    assert len(json.loads(offline.stdout)["problems"]) == 4
    listed = mathq("problems", "--json", env={**env, "HF_HUB_OFFLINE": "1"})
    assert {r["name"]: r["cached"] for r in json.loads(listed.stdout)}["math500"] is True


def test_offline_without_cache_says_how_to_fix(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = mathq("problems", "show", "gsm8k", env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: HuggingFaceTB/math_tasks/data/gsm8k/test.jsonl@main is not in the Hugging "
        "Face cache and the Hub cannot be reached (connect once to cache it (HF_HUB_OFFLINE=1 "
        "only reads the cache), or give a local JSONL file)")


def test_missing_file_on_the_hub_is_a_download_error(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    with fake_hub({}) as endpoint:
        result = mathq("problems", "show", "math", env={**env, "HF_ENDPOINT": endpoint})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: the Hub dataset HuggingFaceTB/math_tasks@main has no file data/math/test.jsonl "
        "(check HF_ENDPOINT, or give a local JSONL file)")


def test_suite_table_is_the_one_source():
    names = [s.name for s in SUITES]
    assert names == ["math500", "math", "gsm8k"]
    out = run("problems").output
    for s in SUITES:
        assert s.name in out and s.repo_id in out
