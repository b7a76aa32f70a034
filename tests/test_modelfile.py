"""Modelfiles: the committed ones are current and valid, recipes that cannot be written are
refused, and the validator reads Modelfiles by Ollama's rules with the right line numbers."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from mathq.errors import ModelfileError, RecipeError
from mathq.layout import BuildLayout
from mathq.modelfile.check import check_modelfile_text, parse_modelfile
from mathq.modelfile.gotemplate import go_template
from mathq.modelfile.stage import write_modelfiles
from mathq.modelfile.write import GENERATED_MARK
from mathq.recipes.recipe import PROMPT_TEMPLATES, bundled_recipe_names, load_recipe
from tests.clirun import run

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "modelfiles"


def test_committed_modelfiles_are_up_to_date(tmp_path: Path):
    out = tmp_path / "modelfiles"
    run("modelfile", "--all", "--out", str(out), "--build-dir", str(tmp_path / "build"))
    fresh = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.Modelfile")}
    committed = {p.relative_to(COMMITTED): p.read_bytes() for p in COMMITTED.rglob("*")
                 if p.is_file()}
    assert sorted(fresh) == sorted(committed), "run `mathq modelfile --all` and commit"
    stale = [str(p) for p in fresh if fresh[p] != committed[p]]
    assert not stale, f"stale Modelfiles, run `mathq modelfile --all`: {stale}"
    assert len(fresh) == sum(len(load_recipe(n).ollama.tags) for n in bundled_recipe_names())


def test_committed_modelfiles_pass_the_validator(tmp_path: Path):
    """Copied beside a build folder holding the GGUFs they name (FROM must exist), the
    committed Modelfiles pass; without those GGUFs, FROM is the only problem."""
    copies = tmp_path / "modelfiles"
    shutil.copytree(COMMITTED, copies)
    files = sorted(str(p) for p in copies.rglob("*.Modelfile"))
    missing = run("modelfile", "--check", *files, code=1).output.splitlines()
    assert len(missing) == len(files) + 1
    assert all(": no such file (paths are relative to the Modelfile)" in line
               for line in missing[:-1])
    for f in files:
        (source,) = parse_modelfile(Path(f).read_text("utf-8")).values("FROM")
        gguf = (Path(f).parent / source).resolve()
        gguf.parent.mkdir(parents=True, exist_ok=True)
        gguf.touch()
    out = run("modelfile", "--check", *files).output.splitlines()
    assert out == [f"{f}: ok" for f in files]


@pytest.mark.parametrize("name", [n for n in bundled_recipe_names() if n.startswith("deepseek")])
def test_committed_modelfiles_say_everything_explicitly(name: str):
    recipe = load_recipe(name)
    layout = BuildLayout.for_model(recipe.name, REPO / "build")
    for tag, quant in recipe.ollama.tags:
        path = COMMITTED / recipe.ollama.model / f"{tag}.Modelfile"
        parsed = parse_modelfile(path.read_text("utf-8"))
        assert not parsed.problems
        (source,) = parsed.values("FROM")
        assert (path.parent / source).resolve() == layout.gguf(quant).resolve()
        assert source == f"../../build/{recipe.name}/{recipe.name}-{quant}.gguf"
        assert parsed.values("TEMPLATE") == [go_template(recipe.prompt)]
        assert parsed.values("SYSTEM") == [] and parsed.values("MESSAGE") == []
        params = parsed.parameters()
        assert ("num_ctx", "4096") in params and ("temperature", "0.0") in params
        assert ("repeat_penalty", "1.0") in params and ("num_predict", "1024") in params
        stops = [v for k, v in params if k == "stop"]
        assert stops[0] == "<｜end▁of▁sentence｜>"
        assert stops[1] == ("\nProblem:" if recipe.model.kind == "base" else "User:")
        assert parsed.values("LICENSE") == [
            "DeepSeek License\nhttps://github.com/deepseek-ai/DeepSeek-Math/blob/main/"
            "LICENSE-MODEL"]
        text = path.read_text("utf-8")
        assert text.startswith(GENERATED_MARK + recipe.name)
        if recipe.prompt.append_cot_suffix:
            assert "every user message gets this appended" in text
            assert "#   Please reason step by step" in text


def test_recipe_prompt_choices_come_from_the_prompt_module():
    from mathq.recipes.prompt import COT_SUFFIXES, PROMPT_FORMATS

    assert tuple(PROMPT_FORMATS) == PROMPT_TEMPLATES
    assert COT_SUFFIXES["zh"] == "\n请通过逐步推理来解答问题，并把最终答案放置于\\boxed{}中。"


def test_recipe_writes_into_its_build_folder_by_default(tmp_path: Path):
    out = run("modelfile", "deepseek-math-7b-rl", "--build-dir", str(tmp_path)).output
    folder = tmp_path / "deepseek-math-7b-rl" / "modelfiles"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{t}.Modelfile" for t, _ in load_recipe("deepseek-math-7b-rl").ollama.tags)
    latest = parse_modelfile((folder / "latest.Modelfile").read_text("utf-8"))
    assert latest.values("FROM") == ["../deepseek-math-7b-rl-Q4_K_M.gguf"]
    assert f"{folder / 'latest.Modelfile'}  (deepseek-math-7b-rl:latest, FROM " in out


def test_build_dir_comes_from_the_environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MATHQ_BUILD_DIR", str(tmp_path / "env-build"))
    run("modelfile", "deepseek-math-7b-base", "--tag", "latest")
    path = tmp_path / "env-build" / "deepseek-math-7b-base" / "modelfiles" / "latest.Modelfile"
    assert parse_modelfile(path.read_text("utf-8")).values("FROM") == [
        "../deepseek-math-7b-base-Q4_K_M.gguf"]


def test_out_and_tag_choose_folder_and_tags(tmp_path: Path):
    out = tmp_path / "here"
    result = run("modelfile", "deepseek-math-7b-instruct", "--tag", "Q8", "--tag", "latest",
                 "--out", str(out), "--build-dir", str(tmp_path / "b"), "--json")
    data = json.loads(result.output)
    assert [f["tag"] for f in data[0]["files"]] == ["Q8", "latest"]
    assert sorted(p.name for p in out.iterdir()) == ["Q8.Modelfile", "latest.Modelfile"]
    q8 = parse_modelfile((out / "Q8.Modelfile").read_text("utf-8"))
    assert q8.values("FROM") == ["../b/deepseek-math-7b-instruct/deepseek-math-7b-instruct-"
                                 "Q8_0.gguf"]


def test_unknown_tag_is_one_line(tmp_path: Path):
    result = run("modelfile", "deepseek-math-7b-rl", "--tag", "q4", "--out", str(tmp_path),
                 code=2)
    assert result.output.splitlines() == [
        "Error: recipe deepseek-math-7b-rl has no Ollama tag 'q4' (its tags are latest, Q5, "
        "Q6, Q8, 7b-rl-q4_K_M, 7b-rl-q5_K_M, 7b-rl-q6_K, 7b-rl-q8_0)"]
    assert not list(tmp_path.iterdir())


def test_usage_errors():
    assert "--check needs" in run("modelfile", "--check", code=2).output
    assert "give one RECIPE" in run("modelfile", code=2).output
    assert "do not go together" in run("modelfile", "--all", "--check", "x", code=2).output


def test_all_removes_generated_files_of_dropped_tags_only(tmp_path: Path):
    folder = tmp_path / "mf" / "deepseek-math-7b-rl"
    folder.mkdir(parents=True)
    (folder / "old-tag.Modelfile").write_text(GENERATED_MARK + "deepseek-math-7b-rl; ...\n")
    (folder / "mine.Modelfile").write_text("FROM x\n")
    out = run("modelfile", "--all", "--out", str(tmp_path / "mf"), "--build-dir",
              str(tmp_path / "b")).output
    assert not (folder / "old-tag.Modelfile").exists() and (folder / "mine.Modelfile").exists()
    assert "old-tag.Modelfile  (removed" in out


def rl_with(**changes) -> object:
    rl = load_recipe("deepseek-math-7b-rl")
    model = replace(rl.model, **{k: v for k, v in changes.items() if k.startswith("license")})
    params = changes.get("parameters")
    ollama = replace(rl.ollama, parameters=params) if params is not None else rl.ollama
    return replace(rl, model=model, ollama=ollama)


@pytest.mark.parametrize("changes,error,message", [
    ({"license_name": 'The """Quoted""" License'}, ModelfileError,
     'the recipe file: [model.license_name/license_url] contains """, which a Modelfile '
     "cannot hold"),
    ({"license_name": "DeepSeek\u00a0License"}, ModelfileError,
     "[model.license_name/license_url] contains U+00A0, which Ollama's Modelfile parser "
     "would drop"),
    ({"parameters": (("temprature", 0.0),)}, RecipeError,
     "[ollama.parameters.temprature] unknown parameter 'temprature' (did you mean "
     "'temperature'?)"),
    ({"parameters": (("num_ctx", 4096.0),)}, RecipeError,
     "[ollama.parameters.num_ctx] num_ctx takes a whole number, got '4096.0'"),
    ({"parameters": (("temperature", [0.1]),)}, RecipeError,
     "[ollama.parameters.temperature] temperature takes one value, not a list"),
    ({"parameters": (("mirostat", 1),)}, RecipeError,
     "[ollama.parameters.mirostat] parameter 'mirostat' is deprecated: Ollama ignores it"),
    ({"parameters": (("stop", ['"""']),)}, ModelfileError,
     '[ollama.parameters.stop] contains """, which a Modelfile cannot hold'),
    ({"parameters": (("stop", ["\r"]),)}, ModelfileError,
     "[ollama.parameters.stop] contains U+000D, which Ollama's Modelfile parser reads as a "
     "line end"),
])
def test_recipes_that_cannot_be_written_are_refused(tmp_path: Path, changes, error,
                                                    message: str):
    recipe = rl_with(**changes)
    with pytest.raises(error) as info:
        write_modelfiles(recipe, tmp_path / "out", tmp_path / "build")
    assert message.replace("the recipe file", str(recipe.path)) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_recipe_stop_strings_are_added_after_the_formats(tmp_path: Path):
    recipe = rl_with(parameters=(("temperature", 0.6), ("stop", ["</s>", "User:", "  pad"]),
                                 ("use_mmap", False)))
    result = write_modelfiles(recipe, tmp_path, tmp_path, tags=["latest"])
    assert 'PARAMETER stop "  pad"' in result.files[0].path.read_text("utf-8")
    params = parse_modelfile(result.files[0].path.read_text("utf-8")).parameters()
    assert params == [("temperature", "0.6"), ("use_mmap", "false"), ("num_ctx", "4096"),
                      ("stop", "<｜end▁of▁sentence｜>"), ("stop", "User:"), ("stop", "</s>"),
                      ("stop", "  pad")]
    assert "temperature 0 is greedy" not in result.files[0].path.read_text("utf-8")


