"""The Ollama templates, rendered by Go's own text/template, equal DeepSeek's chat template.

For every prompt spec (the three bundled recipes, as committed in modelfiles/, and variants
that switch the suffix language, the suffix and the system policy) and every conversation
in the table, three renderings must agree byte for byte:

- Go: tests/gotemplate (stdlib text/template, Ollama's message merging) over the TEMPLATE
  that the validator reads out of the Modelfile text;
- Hugging Face: the ``chat_template`` of tokenizer_config.json rendered with jinja2 the way
  transformers does, BOS removed (the tokenizer adds it), the CoT suffix appended to each
  user message, system messages dropped when the recipe says so, and a final assistant
  message continued (transformers' ``continue_final_message``) as Ollama does;
- Python: :func:`mathq.recipes.prompt.render_chat`, which the smoke test uses.

The base model has no chat template; its few-shot prompt is checked against DeepSeek's own
evaluation format instead.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mathq.modelfile.check import parse_modelfile
from mathq.modelfile.options import parse_go_bool, parse_go_float32, parse_go_int64
from mathq.modelfile.templatesyntax import (
    TemplateSyntaxError,
    ollama_template_problem,
    parse_template,
)
from mathq.modelfile.write import render_modelfile
from mathq.recipes.prompt import BOS, ChatMessage, few_shot_preamble, render_chat, render_prompt
from mathq.recipes.recipe import load_recipe
from tests.conftest import FIXTURES

REPO = Path(__file__).resolve().parent.parent
HARNESS = Path(__file__).resolve().parent / "gotemplate"
TOKENIZER_CONFIG = json.loads(
    (FIXTURES / "deepseek-llm-tokenizer" / "tokenizer_config.json").read_text("utf-8"))


@pytest.fixture(scope="session")
def go_render(tmp_path_factory: pytest.TempPathFactory):
    """Build the Go harness once; return a function rendering (template, messages)."""
    go = shutil.which("go")
    if go is None:
        message = "Go is not installed; `apt-get install golang-go` (CI installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: the Go template checks must run in CI")
        pytest.skip(message)
    tmp = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GOCACHE": str(tmp / "cache"), "GOPATH": str(tmp / "gopath"),
           "GOENV": "off", "GOPROXY": "off", "GOTOOLCHAIN": "local", "CGO_ENABLED": "0"}
    binary = tmp / "gotemplate"
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=HARNESS, env=env, check=True)

    def run(template: str | None, messages=(), mode: list[str] | None = None,
            payload: object = None) -> subprocess.CompletedProcess:
        data = payload if payload is not None else {
            "template": template,
            "messages": [{"role": m.role, "content": m.content} for m in messages]}
        return subprocess.run([str(binary), *(mode or [])], input=json.dumps(data).encode(),
                              capture_output=True, check=False)

    return run


def render_go(go_render, template: str, messages) -> str:
    result = go_render(template, messages)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode("utf-8")


def ollama_merge(messages: list[ChatMessage]) -> list[ChatMessage]:
    """What Ollama hands a template: runs of one role merged with a blank line (not tool)."""
    out: list[ChatMessage] = []
    for m in messages:
        if out and out[-1].role == m.role and m.role != "tool":
            out[-1] = ChatMessage(m.role, out[-1].content + "\n\n" + m.content)
        else:
            out.append(m)
    return out


def hf_reference(spec, messages: list[ChatMessage]) -> str:
    """DeepSeek's Jinja chat template, rendered as transformers renders it, minus BOS."""
    suffix = {"en": "\nPlease reason step by step, and put your final answer within "
                    "\\boxed{}.",
              "zh": "\n请通过逐步推理来解答问题，并把最终答案放置于\\boxed{}中。",
              "none": ""}[spec.cot_suffix] if spec.append_cot_suffix else ""
    roles = {"user", "assistant"} | ({"system"} if spec.system_prompt == "allow" else set())
    chat = [{"role": m.role, "content": m.content + (suffix if m.role == "user" else "")}
            for m in ollama_merge(messages) if m.role in roles]
    continue_final = bool(chat) and chat[-1]["role"] == "assistant"
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    text = env.from_string(TOKENIZER_CONFIG["chat_template"]).render(
        messages=chat, add_generation_prompt=not continue_final,
        bos_token=TOKENIZER_CONFIG["bos_token"], eos_token=TOKENIZER_CONFIG["eos_token"])
    assert text.startswith(BOS) and BOS not in text[len(BOS):]
    text = text[len(BOS):]
    if continue_final:  # cut after the final message's text, as transformers does
        final = chat[-1]["content"]
        text = text[:text.rindex(final) + len(final)]
    return text


