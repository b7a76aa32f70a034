"""Find the final answer in a model's output, in DeepSeek-Math's evaluation order.

DeepSeek's own scorer (``evaluation/data_processing/answer_extraction.py`` in
deepseek-ai/DeepSeek-Math) tries, in order: the few-shot format "The final answer is
$...$", the ``\\boxed{...}`` answers, "The answer is ...", and as a last resort the last
number in the text. mathq follows that order, and adds what chat outputs need: a
brace-matched ``\\boxed`` (nested fractions and sets survive), ``\\boxed 5`` and
``\\fbox{}``, truncated boxes ignored rather than half-read, and the answers a model gives
under the Chinese chain-of-thought suffix ("答案是 ..."). Every extraction records which
rule fired, so a report can say how many answers were boxed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mathq.datasets.problems import BOX_RE, find_boxed, match_brace

#: Rule names, in the order they are tried, with what each matches.
RULES: tuple[tuple[str, str], ...] = (
    ("final-answer", "'The final answer is $...$' (the Minerva few-shot format)"),
    ("boxed", "the last \\boxed{...} (also \\boxed 5 and \\fbox{...})"),
    ("answer-is", "'The answer is ...'"),
    ("answer-is-zh", "'答案是 ...' / '答案为 ...' (answers to the Chinese prompt)"),
    ("last-number", "the last number in the text (fallback)"),
    ("none", "nothing that looks like an answer"),
)
RULE_NAMES = tuple(name for name, _ in RULES)


@dataclass(frozen=True)
class Extraction:
    """The answer found in a completion, and how.

    ``answer`` is None when no rule fired (``rule == "none"``). ``boxed`` holds every
    complete boxed answer in order; graders use it when a model boxes each of several
    answers separately ("x = \\boxed{2} or x = \\boxed{3}").
    """

    answer: str | None
    rule: str
    boxed: tuple[str, ...] = ()


_FINAL_RE = re.compile(r"final answer is\s*:?\s*(?=\$)", re.IGNORECASE)
_ANSWER_IS_RE = re.compile(r"\banswer is\b\s*:?\s*", re.IGNORECASE)
_ANSWER_ZH_RE = re.compile(r"(?:最终)?答案\s*(?:是|为|應為|应为|：|:)\s*[:：]?\s*")
_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d])|-?\d+(?:\.\d+)?|-?\.\d+")
# A whole run of whitespace (never entered midway, so each run is scanned once) before
# the start of a new exemplar.
_FEW_SHOT_STOPS = re.compile(r"(?<!\s)\s+(?=Problem:|Q: |Question:)")
_MATH_OPENERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _math_span(text: str) -> str | None:
    """The content of a ``$...$``/``\\(...\\)``/``\\[...\\]`` span at the start of ``text``."""
    for opener, closer in _MATH_OPENERS:
        if text.startswith(opener):
            end = text.find(closer, len(opener))
            if end > len(opener):
                return text[len(opener) : end]
            return None
    return None


def _first_math_span(text: str) -> str | None:
    starts = [(text.find(o), o) for o, _ in _MATH_OPENERS if text.find(o) >= 0]
    if not starts:
        return None
    at = min(s for s, _ in starts)
    return _math_span(text[at:])


def _sentence_answer(rest: str, stop: str) -> str:
    """The answer stated after 'the answer is': a math span if the sentence has one,
    else the sentence up to its end."""
    line = rest.strip().split("\n", 1)[0]
    span = _math_span(line)
    if span is not None:
        return span
    end = re.search(stop, line)
    sentence = line[: end.start()] if end else line
    span = _first_math_span(sentence)
    return span if span is not None else sentence


def _whole_span(text: str) -> str | None:
    """The inside of ``text`` if one math span or one box wraps all of it (bar final dots)."""
    for opener, closer in _MATH_OPENERS:
        if text.startswith(opener):
            end = text.find(closer, len(opener))
            if end > len(opener) and not text[end + len(closer) :].strip(" .。,;"):
                return text[len(opener) : end]
            return None
    m = BOX_RE.match(text)
    if m:
        at = text.find("{", m.end())
        if at >= 0 and not text[m.end() : at].strip():
            close = match_brace(text, at)
            if close is not None and not text[close + 1 :].strip(" .。,;"):
                return text[at + 1 : close]
    return None


#: Boxed answers kept per completion (the last ones): more never change a verdict.
MAX_BOXES = 64
#: Layers of $...$ or \\boxed{} around an answer unwrapped at most (each is a pass over it).
MAX_UNWRAP = 8


def clean_answer(answer: str) -> str:
    """Trim what surrounds an extracted answer: $ signs, a whole \\boxed{}, final dots."""
    a = " ".join(answer.replace("**", "").split()).lstrip(":：").strip()
    for _ in range(MAX_UNWRAP):
        inner = _whole_span(a)
        if inner is None:
            break
        a = inner.strip()
    return a.rstrip(" .。,;；").strip()


def _few_shot_cut(text: str) -> int:
    """Where a base model starts its own next exemplar: the first newline (after position
    0) that only whitespace separates from "Problem:", "Q: " or "Question:"; else the end.
    (``\\n\\s*(?:Problem:|...)`` says the same, in quadratic time on long blank runs.)"""
    for m in _FEW_SHOT_STOPS.finditer(text):
        newline = text.find("\n", max(m.start(), 1), m.end())
        if newline >= 0:
            return newline
    return len(text)


def extract_answer(completion: str, *, few_shot: bool = False) -> Extraction:
    """The model's final answer and the rule that found it.

    With ``few_shot`` the text is first cut where a base model starts inventing the next
    exemplar ("Problem:" / "Q:" on a new line), as DeepSeek's few-shot scorer does.
    """
    text = completion
    if few_shot:
        text = text[: _few_shot_cut(text)]
    boxed = tuple(find_boxed(text, last=MAX_BOXES))

    finals = list(_FINAL_RE.finditer(text))
    if finals:
        span = _math_span(text[finals[-1].end() :])
        # "The final answer is $\boxed{5}$" is a boxed answer: the box rule reads it.
        if span is not None and not BOX_RE.search(span) and (answer := clean_answer(span)):
            return Extraction(answer, "final-answer", boxed)
    if boxed:
        return Extraction(clean_answer(boxed[-1]), "boxed", boxed)
    for rule, pattern, stop in (("answer-is", _ANSWER_IS_RE, r"\.(?:\s|$)"),
                                ("answer-is-zh", _ANSWER_ZH_RE, r"[。；;]|\.(?:\s|$)")):
        hits = list(pattern.finditer(text))
        if hits:
            answer = clean_answer(_sentence_answer(text[hits[-1].end() :], stop))
            if answer:
                return Extraction(answer, rule, boxed)
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return Extraction(numbers[-1].replace(",", ""), "last-number", boxed)
    return Extraction(None, "none", boxed)
