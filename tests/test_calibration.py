"""Calibration text: sources, prompt layout, and the overlap check against the smoke set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mathq.datasets.problems import Problem, load_problem_set, read_problems_jsonl
from mathq.errors import CalibrationError
from mathq.quantize.calibration import (
    CALIBRATION_SETS,
    build_calibration_text,
    item_text,
    normalise,
    render_items,
)
from mathq.recipes.prompt import EOS
from mathq.recipes.recipe import load_recipe
from tests.clirun import run
from tests.conftest import FIXTURES

MATH500 = FIXTURES / "math500" / "test.jsonl"


@pytest.fixture()
def split(tmp_path) -> tuple[Path, Path]:
    """MATH-500 cut in two: 300 problems to calibrate on, 200 to grade, 5 of which also
    sit in the calibration file with their whitespace changed."""
    lines = MATH500.read_text(encoding="utf-8").splitlines()
    graded = lines[300:]
    reflowed = []
    for line in graded[:5]:
        row = json.loads(line)
        row["problem"] = "  " + row["problem"].replace(" ", "\n  ", 3) + "\n"
        row["unique_id"] = "copy/" + row["unique_id"]
        reflowed.append(json.dumps(row))
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(lines[:300] + reflowed) + "\n", encoding="utf-8")
    smoke = tmp_path / "smoke.jsonl"
    smoke.write_text("\n".join(graded) + "\n", encoding="utf-8")
    return calib, smoke


def test_graded_problems_are_dropped_even_when_reflowed(split):
    calib, smoke = split
    text = build_calibration_text(str(calib), load_problem_set(smoke))
    assert text.n_items == 300
    assert len(text.excluded) == 5 and all(i.startswith("copy/") for i in text.excluded)
    flat = normalise(text.text)
    for p in load_problem_set(smoke).problems:
        assert normalise(p.problem) not in flat
    assert text.dataset == str(calib)


def test_every_problem_graded_is_refused(tmp_path):
    with pytest.raises(CalibrationError, match=r"every problem of .* is in the smoke set"):
        build_calibration_text(str(MATH500), load_problem_set(MATH500))


def test_plain_text_holding_a_graded_problem_is_refused(tmp_path, split):
    _, smoke = split
    graded = load_problem_set(smoke).problems[7]
    notes = tmp_path / "notes.txt"
    notes.write_text("Some algebra first.\n\n" + graded.problem.replace(" ", "  ") + "\n")
    with pytest.raises(CalibrationError) as e:
        build_calibration_text(str(notes), load_problem_set(smoke))
    assert str(e.value) == (
        f"{notes} contains 1 problem(s) of the smoke set smoke (first: {graded.id}) (remove "
        "them from the file, or calibrate on a problem file (.jsonl) or a named set, from "
        "which mathq drops graded problems itself)")
    clean = tmp_path / "clean.txt"
    clean.write_text("Let $x^2 = 4$. Then $x = \\pm 2$.\n")
    text = build_calibration_text(str(clean), load_problem_set(smoke))
    assert text.text == clean.read_text() and text.excluded == ()


def test_chat_layout_is_the_recipes_prompt_and_plain_layout_is_bare():
    problems = read_problems_jsonl(MATH500)[:2]
    spec = load_recipe("deepseek-math-7b-rl").prompt
    chat = render_items(problems, spec)
    p0, s0 = item_text(problems[0])
    p1, _ = item_text(problems[1])
    assert chat.startswith(f"User: {p0}\nPlease reason step by step, and put your final "
                           "answer within \\boxed{}.\n\nAssistant: " + s0 + EOS + f"User: {p1}")
    base = render_items(problems, load_recipe("deepseek-math-7b-base").prompt)
    assert base.startswith("Problem:\n") and f"\n\nProblem:\n{p0}" in base
    plain = render_items(problems, None)
    assert plain.startswith(f"{p0}\n\n{s0}\n\n{p1}")
    assert "User:" not in plain and EOS not in plain


def test_gsm8k_solutions_lose_calculator_notes_and_gain_a_boxed_answer():
    p = Problem(id="g", problem="Ann has 3 bags of 4 apples. How many apples?",
                answer="12", solution="She has 3 * 4 = <<3*4=12>>12 apples.")
    assert item_text(p) == ("Ann has 3 bags of 4 apples. How many apples?",
                            "She has 3 * 4 = 12 apples.\nThe final answer is $\\boxed{12}$.")


def test_text_stops_near_the_budget_and_the_shuffle_is_seeded(split):
    calib, smoke = split
    graded = load_problem_set(smoke)
    a = build_calibration_text(str(calib), graded, max_chars=5000, seed=1)
    b = build_calibration_text(str(calib), graded, max_chars=5000, seed=1)
    c = build_calibration_text(str(calib), graded, max_chars=5000, seed=2)
    assert a == b and a.text != c.text
    assert 3 <= a.n_items < 60 and len(a.text) >= 4000


def test_unknown_set_and_missing_file_are_one_line(tmp_path):
    model = FIXTURES / "deepseek-llm-tokenizer" / "ggml-vocab-deepseek-llm.gguf"  # not run
    result = run("imatrix", str(model), "-c", "wikitext", "--smoke-suite",
                 str(MATH500), code=2)
    assert result.output.strip().splitlines()[-1] == (
        "Error: no calibration set named 'wikitext' (known sets: math-train, gsm8k-train; or "
        "give a .txt or .jsonl file)")
    result = run("imatrix", str(model), "-c", str(tmp_path / "none.txt"),
                 "--smoke-suite", str(MATH500), code=2)
    assert result.output.strip().splitlines()[-1] == (
        f"Error: Invalid value for '--calibration' / '-c': {tmp_path / 'none.txt'} does not "
        "exist")


def test_calibration_sets_are_train_splits_beside_the_graded_suites():
    from mathq.datasets.problems import SUITES

    graded = {(s.repo_id, s.filename) for s in SUITES}
    for s in CALIBRATION_SETS:
        assert "train" in s.filename and (s.repo_id, s.filename) not in graded