def msgs(*pairs: str) -> list[ChatMessage]:
    return [ChatMessage(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]


MATH500 = [json.loads(line) for line in
           (FIXTURES / "math500" / "test.jsonl").read_text("utf-8").splitlines()]
BRACES = next(p["problem"] for p in MATH500 if "{{" in p["problem"])
Q1 = MATH500[0]["problem"]
TRICKY = 'Quote """ and {{ .Content }} and {{- end }} and \\boxed{x} and "x"\n  tail  '

CONVERSATIONS = {
    "one turn": msgs("user", Q1),
    "one turn, {{ in the problem": msgs("user", BRACES),
    "template syntax and quotes in content": msgs("user", TRICKY),
    "two turns": msgs("user", Q1, "assistant", "The answer is $\\boxed{3}$.", "user",
                      "Why?"),
    "three turns ending on the assistant": msgs(
        "user", "1+1?", "assistant", "2", "user", "2+2?", "assistant", "It is"),
    "assistant prefill": msgs("user", Q1, "assistant", "We start by"),
    "system first": msgs("system", "You are terse.", "user", Q1),
    "system mid-conversation": msgs("user", "1+1?", "assistant", "2", "system", "Be brief.",
                                    "user", "3+3?"),
    "system after the last reply": msgs("user", "1+1?", "assistant", "2", "system", "Hi."),
    "system only": msgs("system", "You are terse."),
    "two system messages merged": msgs("system", "A.", "system", "B.", "user", "1+1?"),
    "two user messages merged": msgs("user", "Solve for x:", "user", "$x+1=2$"),
    "two assistant messages merged": msgs("user", "1+1?", "assistant", "Two.",
                                          "assistant", "So 2."),
    "tool message is not rendered": msgs("user", "1+1?", "assistant", "2", "tool", "{}",
                                         "user", "Sure?"),
    "Chinese": msgs("user", "计算 $1+2+\\cdots+100$ 的值。"),
    "Chinese, two turns": msgs("user", "求 $2^{10}$。", "assistant", "$1024$", "user",
                               "为什么？"),
    "empty conversation": [],
}


def chat_specs():
    """The bundled chat recipes as committed, and variants of every setting."""
    rl = load_recipe("deepseek-math-7b-rl")
    yield "deepseek-math-7b-instruct (committed)", load_recipe("deepseek-math-7b-instruct")
    yield "deepseek-math-7b-rl (committed)", rl
    yield "zh suffix", replace(rl, prompt=replace(rl.prompt, cot_suffix="zh"))
    yield "no suffix", replace(rl, prompt=replace(rl.prompt, append_cot_suffix=False))
    yield "system allowed", replace(rl, prompt=replace(rl.prompt, system_prompt="allow"))
    yield "zh suffix, system allowed", replace(rl, prompt=replace(
        rl.prompt, cot_suffix="zh", system_prompt="allow"))


def modelfile_template(recipe, committed: bool) -> str:
    """The TEMPLATE as Ollama's parser reads it out of the Modelfile text."""
    if committed:
        text = (REPO / "modelfiles" / recipe.ollama.model / "latest.Modelfile").read_text(
            "utf-8")
    else:
        text = render_modelfile(recipe, "latest", "Q4_K_M", "model.gguf")
    templates = parse_modelfile(text).values("TEMPLATE")
    assert len(templates) == 1
    return templates[0]


@pytest.mark.parametrize("spec_name,recipe", list(chat_specs()))
def test_chat_template_equals_deepseeks_for_every_conversation(go_render, spec_name, recipe):
    template = modelfile_template(recipe, committed="committed" in spec_name)
    mismatches = []
    for name, conversation in CONVERSATIONS.items():
        expected = hf_reference(recipe.prompt, conversation)
        python = render_chat(recipe.prompt, ollama_merge(conversation))
        go = render_go(go_render, template, conversation)
        if not go == python == expected:
            mismatches.append((name, expected, python, go))
    assert not mismatches, mismatches[0]


def test_the_table_covers_what_the_rules_distinguish():
    rl = load_recipe("deepseek-math-7b-rl").prompt
    rendered = {name: hf_reference(rl, c) for name, c in CONVERSATIONS.items()}
    assert rendered["one turn"].endswith("\n\nAssistant:")
    assert rendered["assistant prefill"].endswith("Assistant: We start by")
    assert rendered["two turns"].count("<｜end▁of▁sentence｜>User:") == 1
    assert "You are terse" not in rendered["system first"]
    allow = replace(rl, system_prompt="allow")
    assert hf_reference(allow, CONVERSATIONS["system first"]).startswith("You are terse.\n\n")
    assert rendered["two user messages merged"].count("User: ") == 1
    assert rendered["empty conversation"] == "Assistant:"


def test_single_question_prompt_is_deepseeks_evaluation_prompt():
    """render_prompt (the smoke test's prompt) is DeepSeek's chat prompt for MATH-500."""
    for variant in ("instruct", "rl"):
        spec = load_recipe(f"deepseek-math-7b-{variant}").prompt
        for problem in MATH500[:50]:
            question = problem["problem"]
            assert render_prompt(spec, question) == hf_reference(spec, msgs("user", question))
            assert render_prompt(spec, question) == (
                f"User: {question}\nPlease reason step by step, and put your final answer "
                "within \\boxed{}.\n\nAssistant:")


# DeepSeek's few_shot_prompt string (evaluation/few_shot_prompts/cot_minerva_math_4_shot.py):
# its length in characters and SHA-256 of its UTF-8 bytes.
DEEPSEEK_MINERVA_PROMPT = (1791, "4743061e8393cca1dcd805138b1ab15f0d72844392f2cc5aae511e978cced3a3")


def deepseek_few_shot(question: str) -> str:
    """DeepSeek's MinervaMathPrompt.format_prompt(question, '')."""
    return f"{few_shot_preamble(4)}\n\nProblem:\n{question}\n\nSolution:\n".rstrip()


def test_base_template_reproduces_deepseeks_few_shot_prompt(go_render):
    import hashlib

    preamble = few_shot_preamble(4)
    assert (len(preamble), hashlib.sha256(preamble.encode()).hexdigest()) == \
        DEEPSEEK_MINERVA_PROMPT
    base = load_recipe("deepseek-math-7b-base")
    template = modelfile_template(base, committed=True)
    for problem in [*MATH500[:20], {"problem": BRACES}]:
        question = problem["problem"]
        expected = deepseek_few_shot(question)
        assert render_prompt(base.prompt, question) == expected
        assert render_go(go_render, template, msgs("user", question)) == expected
    for name, conversation in CONVERSATIONS.items():
        python = render_chat(base.prompt, ollama_merge(conversation))
        assert render_go(go_render, template, conversation) == python, name
        assert "You are terse" not in python and "Please reason" not in python


def test_harness_refuses_a_template_ollama_would_render_in_legacy_mode(go_render):
    result = go_render("{{ .Prompt }}", msgs("user", "hi"))
    assert result.returncode == 1
    assert b"never uses .Messages" in result.stderr


def test_value_parsing_matches_gos_strconv(go_render):
    """The validator's reading of PARAMETER values agrees with Go's strconv, case by case."""
    values = {
        "int": ["4096", "+4096", "-1", "007", "4096.0", "1_000", "0x10", "", " 1", "1 ",
                "9223372036854775807", "9223372036854775808", "-9223372036854775808",
                "-9223372036854775809", "٣", "1e3"],
        "float": ["0", "0.0", "-0", ".5", "5.", "+.5e+3", "1E5", "1e", ".", "1_000.5",
                  "1__0", "_1", "1_", "1_.5", "1e1_0", "1e_5", "0x1p-2", "0x1.8p3",
                  "0x_1p0", "0x1", "0x.8p1", "0x1.p1", "-0x1p0", "inf", "+Inf", "-INF",
                  "Infinity", "infinit", "nan", "NaN", "+nan", "in", "1e40", "3.5e38",
                  "3.4028235e38", "3.4028236e38", "1e-50", "0 # greedy", "0.8 ", "١"],
        "bool": ["true", "True", "TRUE", "t", "T", "1", "0", "f", "F", "false", "False",
                 "FALSE", "yes", "tRue", "fAlse", "", "on"],
    }
    result = go_render(None, mode=["strconv"], payload=values)
    assert result.returncode == 0, result.stderr.decode()
    go = json.loads(result.stdout)
    ours = {
        "int": [parse_go_int64(v) is not None for v in values["int"]],
        "float": [parse_go_float32(v) is not None for v in values["float"]],
        "bool": [parse_go_bool(v) is not None for v in values["bool"]],
    }
    for kind, texts in values.items():
        wrong = [t for t, a, b in zip_longest(texts, go[kind], ours[kind]) if a != b]
        assert not wrong, (kind, wrong)


def test_llama_cpp_reads_the_prompt_with_one_bos_and_eos_as_a_token():
    """Tokenized as Ollama's runner does (BOS added, special tokens parsed), the rendered
    prompt starts with exactly one BOS and each closed reply ends with the EOS token."""
    import llama_cpp

    vocab = FIXTURES / "deepseek-llm-tokenizer" / "ggml-vocab-deepseek-llm.gguf"
    llm = llama_cpp.Llama(model_path=str(vocab), vocab_only=True, verbose=False)
    bos, eos = llm.token_bos(), llm.token_eos()
    rl = load_recipe("deepseek-math-7b-rl").prompt
    text = render_chat(rl, CONVERSATIONS["three turns ending on the assistant"])
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    assert tokens[0] == bos and tokens.count(bos) == 1
    assert tokens.count(eos) == 1
    at = tokens.index(eos)
    assert llm.detokenize(tokens[at + 1:at + 3]).decode() == "User:"


# Templates Go's parser accepts and refuses: every block keyword, missing and extra ends,
# unclosed actions, comments, strings and parentheses, undefined functions and variables,
# declarations, trim markers, literals of every kind, errors on later lines.
PARSE_TABLE = [
    '{{ if .X }}a', '{{ .Content ', '{{ foo }}', '{{ end }}', 'ok {{ json .X }}',
    '{{ if .X }}a{{ else }}b{{ end }}', '{{ if .X }}a{{ else if .Y }}b{{ else }}c{{ end }}',
    '{{ range $i, $m := .Messages }}{{ $i }}{{ $m.Role }}{{ end }}',
    '{{ range $i, $m, $k := .Messages }}{{ end }}', '{{ $x := 1 }}{{ $x }}', '{{ $y }}',
    '{{ with .X }}{{ . }}{{ else }}none{{ end }}', '{{ break }}',
    '{{ range .X }}{{ break }}{{ end }}', '{{ range .X }}{{ continue }}{{ end }}',
    '{{ if .X }}{{ break }}{{ end }}', '{{/* comment */}}', '{{/* comment */ .X }}',
    '{{/* unclosed', '{{- .X -}}', '{{-.X}}', '{{ -3 }}', '{{ .X | printf "%s" }}',
    '{{ .X | 3 }}', '{{ "a" | len }}', '{{ }}', '{{ ( .X }}', '{{ .X ) }}', '{{ (.X).Y }}',
    '{{ "abc".Y }}', '{{ 3.Y }}', '{{ nil }}', '{{ .X.Y.Z }}', '{{ $.X }}', '{{ $ }}',
    '{{ "unterminated }}', '{{ `raw\nstring` }}', '{{ `raw }}', "{{ 'a' }}", "{{ 'ab' }}",
    "{{ '' }}", '{{ 0x1F }}', '{{ 1e10 }}', '{{ 1_000 }}', '{{ 0x }}', '{{ 1.2.3 }}',
    '{{ 99999999999999999999 }}', '{{ 1+2i }}', '{{ "\\q" }}', '{{ "\\u00e9" }}',
    '{{ define "x" }}hi{{ end }}{{ template "x" . }}',
    '{{ define "x" }}hi{{ end }}{{ define "x" }}ho{{ end }}', '{{ block "b" . }}body{{ end }}',
    '{{ template x }}', '{{ template "x" }}', '{{ if }}{{ end }}', '{{ range }}{{ end }}',
    '{{ else }}', '{{ if .X }}{{ else }}{{ else }}{{ end }}',
    '{{ if .X }}\n\n{{ end }}\n{{ end }}', 'line1\nline2\n{{ if .X }}\nline4\n',
    'a\n{{ .X\n  .Y }}\n', 'a\n{{ .X\n', '{{ .X := 1 }}', '{{ $x = 2 }}',
    '{{ $x := 1 }}{{ $x = 2 }}', '{{ if .X }}{{ $v := 1 }}{{ end }}{{ $v }}',
    '{{ eq .Role "user" }}', '{{ and .A .B }}', '{{ slice .Messages 1 }}', '{{ index .M 0 }}',
    '{{ currentDate }}', '{{ yesterdayDate }}', '{{ toTypeScriptType .X }}', '{{ toJson .X }}',
    '{{ .X | foo }}', '{{ .X @ }}', '{{ .Xé }}', '{{ .Xé }}', '{{ .X!}}', '{{ $x:=1 }}',
    '{{ $x : 1 }}', '{{ if .X -}}\n a {{- end }}', '{{ .X }}}', '{{{ .X }}', '}}', '{{', '{{-',
    '{{- }}', '{{ - }}', '{{ range $i := .X }}{{ end }}', '{{ range $i, := .X }}{{ end }}',
    '{{ with $x := .X }}{{ $x }}{{ end }}{{ $x }}', '{{ define "a" }}{{ end }}',
    '{{ if .X }}{{ define "a" }}{{ end }}{{ end }}', '{{ .X, }}', '{{ (.X | len) }}', '{{ (1) }}',
    '{{ true.X }}', '{{ .X true false }}', '{{ len (slice .M 1 2) }}', 'é{{ .X }}\n{{ .Y ',
    '{{ print 1 2 | printf "%d" | len }}', '{{ if .X }}a{{ else if }}{{ end }}',
    '{{ else if .X }}', '{{ range .X }}{{ else }}empty{{ end }}',
    '{{ range .X }}{{ else }}{{ break }}{{ end }}', '{{/* a */}}{{/* b */ }}', '{{/*a*/}}',
    '{{- /* a */ -}}', '{{ .X }}{{/* x */}}{{ end', '{{ "\\x4" }}', "{{ '\\n' }}", '{{ 0b101 }}',
    '{{ 0o17 }}', '{{ 08 }}', '{{ 0777 }}', '{{ .1 }}', '{{ . }}', '{{ .. }}', '{{ $.. }}',
    '{{ $x.y }}', '{{ -.5 }}', '{{ +1 }}', '{{ 1i }}', '{{ 0x1p4 }}', '{{ 0x1.8 }}',
]


def mathq_parse(template: str) -> str:
    """mathq's verdict in Go's words: "" when accepted, else Go's error text."""
    try:
        parse_template(template)
    except TemplateSyntaxError as e:
        return f"template: :{e.line}: {e.message}"
    return ""


def go_parse(go_render, templates: list[str]) -> list[str]:
    result = go_render(None, mode=["parse"], payload=templates)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_template_parser_agrees_with_gos_on_the_table(go_render):
    """Go's text/template (with Ollama's functions) and mathq accept and refuse the same
    templates, with the same message at the same line."""
    go = go_parse(go_render, PARSE_TABLE)
    assert sum(not g for g in go) >= 40 and sum(bool(g) for g in go) >= 60
    wrong = [(t, g, m) for t, g in zip(PARSE_TABLE, go, strict=True)
             if (m := mathq_parse(t)) != g]
    assert not wrong, wrong


FRAGMENTS = ["{{", "}}", "{{-", "-}}", " ", "\n", "if", "else", "end", "range", "with", "define",
             "block", "template", "break", "continue", ".X", ".Messages", "$i", "$m", ":=", "=",
             ",", "|", "(", ")", '"s"', "`r`", "'c'", "1", "-2", "0x1", "1.5", "eq", "len",
             "json", "foo", "nil", "true", ".", "$", "/*", "*/", "text", '"', "`", "'",
             "{{ end }}", "{{ if .X }}", "{{ range $i, $m := .Messages }}", "{{ else }}",
             "{{/* c */}}", "{{ .Content }}", "{{ $x := 1 }}", "{{ $x }}", "é", "\t",
             "{{ else if .Y }}", '{{ define "d" }}', '{{ template "d" . }}']


def test_template_parser_agrees_with_gos_on_random_templates(go_render):
    """2,000 seeded random splices of template fragments: same verdict, line and message.
    ({{else with}} is left out: Go accepts it from 1.23 on, as Ollama's build does.)"""
    rng = random.Random(16)
    templates = []
    while len(templates) < 2000:
        t = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 14)))
        if "with" not in t:
            templates.append(t)
    go = go_parse(go_render, templates)
    assert 400 < sum(not g for g in go) < 1600  # both verdicts well represented
    wrong = [(t, g, m) for t, g in zip(templates, go, strict=True)
             if (m := mathq_parse(t)) != g]
    assert not wrong, wrong[:5]


def test_else_with_and_ollamas_own_refusals():
    """{{else with}} parses (Go 1.23+, which Ollama is built with); Ollama additionally
    refuses {{template}} without a pipeline; Ollama's functions are defined, others not."""
    parse_template("{{ with .X }}a{{ else with .Y }}b{{ else }}c{{ end }}")
    assert ollama_template_problem('{{ define "t" }}x{{ end }}\n{{ template "t" }}')[0] == 2
    assert ollama_template_problem('{{ define "t" }}x{{ end }}{{ template "t" . }}') is None
    for name in ("json .X", "currentDate", "yesterdayDate", "toTypeScriptType .X", "slice .M 1"):
        assert ollama_template_problem("{{ " + name + " }}") is None
    assert ollama_template_problem("{{ toJson .X }}") == (1, 'function "toJson" not defined')
