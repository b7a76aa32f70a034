"""The prompt formats of :mod:`mathq.recipes.prompt`, written as Ollama templates (Go
``text/template``).

Ollama renders a model's TEMPLATE over ``.Messages`` after merging consecutive messages of
one role; a conversation that ends on an assistant message is continued, not closed. The
templates here follow the rules of :func:`mathq.recipes.prompt.render_chat` line for line, and the
test suite runs them through Go's own ``text/template`` to prove the output is identical.

Every piece of literal text goes into a Go string literal (``{{ "..." }}``), never into raw
template text: literals are immune to ``{{`` in the text, to whitespace trimming by
``{{-``, and (with escapes for anything unprintable) to Ollama's Modelfile parser, which
silently drops unprintable characters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mathq.recipes.prompt import EOS, check_prompt_spec, few_shot_preamble, user_suffix

if TYPE_CHECKING:
    from mathq.recipes.prompt import PromptSpec

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def go_string(text: str) -> str:
    """``text`` as a Go interpreted string literal that parses back to exactly ``text``."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _lit(text: str) -> str:
    """An action that prints ``text``; empty text prints nothing and needs no action."""
    return "{{ " + go_string(text) + " }}" if text else ""


def _lines(text: str) -> list[str]:
    """Template lines printing ``text``, one source line each, so a reader sees its shape."""
    parts = text.split("\n")
    return ["{{- " + go_string(p + ("\n" if i < len(parts) - 1 else "")) + " }}"
            for i, p in enumerate(parts) if p or i < len(parts) - 1]


def go_template(spec: PromptSpec) -> str:
    """The Ollama TEMPLATE for a prompt spec: no leading or trailing whitespace, no BOS."""
    check_prompt_spec(spec)
    suffix = _lit(user_suffix(spec))
    if spec.template == "few-shot":
        lines = [
            *_lines(few_shot_preamble(spec.few_shot)),
            "{{- range .Messages }}",
            '{{- if eq .Role "user" }}',
            '{{- "\\n\\nProblem:\\n" }}{{ .Content }}' + suffix + '{{ "\\n\\nSolution:" }}',
            '{{- else if eq .Role "assistant" }}',
            '{{- "\\n" }}{{ .Content }}',
            "{{- end }}",
            "{{- end }}",
        ]
        return "\n".join(lines)
    close_reply = '{{- if eq $prev "assistant" }}' + _lit(EOS) + "{{ end }}"
    lines = [
        # $prev is the role of the last message rendered so far: a reply is closed with
        # EOS only when something follows it, so a final assistant message stays open.
        '{{- $prev := "" }}',
        "{{- range .Messages }}",
        '{{- if eq .Role "user" }}',
        close_reply,
        '{{- "User: " }}{{ .Content }}' + suffix + '{{ "\\n\\n" }}',
        '{{- $prev = "user" }}',
        '{{- else if eq .Role "assistant" }}',
        close_reply,
        '{{- "Assistant: " }}{{ .Content }}',
        '{{- $prev = "assistant" }}',
    ]
    if spec.system_prompt == "allow":
        lines += [
            '{{- else if eq .Role "system" }}',
            close_reply,
            '{{- .Content }}{{ "\\n\\n" }}',
            '{{- $prev = "system" }}',
        ]
    lines += [
        "{{- end }}",
        "{{- end }}",
        '{{- if ne $prev "assistant" }}{{ "Assistant:" }}{{ end }}',
    ]
    return "\n".join(lines)
