"""Recipes: the bundled three load, and broken ones fail naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mathq.errors import RecipeError
from mathq.recipes.recipe import bundled_recipe_names, load_recipe

GOOD = """
[model]
name = "my-math"
hf_repo = "someone/my-math"
kind = "chat"
license_name = "MIT"
license_url = "https://example.org/mit"

[prompt]
template = "deepseek-chat"

[quants]
variants = ["Q4_K_M", "q8_0"]

[ollama]
model = "my-math"
[ollama.tags]
latest = "Q4_K_M"

[smoke]
reference_accuracy = 50
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_bundled_recipes_load_with_the_papers_figures():
    assert {"deepseek-math-7b-base", "deepseek-math-7b-instruct",
            "deepseek-math-7b-rl"} <= set(bundled_recipe_names())
    refs = {v: load_recipe(f"deepseek-math-7b-{v}").smoke.reference_accuracy
            for v in ("base", "instruct", "rl")}
    assert refs == {"base": 36.2, "instruct": 46.8, "rl": 51.7}
    rl = load_recipe("deepseek-math-7b-rl")
    assert rl.model.hf_repo == "deepseek-ai/deepseek-math-7b-rl"
    assert rl.prompt.system_prompt == "none" and rl.prompt.append_cot_suffix
    tags = rl.ollama.tag_map()
    assert (tags["latest"], tags["Q5"], tags["Q6"], tags["Q8"]) == (
        "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
    assert tags["7b-rl-q5_K_M"] == "Q5_K_M"
    assert rl.smoke.max_tokens == 1024
    base = load_recipe("deepseek-math-7b-base")
    assert base.model.kind == "base" and base.prompt.few_shot == 4
    assert not base.prompt.append_cot_suffix


def test_kld_corpus_is_a_recipe_setting(tmp_path):
    # DeepSeek's recipes measure on the bundled math notes (no corpus: the default) ...
    for variant in ("base", "instruct", "rl"):
        assert load_recipe(f"deepseek-math-7b-{variant}").kld.corpus is None
    assert load_recipe(write(tmp_path, GOOD)).kld.corpus is None
    # ... the demo on held-out text of its own domain, named relative to the recipe.
    demo = load_recipe("tiny-demo")
    assert demo.kld.corpus == (demo.path.parent / "../models/tiny-demo/kld-text.txt").resolve()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "mine.txt").write_text("Some math. $1 + 1 = 2$.\n", encoding="utf-8")
    own = load_recipe(write(tmp_path, GOOD + '\n[kld]\ncorpus = "texts/mine.txt"\n'))
    assert own.kld.corpus == (tmp_path / "texts" / "mine.txt").resolve()


def test_user_recipe_by_path_normalises_quant_names(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.quants.variants == ("Q4_K_M", "Q8_0")
    assert r.quants.default == "Q4_K_M"
    assert r.prompt.append_cot_suffix is True  # chat models default to the CoT suffix


@pytest.mark.parametrize(
    ("old", "new", "field", "problem"),
    [
        ('kind = "chat"', 'kind = "instruct"', "model.kind", "must be one of base, chat"),
        ('variants = ["Q4_K_M", "q8_0"]', 'variants = ["Q4_K_M", "Q4KM"]', "quants.variants[1]",
         "did you mean Q4_K_M"),
        ('latest = "Q4_K_M"', '"-bad" = "Q4_K_M"', "ollama.tags.-bad", "must start with"),
        ("reference_accuracy = 50", "reference_accuracy = 150", "smoke.reference_accuracy",
         "percentage"),
        ('license_name = "MIT"', 'license_name = "MIT"\nlicence_url = "x"', "model.licence_url",
         "is not a recipe field"),
        ('hf_repo = "someone/my-math"', "", "model.hf_repo", "exactly one of"),
        ('template = "deepseek-chat"', 'template = "few-shot"', "prompt.few_shot",
         "needs few_shot > 0"),
        ("[smoke]", "[smoke]\nn = true", "smoke.n", "got a boolean"),
        ("[smoke]", '[kld]\ncorpus = "no-such.txt"\n\n[smoke]', "kld.corpus",
         "does not exist"),
        ("[smoke]", '[kld]\ncorpus_file = "a.txt"\n\n[smoke]', "kld.corpus_file",
         "is not a recipe field"),
        ("[smoke]", '[tune]\ncalibration = "no-such.jsonl"\n\n[smoke]', "tune.calibration",
         "does not exist"),
        ("[smoke]", '[tune]\ntypes = ["Q4_K", "Q4_K_M"]\n\n[smoke]', "tune.types[1]",
         "not a tensor type the tuner can choose"),
        ("[smoke]", '[tune]\ntypes = []\n\n[smoke]', "tune.types", "names no type"),
        ("[smoke]", '[tune]\nbudgets = ["BF16"]\n\n[smoke]', "tune.budgets[0]",
         "not quantized"),
        ("[smoke]", '[tune]\nbudgets = ["T16"]\n\n[smoke]', "tune.budgets[0]",
         "not between 1 and 16"),
        ("[smoke]", '[tune]\nbudgets = ["Q2_K,Q4_K_M"]\n\n[smoke]', "tune.budgets[0]",
         "one type or budget"),
        ("[smoke]", '[tune]\nbudgets = ["Q4_K_M-imat"]\n\n[smoke]', "tune.budgets[0]",
         "alone"),
        ("[smoke]", '[tune]\nbudgets = ["T15.999"]\n\n[smoke]', "tune.budgets[0]",
         "not between 1 and 16"),  # T16.00 at the name's two decimals
        ("[smoke]", '[tune]\ncalibration = " "\n\n[smoke]', "tune.calibration", "is empty"),
    ],
)
def test_invalid_recipes_name_file_and_field(tmp_path, old, new, field, problem):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.field == field
    assert str(path) in str(info.value) and f"[{field}]" in str(info.value)
    assert problem in str(info.value)


def test_unknown_name_suggests_the_closest(tmp_path):
    with pytest.raises(RecipeError, match="did you mean deepseek-math-7b-rl"):
        load_recipe("deepseek-math-7b-r")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(write(tmp_path, "[model"))


def test_tune_is_a_recipe_setting(tmp_path):
    """[tune]: the probes' calibration (a file relative to the recipe, or a set's name),
    candidate types and the tuned variants a build makes by default, T<bpw> included."""
    from mathq.pipeline import default_options

    assert load_recipe(write(tmp_path, GOOD)).tune.calibration is None  # mathq's default
    demo = load_recipe("tiny-demo")
    assert demo.tune.calibration == str(
        (demo.path.parent / "../models/tiny-demo/problems.jsonl").resolve())
    (tmp_path / "calib.jsonl").write_text("{}\n")
    own = load_recipe(write(tmp_path, GOOD + '\n[tune]\ncalibration = "calib.jsonl"\n'
                            'types = ["q4_k", "Q6_K", "Q4_K"]\n'
                            'budgets = ["Q4_K_M", "t4.85", "Q4_K_M-tuned"]\n'))
    assert own.tune.calibration == str((tmp_path / "calib.jsonl").resolve())
    assert own.tune.types == ("Q4_K", "Q6_K")
    assert [v.name for v in own.tune.budgets] == ["Q4_K_M-tuned", "T4.85"]
    assert [v.name for v in default_options(own, None).tune] == ["Q4_K_M-tuned", "T4.85"]
    named = load_recipe(write(tmp_path, GOOD + '\n[tune]\ncalibration = "math-train"\n'))
    assert named.tune.calibration == "math-train"
