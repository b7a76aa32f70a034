"""`mathq smoke`: real runs on a tiny GGUF, a real SIGKILL and resume, and the Ollama and
OpenAI-compatible backends against local servers started here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mathq.cli import cli
from mathq.datasets.problems import load_problem_set, select_problems
from mathq.evaluate.summaries import SmokeSummary, load_summary
from mathq.layout import BuildLayout
from mathq.recipes.prompt import render_prompt, stop_strings
from mathq.recipes.recipe import load_recipe
from tests.conftest import FIXTURES
from tests.fake_inference import FakeOllama, FakeOpenAI

RECIPE = "deepseek-math-7b-rl"
PROBLEMS = str(FIXTURES / "math500" / "test.jsonl")


def _layout() -> BuildLayout:
    return BuildLayout.for_model(RECIPE, Path(os.environ["MATHQ_BUILD_DIR"]))


def _place(gguf: Path, quant: str = "BF16") -> BuildLayout:
    layout = _layout()
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.gguf(quant).symlink_to(gguf)
    return layout


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smoke(*args: str) -> object:
    # One llama.cpp thread: spinning workers of a second one slow a busy machine down.
    return CliRunner().invoke(cli, ["smoke", RECIPE, "--suite", PROBLEMS, "--threads", "1",
                                    *args], catch_exceptions=False)


def _chosen(n: int, seed: int = 0):
    return select_problems(load_problem_set(PROBLEMS), n=n, seed=seed).problems


def test_smoke_in_process_writes_results_and_summary(tiny_bf16_gguf: Path) -> None:
    layout = _place(tiny_bf16_gguf)
    result = _smoke("--quant", "BF16", "--n", "8", "--max-tokens", "24", "--parallel", "4")
    assert result.exit_code == 0, result.output
    rows = _lines(layout.smoke_results("BF16"))
    chosen = _chosen(8)
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in chosen)
    for r in rows:
        assert {"id", "subject", "level", "prompt_tokens", "completion", "extracted", "rule",
                "verdict", "completion_tokens", "seconds", "finish_reason"} <= set(r)
        assert 0 < r["completion_tokens"] <= 24 and r["prompt_tokens"] > 20
        assert r["verdict"] in ("correct", "wrong", "no-answer", "timeout")
    s = load_summary(layout.smoke_summary("BF16"), SmokeSummary)
    assert s.accuracy.n == 8 and s.parallel == 4 and s.max_tokens == 24
    assert s.backend == "llama.cpp" and s.gguf == "deepseek-math-7b-rl-BF16.gguf"
    assert s.completion_tokens == sum(r["completion_tokens"] for r in rows)
    assert s.prompt_tokens == sum(r["prompt_tokens"] for r in rows)
    assert s.generation_tokens_per_second and s.generation_tokens_per_second > 0
    assert s.reference_accuracy == 51.7
    assert sum(t.n for t in s.by_subject.values()) == 8
    assert sum(s.verdicts.values()) == 8 and s.runs == 1
    assert 0.0 <= s.accuracy.low <= s.accuracy.value <= s.accuracy.high <= 1.0
    assert result.output.startswith("BF16     ")
    assert "(8 answered)" in result.output

    again = _smoke("--quant", "BF16", "--n", "8", "--max-tokens", "24", "--parallel", "4")
    assert again.exit_code == 0
    assert "(0 answered, 8 resumed)" in again.output
    assert len(_lines(layout.smoke_results("BF16"))) == 8


def test_smoke_takes_a_gguf_path_with_the_recipe_for_its_prompt(tiny_bf16_gguf: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "results"
    args = ["smoke", str(tiny_bf16_gguf), "--recipe", RECIPE, "--suite", PROBLEMS, "--n", "4",
            "--max-tokens", "8", "--threads", "1", "--out-dir", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    name = tiny_bf16_gguf.name.removesuffix(".gguf")
    s = load_summary(out / f"{name}.summary.json", SmokeSummary)
    assert s.quant == name and s.gguf == tiny_bf16_gguf.name and s.accuracy.n == 4
    assert s.environment["llama_cpp_python"] == "0.3.36" and s.environment["threads"] == "1"
    # The recipe's exact prompt was used.
    first = _lines(out / f"{name}.jsonl")[0]
    assert first["prompt_tokens"] > 20
    # Nothing was written into the recipe's build folder.
    assert not _layout().smoke_dir.exists()
    for extra, message in (([], "needs --recipe NAME"),
                           (["--recipe", RECIPE, "--quant", "Q8_0"], "a GGUF path is one file"),
                           (["--recipe", RECIPE, "--ollama", "http://127.0.0.1:9"],
                            "run by llama.cpp in process")):
        bad = CliRunner().invoke(cli, ["smoke", str(tiny_bf16_gguf), *extra])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    bad = CliRunner().invoke(cli, ["smoke", RECIPE, "--recipe", RECIPE])
    assert bad.exit_code == 2 and "--recipe is for a GGUF path" in bad.output


def test_sigkill_then_rerun_finishes_without_redoing(tiny_bf16_gguf: Path) -> None:
    """A real SIGKILL mid-run, plus a half-written last line; the rerun keeps every
    finished problem, answers only the rest, and counts each problem once."""
    layout = _place(tiny_bf16_gguf)
    results = layout.smoke_results("BF16")
    n = 12
    argv = [sys.executable, "-c", "from mathq.cli import main; main()", "smoke", RECIPE,
            "--suite", PROBLEMS, "--quant", "BF16", "--n", str(n), "--max-tokens", "120",
            "--parallel", "1", "--threads", "1", "--quiet"]
    proc = subprocess.Popen(argv, env=os.environ.copy(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = _lines(results)
    assert 3 <= len(before) < n
    with open(results, "a") as f:  # as if the kill had come in the middle of a write
        f.write('{"id": "half-written", "answer": "1", "compl')

    result = _smoke("--quant", "BF16", "--n", str(n), "--max-tokens", "120", "--parallel", "2")
    assert result.exit_code == 0, result.output
    assert f"({n - len(before)} answered, {len(before)} resumed)" in result.output
    after = _lines(results)
    ids = [r["id"] for r in after]
    assert len(ids) == len(set(ids)) == n
    assert after[:len(before)] == before  # finished problems were not redone
    assert len({r["run"] for r in after}) == 2
    s = load_summary(layout.smoke_summary("BF16"), SmokeSummary)
    assert s.accuracy.n == n and s.runs == 2
    assert s.completion_tokens == sum(r["completion_tokens"] for r in after)


def test_rerun_with_other_settings_is_refused(tiny_bf16_gguf: Path) -> None:
    _place(tiny_bf16_gguf)
    assert _smoke("--quant", "BF16", "--n", "2", "--max-tokens", "8").exit_code == 0
    result = _smoke("--quant", "BF16", "--n", "2", "--max-tokens", "9")
    assert result.exit_code == 1
    where = _layout().smoke_dir
    assert result.output == (f"Error: results in {where} were made with other settings "
                             "(max_tokens: 8 -> 9) (pass --restart to discard them, or "
                             "--out-dir to keep both)\n")
    fresh = _smoke("--quant", "BF16", "--n", "2", "--max-tokens", "9", "--restart")
    assert fresh.exit_code == 0 and "(2 answered)" in fresh.output


def test_missing_gguf_names_the_fix() -> None:
    result = _smoke("--quant", "Q4_K_M", "--n", "2")
    assert result.exit_code == 1
    assert result.output == (f"Error: no Q4_K_M GGUF at {_layout().gguf('Q4_K_M')} (make it "
                             "first: mathq quantize deepseek-math-7b-rl --quant Q4_K_M)\n")


def _grader_answers(problems) -> tuple[dict[str, tuple[int, str]], int]:
    """Answer even-numbered problems right and odd ones wrong; return the table and the
    expected number of correct answers."""
    table = {p.problem: (i, p.answer) for i, p in enumerate(problems)}
    return table, sum(1 for i in range(len(problems)) if i % 2 == 0)


def _answer_for(table: dict[str, tuple[int, str]]):
    def answer(text: str) -> str:
        for problem, (i, gold) in table.items():
            if problem in text:
                boxed = gold if i % 2 == 0 else "-99991"
                return f"We compute carefully. The answer is $\\boxed{{{boxed}}}$. User: again"
        return "no idea"
    return answer


def test_openai_backend_sends_exact_prompt_and_grades() -> None:
    chosen = _chosen(6)
    table, expected = _grader_answers(chosen)
    spec = load_recipe(RECIPE).prompt
    with FakeOpenAI(_answer_for(table), model="served-rl") as server:
        result = _smoke("--quant", "Q4_K_M", "--n", "6", "--max-tokens", "64",
                        "--endpoint", server.url, "--parallel", "3")
        assert result.exit_code == 0, result.output
        bodies = server.requests
    assert len(bodies) == 6
    by_prompt = {b["prompt"]: b for b in bodies}
    for p in chosen:
        body = by_prompt[render_prompt(spec, p.problem)]
        assert body["model"] == "served-rl" and body["temperature"] == 0
        assert body["max_tokens"] == 64 and body["stop"] == list(stop_strings(spec))
    layout = _layout()
    rows = _lines(layout.smoke_results("Q4_K_M"))
    assert all("User:" not in r["completion"] for r in rows)
    assert sum(r["verdict"] == "correct" for r in rows) == expected
    s = load_summary(layout.smoke_summary("Q4_K_M"), SmokeSummary)
    assert s.accuracy.k == expected and s.accuracy.n == 6
    assert s.backend == f"openai {server.url}" and s.gguf == "served-rl"


def test_openai_backend_spreads_requests_over_endpoints() -> None:
    chosen = _chosen(10)
    table, expected = _grader_answers(chosen)
    with FakeOpenAI(_answer_for(table), delay_s=0.1) as a, \
            FakeOpenAI(_answer_for(table), delay_s=0.1) as b:
        result = _smoke("--quant", "Q4_K_M", "--n", "10", "--endpoint", a.url,
                        "--endpoint", b.url, "--parallel", "2")
        assert result.exit_code == 0, result.output
        assert len(a.requests) + len(b.requests) == 10
        assert a.requests and b.requests
        assert a.max_in_flight <= 2 and b.max_in_flight <= 2
        assert max(a.max_in_flight, b.max_in_flight) == 2
    rows = _lines(_layout().smoke_results("Q4_K_M"))
    assert sorted(r["id"] for r in rows) == sorted(p.id for p in chosen)
    assert sum(r["verdict"] == "correct" for r in rows) == expected


@pytest.mark.parametrize(("option", "where", "hint"), [
    ("--endpoint", "http://127.0.0.1:9/v1/models", "start the server, or check --endpoint"),
    ("--ollama", "Ollama at http://127.0.0.1:9", "start it (`ollama serve`), or check --ollama"),
])
def test_server_unreachable(option: str, where: str, hint: str) -> None:
    result = _smoke("--quant", "Q4_K_M", "--n", "2", option, "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: cannot reach {where}: ")
    assert result.output.endswith(f"({hint})\n")


def test_ollama_backend_sends_bare_question() -> None:
    chosen = _chosen(6)
    table, expected = _grader_answers(chosen)
    with FakeOllama(_answer_for(table), models=(f"{RECIPE}:latest",)) as server:
        result = _smoke("--quant", "Q4_K_M", "--n", "6", "--max-tokens", "50",
                        "--ollama", server.url, "--parallel", "2")
        assert result.exit_code == 0, result.output
        bodies = server.requests
    questions = {p.problem for p in chosen}
    assert {b["messages"][0]["content"] for b in bodies} == questions
    for b in bodies:
        assert b["model"] == f"{RECIPE}:latest" and b["stream"] is True
        assert b["messages"] == [{"role": "user", "content": b["messages"][0]["content"]}]
        assert b["options"] == {"temperature": 0, "num_predict": 50}
    rows = _lines(_layout().smoke_results("Q4_K_M"))
    assert sum(r["verdict"] == "correct" for r in rows) == expected
    assert all(r["completion_tokens"] and r["finish_reason"] == "stop" for r in rows)
    s = load_summary(_layout().smoke_summary("Q4_K_M"), SmokeSummary)
    assert s.backend == f"ollama {server.url}" and s.gguf == f"{RECIPE}:latest"
    assert s.accuracy.k == expected


def test_ollama_unknown_tag() -> None:
    with FakeOllama(lambda q: "x", models=("other:latest",)) as server:
        result = _smoke("--quant", "Q8_0", "--n", "2", "--ollama", server.url)
    assert result.exit_code == 1
    assert result.output == (f"Error: Ollama at {server.url} has no model {RECIPE}:Q8 "
                             "(create the tag first (`mathq publish`, or `ollama create`), "
                             "or pass --served-model)\n")


def test_backends_are_exclusive() -> None:
    result = _smoke("--ollama", "http://a:1", "--endpoint", "http://b:2")
    assert result.exit_code == 2
    assert "Error: --ollama and --endpoint are different backends; give one" in result.output


@pytest.mark.parametrize("tail", [b'{"id": "x", "answer": "1", "comp', b"\xff\xfe"])
def test_results_log_repairs_torn_last_line(tmp_path: Path, tail: bytes) -> None:
    from mathq.evaluate.grading.grade import ProblemResult
    from mathq.evaluate.results_log import append_result, read_results_log

    path = tmp_path / "r.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        append_result(f, ProblemResult(id="a", answer="1", completion="\\boxed{1}"))
        append_result(f, ProblemResult(id="b", answer="2", completion="3"))
    good = path.read_bytes()
    path.write_bytes(good + tail)
    assert sorted(read_results_log(path)) == ["a", "b"]
    assert path.read_bytes() == good
    # A whole record that lost only its newline is kept, and the newline restored.
    path.write_bytes(good + b'{"id": "c", "answer": "3", "completion": "x"}')
    assert sorted(read_results_log(path)) == ["a", "b", "c"]
    assert path.read_bytes().endswith(b'"x"}\n')


def test_results_log_refuses_damage_in_the_middle(tmp_path: Path) -> None:
    from mathq.errors import ProblemSetError
    from mathq.evaluate.results_log import read_results_log

    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a", "answer": "1", "completion": ""}\nnot json\n'
                    '{"id": "b", "answer": "1", "completion": ""}\n')
    with pytest.raises(ProblemSetError, match=r"r.jsonl:2: damaged results line"):
        read_results_log(path)
    # A whole record with a bad field: its own error, naming the file and line once.
    path.write_text('{"id": "a", "answer": "1", "completion": ""}\n'
                    '{"id": "b", "answer": "1", "completion": "", "completion_ids": [1.5]}\n'
                    '{"id": "c", "answer": "1", "completion": ""}\n')
    with pytest.raises(ProblemSetError) as err:
        read_results_log(path)
    assert str(err.value) == (f"{path}:2: field 'completion_ids' holds 1.5 at position 0; "
                              "token ids are whole numbers from 0 (pass --restart to discard "
                              "these results)")


def test_wilson_interval() -> None:
    from mathq.evaluate.summaries import wilson_rate

    r = wilson_rate(46, 100)
    assert (r.k, r.n, r.value) == (46, 100, 0.46)
    assert r.low == pytest.approx(0.3656, abs=1e-4)
    assert r.high == pytest.approx(0.5573, abs=1e-4)
    zero = wilson_rate(0, 10)
    assert zero.low == 0.0 and zero.high == pytest.approx(0.2775, abs=1e-4)


def test_ollama_model_names() -> None:
    from mathq.errors import SmokeError
    from mathq.evaluate.smoke import ollama_model_name

    recipe = load_recipe(RECIPE)
    assert ollama_model_name(recipe, "Q4_K_M") == f"{RECIPE}:latest"
    assert ollama_model_name(recipe, "Q6_K", "me/rl") == "me/rl:Q6"
    assert ollama_model_name(recipe, "Q6_K", "me/rl:mine") == "me/rl:mine"
    assert ollama_model_name(recipe, "Q6_K", "host:11434/me/rl") == "host:11434/me/rl:Q6"
    with pytest.raises(SmokeError, match="has no Ollama tag for IQ2_XS"):
        ollama_model_name(recipe, "IQ2_XS")
