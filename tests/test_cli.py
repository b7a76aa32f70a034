"""The CLI's shell: help, recipes, quants, and one-line errors."""

from __future__ import annotations

import json

from tests.clirun import run


def test_help_teaches():
    out = run("--help").output
    assert "Start here" in out and "recipes" in out and "quants" in out


def test_recipes_lists_and_shows():
    assert "deepseek-math-7b-rl" in run("recipes").output
    shown = run("recipes", "show", "deepseek-math-7b-instruct").output
    assert 'hf_repo = "deepseek-ai/deepseek-math-7b-instruct"' in shown
    data = json.loads(run("recipes", "show", "deepseek-math-7b-instruct", "--json").output)
    assert data["smoke"]["reference_accuracy"] == 46.8
    assert data["ollama"]["tags"][0] == ["latest", "Q4_K_M"]


def test_unknown_recipe_is_one_line_exit_2():
    result = run("recipes", "show", "deepseek-math-7b-r", code=2)
    assert result.output.strip().splitlines() == [
        "Error: no recipe named 'deepseek-math-7b-r' (did you mean deepseek-math-7b-rl?)"]


def test_quants_table_and_json():
    out = run("quants").output
    assert "Q4_K_M" in out and "IQ2_XXS" in out and "required" in out
    rows = json.loads(run("quants", "--json").output)
    assert {"name": "Q8_0", "ftype": 7}.items() <= rows[3].items()