BROKEN = {
    "unknown instruction": ("FROM m.gguf\nPARAMETER temperature 0\nTEMPLAT {{ .Prompt }}\n",
                            3, "unknown instruction 'TEMPLAT'; expected one of FROM, "
                               "PARAMETER, TEMPLATE, SYSTEM, ADAPTER, DRAFT, LICENSE, MESSAGE, "
                               "RENDERER, PARSER, REQUIRES"),
    "unclosed triple quote": ('FROM m.gguf\n\nTEMPLATE """{{ .Prompt }}\nPARAMETER top_k 1\n',
                              3, 'TEMPLATE value opened with """ is never closed'),
    "triple quote inside the value": ('FROM m.gguf\nTEMPLATE """say """\nthen\n"""\n', 3,
                                      "unknown instruction 'then'; expected one of FROM, "
                                      "PARAMETER, TEMPLATE, SYSTEM, ADAPTER, DRAFT, LICENSE, "
                                      "MESSAGE, RENDERER, PARSER, REQUIRES"),
    "unclosed quote": ('FROM m.gguf\nPARAMETER stop "User:\n', 2,
                       'PARAMETER value opened with " is never closed'),
    "no FROM": ("# comment\nPARAMETER temperature 0\n", 1, "no FROM instruction; Ollama "
                "needs one"),
    "empty FROM": ("FROM   \nPARAMETER temperature 0\n", 1, "FROM needs a model name or a "
                   "path"),
    "instruction without value": ("FROM m.gguf\nSYSTEM\nLICENSE MIT\n", 2,
                                  "SYSTEM has no value"),
    "instruction at the end of the file": ("FROM m.gguf\nSYSTEM", 2, "SYSTEM has no value"),
    "message role at the end of the file": ("FROM m.gguf\nMESSAGE user", 2,
                                            "MESSAGE has no value"),
    "parameter without value": ("FROM m.gguf\n\n\nPARAMETER stop\n", 4,
                                "PARAMETER stop has no value"),
    "bad parameter name": ("FROM m.gguf\nPARAMETER top-k 1\n", 2,
                           "parameter name 'top-k' may hold only letters, digits and '_'"),
    "message role": ("FROM m.gguf\n# a\n# b\nMESSAGE bot hello\n", 4,
                     "MESSAGE role must be system, user or assistant, got 'bot'"),
    "unknown parameter": ("FROM m.gguf\nPARAMETER temprature 0.5\n", 2,
                          "unknown parameter 'temprature' (did you mean 'temperature'?)"),
    "removed parameter": ("FROM m.gguf\nPARAMETER tfs_z 1\n", 2, "unknown parameter 'tfs_z'"),
    "float for an int": ("FROM m.gguf\nPARAMETER num_ctx 4096.0\n", 2,
                         "num_ctx takes a whole number, got '4096.0'"),
    "comment after a value": ("FROM m.gguf\nPARAMETER temperature 0 # greedy\n", 2,
                              "temperature takes a number, got '0 # greedy'"),
    "float32 overflow": ("FROM m.gguf\nPARAMETER top_p 1e39\n", 2,
                         "top_p takes a number, got '1e39'"),
    "not finite": ("FROM m.gguf\nPARAMETER temperature nan\n", 2,
                   "temperature must be finite, got 'nan'"),
    "int64 overflow": ("FROM m.gguf\nPARAMETER seed 9223372036854775808\n", 2,
                       "seed takes a whole number, got '9223372036854775808'"),
    "bool": ("FROM m.gguf\nPARAMETER use_mmap yes\n", 2,
             "use_mmap takes true or false, got 'yes'"),
    "deprecated parameter": ("FROM m.gguf\nPARAMETER mirostat 2\n", 2,
                             "parameter 'mirostat' is deprecated: Ollama ignores it"),
    "given twice": ("FROM m.gguf\nPARAMETER num_ctx 2048\nPARAMETER num_ctx 4096\n", 3,
                    "PARAMETER num_ctx is given again (first on line 2); Ollama keeps only "
                    "the last"),
    "template twice": ('FROM m.gguf\nTEMPLATE """a\nb"""\nTEMPLATE c\n', 4,
                       "TEMPLATE is given again (first on line 2); Ollama keeps only the "
                       "last"),
    "dropped character": ("FROM m.gguf\nSYSTEM one\u00a0two\n", 2,
                          "SYSTEM value contains U+00A0, which Ollama drops"),
    "BOS in the template": ("FROM m.gguf\nTEMPLATE <｜begin▁of▁sentence｜>{{ .Prompt }}\n", 2,
                            "TEMPLATE contains BOS; the tokenizer adds it, so every prompt "
                            "would start with two"),
    "requires": ("FROM m.gguf\nREQUIRES latest\n", 2,
                 "REQUIRES needs a version such as 0.12.0, got 'latest'"),
    "if without end": ('FROM m.gguf\nTEMPLATE """{{ if .System }}\n{{ .System }}\n"""\n', 4,
                       "TEMPLATE: unexpected EOF"),
    "unclosed action": ('FROM m.gguf\n\nTEMPLATE """{{ range .Messages }}\n{{ .Content """\n', 4,
                        "TEMPLATE: unclosed action"),
    "unknown function": ('FROM m.gguf\nTEMPLATE """{{ toUpper .Content }}"""\n', 2,
                         'TEMPLATE: function "toUpper" not defined'),
    "extra end": ('FROM m.gguf\nTEMPLATE """{{ .Content }}\n{{ end }}"""\n', 3,
                  "TEMPLATE: unexpected {{end}}"),
    "template without pipeline": (
        'FROM m.gguf\nTEMPLATE """{{ define "t" }}x{{ end }}{{ template "t" }}"""\n', 2,
        'TEMPLATE: {{template}} without a pipeline: Ollama refuses it (undefined template '
        'specified); pass one, e.g. {{template "name" .}}'),
    "template swallows LICENSE": (
        'FROM m.gguf\nTEMPLATE """{{ .Prompt }}\nPARAMETER temperature 0\nLICENSE """MIT\n'
        'text"""\n', 2,
        'TEMPLATE opened with """ is not closed before line 3 (\'PARAMETER temperature 0\'), so '
        'Ollama '
        'reads that line into its value; close it with """'),
    "FROM a missing file": ("FROM ./nonexistent.gguf\n", 1,
                            "FROM ./nonexistent.gguf: no such file (paths are relative to the "
                            "Modelfile); build the GGUF first or fix the path"),
    "CRLF line numbers": ("FROM m.gguf\r\n\r\nPARAMETER top_k x\r\n", 3,
                          "top_k takes a whole number, got 'x'"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_validator_rejects_broken_modelfiles_at_the_right_line(tmp_path: Path, name: str):
    text, line, message = BROKEN[name]
    path = tmp_path / "Modelfile"
    path.write_bytes(text.encode("utf-8"))
    result = run("modelfile", "--check", str(path), code=1)
    assert result.output.splitlines() == [
        f"{path}:{line}: {message}",
        "Error: 1 problem(s) in 1 of 1 Modelfile(s) (fix the lines listed above)"]


def test_validator_reports_invalid_utf8_and_every_semantic_problem(tmp_path: Path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"FROM m.gguf\nSYSTEM caf\xe9\n")
    many = tmp_path / "many"
    many.write_text("PARAMETER top_k 1.5\nPARAMETER temperature hot\n")
    good = tmp_path / "good"
    good.write_text("FROM m.gguf\n")
    out = run("modelfile", "--check", str(bad), str(many), str(good), code=1).output
    assert out.splitlines() == [
        f"{bad}:2: not valid UTF-8 (byte 0xe9); save the file as UTF-8",
        f"{many}:1: no FROM instruction; Ollama needs one",
        f"{many}:1: top_k takes a whole number, got '1.5'",
        f"{many}:2: temperature takes a number, got 'hot'",
        f"{good}: ok",
        "Error: 4 problem(s) in 2 of 3 Modelfile(s) (fix the lines listed above)"]


def test_validator_accepts_what_ollama_accepts():
    text = ("\ufeff# Ollama reads all of this\n"
            "from ./m.gguf\n"
            "parameter\ttemperature 0.7\r\n"
            "PARAMETER stop \"\nProblem:\"\n"
            "PARAMETER stop <|end|>\n"
            "PARAMETER stop \"  spaced \"\n"
            "PARAMETER use_mmap True\n"
            "PARAMETER top_p 0x1p-1\n"
            "TEMPLATE \"\"\"{{ if .System }}\"quoted\"{{ end }}\n"
            "  {{ .Prompt }}\"\"\"\n"
            "SYSTEM \"\"\"a \"\"\" b\"\"\"\n"
            "MESSAGE user What is 1+1?\n"
            "MESSAGE assistant 2\n"
            "LICENSE MIT # not a comment\n"
            "REQUIRES 0.12.0\n"
            "    # indented comment\n"
            "ADAPTER ./lora.gguf")
    assert check_modelfile_text(text) == ()
    parsed = parse_modelfile(text)
    assert [(c.instruction, c.name, c.value, c.line) for c in parsed.commands] == [
        ("FROM", "", "./m.gguf", 2),
        ("PARAMETER", "temperature", "0.7", 3),
        ("PARAMETER", "stop", "\nProblem:", 4),
        ("PARAMETER", "stop", "<|end|>", 6),
        ("PARAMETER", "stop", "  spaced ", 7),
        ("PARAMETER", "use_mmap", "True", 8),
        ("PARAMETER", "top_p", "0x1p-1", 9),
        ("TEMPLATE", "", '{{ if .System }}"quoted"{{ end }}\n  {{ .Prompt }}', 10),
        ("SYSTEM", "", 'a """ b', 12),
        ("MESSAGE", "user", "What is 1+1?", 13),
        ("MESSAGE", "assistant", "2", 14),
        ("LICENSE", "", "MIT # not a comment", 15),
        ("REQUIRES", "", "0.12.0", 16),
        ("ADAPTER", "", "./lora.gguf", 18),
    ]


def test_text_that_would_read_back_differently_is_never_written(tmp_path: Path, monkeypatch):
    """The read-back check catches what the quoting rules might miss: here, no quoting."""
    import mathq.modelfile.write as mf

    monkeypatch.setattr(mf, "_quote", lambda value, what, triple=False: value)
    recipe = load_recipe("deepseek-math-7b-rl")
    with pytest.raises(ModelfileError) as info:
        write_modelfiles(recipe, tmp_path / "out", tmp_path)
    assert "cannot be written as a Modelfile that Ollama reads back exactly" in str(info.value)
    assert not (tmp_path / "out").exists()
