"""Results files: the record smoke writes, and `mathq grade` re-grading them in place."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from mathq.datasets.problems import load_problem_set
from mathq.errors import ProblemSetError
from mathq.evaluate.grading.grade import (
    ProblemResult,
    read_results,
    regrade_file,
    result_for,
    summarize,
    write_results,
)
from tests.clirun import run
from tests.conftest import FIXTURES

MATH500 = FIXTURES / "math500" / "test.jsonl"


def sample_results() -> list[ProblemResult]:
    """Ten graded records: the reference solution as output for 7, a wrong box for 2,
    and an output cut off before any answer for 1."""
    problems = load_problem_set(MATH500).problems[:10]
    records = []
    for i, p in enumerate(problems):
        if i < 7:
            completion = p.solution
        elif i < 9:
            completion = "Working it out... so the answer is $\\boxed{123456}$."
        else:
            completion = "Let us begin by writing the equation as"
        records.append(result_for(p, completion, prompt_tokens=80 + i, completion_tokens=200,
                                  seconds=1.5, finish_reason="stop"))
    return records


def test_result_record_carries_grade_and_measures():
    records = sample_results()
    first = records[0]
    assert first.verdict == "correct" and first.rule == "boxed" and first.correct
    assert first.extracted == first.answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert (first.prompt_tokens, first.seconds, first.finish_reason) == (80, 1.5, "stop")
    assert [r.verdict for r in records[7:]] == ["wrong", "wrong", "no-answer"]
    assert ProblemResult.from_json(first.to_json()) == first
    drafted = dataclasses.replace(first, steps=3, drafted=9, accepted=8,
                                  completion_ids=(791, 4320, 13))
    assert ProblemResult.from_json(json.loads(json.dumps(drafted.to_json()))) == drafted
    with pytest.raises(ProblemSetError, match="'completion_ids' must be a list of token ids, "
                       "got a string"):
        ProblemResult.from_json({**first.to_json(), "completion_ids": "1 2"}, "r.jsonl:1")
    for bad, shown in (([7, 1.5], "1.5 at position 1"), ([-1], "-1 at position 0"),
                       ([3, 4, True], "true at position 2"), ([[1]], "[1] at position 0")):
        with pytest.raises(ProblemSetError, match=f"r.jsonl:1: field 'completion_ids' holds "
                           f"{re.escape(shown)}; token ids are whole numbers from 0"):
            ProblemResult.from_json({**first.to_json(), "completion_ids": bad}, "r.jsonl:1")
    s = summarize(records)
    assert (s.total, s.correct, s.accuracy) == (10, 7, 70.0)
    assert s.verdicts == {"correct": 7, "wrong": 2, "no-answer": 1}
    assert s.by_rule == {"boxed": 9, "none": 1}
    assert sum(t.total for t in s.by_subject.values()) == 10


def stale_file(tmp_path: Path) -> Path:
    """A results file as an older grader left it: every verdict 'wrong', plus a field
    this grader does not know."""
    path = tmp_path / "results.jsonl"
    rows = []
    for r in sample_results():
        row = r.to_json()
        row.update(verdict="wrong", extracted=None, rule="last-number", sampler="greedy")
        rows.append(row)
    write_results(path, rows)
    return path


def test_grade_rewrites_in_place_and_reports(tmp_path):
    path = stale_file(tmp_path)
    data = json.loads(run("grade", str(path), "--json").output)
    assert data["summary"]["accuracy"] == 70.0 and data["summary"]["correct"] == 7
    assert data["out"] == str(path)
    changed = {tuple(c) for c in data["changes"]}
    assert len(changed) == 8 and (("test/precalculus/807.json", "wrong", "correct") in changed)
    rows = read_results(path)
    assert [r["verdict"] for r in rows] == ["correct"] * 7 + ["wrong", "wrong", "no-answer"]
    assert all(r["sampler"] == "greedy" for r in rows)  # unknown fields survive
    assert rows[0]["extracted"] == rows[0]["answer"] and rows[0]["method"] == "string"
    assert not list(tmp_path.glob("*.partial"))
    # Running again changes nothing.
    again = run("grade", str(path)).output.splitlines()
    assert again[0] == f"Re-graded 10 results from {path} (written in place)"
    assert again[1] == "accuracy 70.0% (7/10); correct 7, wrong 2, no-answer 1"
    assert again[2] == "changed verdicts: 0"
    assert again[-1] == "rules: boxed 9, none 1"


def test_grade_out_leaves_the_input_alone(tmp_path):
    path = stale_file(tmp_path)
    before = path.read_bytes()
    out = tmp_path / "regraded.jsonl"
    text = run("grade", str(path), "--out", str(out)).output
    assert f"(written to {out})" in text.splitlines()[0]
    assert path.read_bytes() == before
    assert [r["verdict"] for r in read_results(out)].count("correct") == 7


def test_grade_takes_gold_answers_from_a_problem_set(tmp_path):
    path = tmp_path / "bare.jsonl"
    rows = [{"id": r.id, "completion": r.completion} for r in sample_results()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = run("grade", str(path), code=2)
    assert result.output.splitlines() == [
        f"Error: {path}:1: missing field 'answer' "
        "(each result needs id, completion and the gold answer)"]
    data = json.loads(run("grade", str(path), "--problems", str(MATH500), "--json").output)
    assert data["summary"]["correct"] == 7
    assert read_results(path)[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"


def test_grade_in_worker_processes_matches(tmp_path):
    path = stale_file(tmp_path)
    serial = regrade_file(path, out=tmp_path / "serial.jsonl")
    parallel = regrade_file(path, out=tmp_path / "parallel.jsonl", workers=2)
    assert serial.summary == parallel.summary
    assert read_results(tmp_path / "serial.jsonl") == read_results(tmp_path / "parallel.jsonl")


def test_grade_malformed_results_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = json.dumps(sample_results()[0].to_json())
    path.write_text(good + "\n" + good[:40] + "\n", encoding="utf-8")
    result = run("grade", str(path), code=2)
    assert result.output.splitlines()[0].startswith(f"Error: {path}:2: not valid JSON (")
    with pytest.raises(ProblemSetError) as err:
        read_results(path)
    assert (err.value.path, err.value.line) == (str(path), 2)


def test_grade_names_the_line_of_a_bad_record_after_blank_lines(tmp_path):
    """Blank lines are skipped but counted: the error names the file's own line."""
    path = tmp_path / "blank.jsonl"
    rows = [r.to_json() for r in sample_results()[:3]]
    rows[2]["completion_ids"] = [5, -1]
    path.write_text("\n\n" + "\n".join(map(json.dumps, rows)) + "\n", encoding="utf-8")
    before = path.read_bytes()
    result = run("grade", str(path), code=2)
    assert result.output.splitlines()[0].startswith(
        f"Error: {path}:5: field 'completion_ids' holds -1 at position 1")
    assert path.read_bytes() == before


def test_grade_help_documents_the_command():
    text = run("grade", "--help").output
    assert "Examples:" in text and "--workers" in text and "--problems" in text
