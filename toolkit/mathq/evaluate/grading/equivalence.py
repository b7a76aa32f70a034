"""Is a model's answer the gold answer? math-verify decides, after MATH-specific clean-up.

math-verify (Hugging Face's answer checker, on latex2sympy2-extended and SymPy) compares
numbers, fractions, radicals, tuples, intervals, sets, matrices and equations as
mathematics. Before it runs, both answers go through the normalisations MATH answers need
and a symbolic parser cannot know: ``\\dfrac``/``\\tfrac``, ``\\left``/``\\right``, degree
signs, dollar signs, trailing ``\\text{ units}``, thousands separators (``10,\\!080``),
"and"/"or" between several answers, ``x \\in [a, b]``. Answers that are words (a name, a
direction, "even", a choice letter) are compared as words: a CAS would multiply the
letters and call "Evenly" equal to "Evelyn".

Each comparison has a time limit. In the main thread it is a ``SIGALRM`` timer around the
whole comparison (math-verify's own limits also use ``signal``, which only works there);
from any other thread the comparison runs in a worker process (``mathq.evaluate.grading.isolation``)
that is killed if it overruns, so grading works wherever it is called from.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

#: Seconds one comparison (both parses and the check) may take before it counts as unequal.
DEFAULT_TIMEOUT_S = 5.0

#: Longer answers are compared as text only: no MATH answer comes near this, and a
#: runaway output must not reach the parsers' regular expressions, which no alarm stops.
MAX_ANSWER_CHARS = 1000
#: Longer answers are not even normalised: a hundred times the longest answer compared as
#: mathematics is a runaway output, and normalising megabytes takes seconds of the limit.
MAX_INPUT_CHARS = 100 * MAX_ANSWER_CHARS

#: How a verdict was reached.
METHODS: tuple[tuple[str, str], ...] = (
    ("string", "the normalised answers are the same text"),
    ("text", "word answers (names, 'even', choice letters) compared as words"),
    ("clock", "clock times ('4:30 p.m.') compared as times"),
    ("math-verify", "compared as mathematics by math-verify"),
    ("unparsed", "math-verify could not read one side; compared as text"),
    ("empty", "no answer to compare"),
    ("timeout", "the comparison ran out of time (counted as unequal)"),
    ("error", "the comparison failed (counted as unequal)"),
)


@dataclass(frozen=True)
class Judgement:
    """The verdict on one (gold, answer) pair, how it was reached, and what was compared."""

    equal: bool
    method: str
    gold: str
    pred: str


# ---------------------------------------------------------------------------------------
# Normalisation

_WRAPPERS = ("text", "textbf", "textrm", "mathrm", "mbox", "mathbf", "boldsymbol")
_SPACES_RE = re.compile(r"(?<!\\)\\[,;: ]|\\q?quad(?![A-Za-z])|~")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])\.?")
_DEGREES_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree(?![A-Za-z])")
_SEPARATOR_TEXT_RE = re.compile(r"\\(?:text|mbox|textrm)\{\s*(?:and|or|,)\s*\}")
_SEPARATOR_WORD_RE = re.compile(r"\s+(?:and|or)\s+")
_UNIT_TEXT_RE = re.compile(r"^(?P<body>.*?\S)\s*\\(?:text|mbox|textrm|mathrm)\{[^{}]*\}"
                           r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?$")
# Words after a number ('18 dollars', '10 sq. ft'); each word ends at a space, so a long
# run of letters cannot be split many ways (no catastrophic backtracking).
# The body is a number, or one whitespace-free token holding a digit and ending in '}'
# ('\frac{1}{2}'); the lookahead keeps that test linear (a lazy '\S*\d\S*?\}' was
# quadratic on a long run of digits).
_UNIT_WORD_RE = re.compile(r"^(?P<body>-?[\d.,/]+|(?=\S*\d)\S*\})\s+[A-Za-z]{2,}\.?"
                           r"(?:\s+[A-Za-z]+\.?)*\s*(?:\^\s*\{?\s*[23]\s*\}?)?$")
_THOUSANDS_RE = re.compile(r"^(?P<sign>-?)(?P<int>\d{1,3}(?:,\d{3})+)(?P<frac>\.\d+)?$")
_IN_RE = re.compile(r"^[A-Za-z]\s*\\in\s*")
_TRAILING_ZEROS_RE = re.compile(r"^(-?\d+)\.0+$")
_CLOCK_RE = re.compile(r"^(\d{1,2}):(\d{2})\s*(?:([ap])\.?\s*m\.?)?$", re.IGNORECASE)
_CHOICE_RE = re.compile(r"^\(([A-Za-z])\)(?:\s.*)?$|^([A-Za-z])\)?$")


_BRACES_RE = re.compile(r"[{}]")
_WRAPPER_OPEN_RE = re.compile(r"^\\(" + "|".join(_WRAPPERS) + r")\s*\{")
#: Layers of \text{\text{...}} unwrapped at most: each layer is a pass over the answer.
MAX_UNWRAP = 8


def _unwrap_whole(s: str) -> str:
    """``\\text{...}`` (or \\mbox, \\mathrm, ...) around the whole answer -> its content."""
    for _ in range(MAX_UNWRAP):
        m = _WRAPPER_OPEN_RE.match(s)
        if not m:
            return s
        depth, close = 0, -1
        for b in _BRACES_RE.finditer(s, m.end() - 1):
            depth += 1 if b.group() == "{" else -1
            if depth == 0:
                close = b.start()
                break
        if close != len(s) - 1:
            return s
        s = s[m.end() : -1].strip()
    return s


def basic_normalize(answer: str) -> str:
    """Layout-only clean-up shared by every kind of answer."""
    s = answer.strip()
    s = s.replace("\\displaystyle", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\cfrac", "\\frac")
    s = re.sub(r",\\!\s*(?=\d{3})", ",", s).replace("\\!", "")  # 10,\!080: thousands
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _SPACES_RE.sub(" ", s)
    s = s.replace("\\$", "").replace("$", "")
    s = " ".join(s.split())
    s = s.rstrip(".").strip()
    return _unwrap_whole(s)


def normalize_answer(answer: str) -> str:
    """The answer as math-verify gets it: units, degrees, separators and commas cleaned."""
    s = basic_normalize(answer)
    s = _DEGREES_RE.sub("", s).strip()
    s = _SEPARATOR_TEXT_RE.sub(", ", s)
    s = _SEPARATOR_WORD_RE.sub(", ", s)
    s = re.sub(r"\\%|%|\s*\bpercent\b", "\\%", s)
    s = s.replace("{,}", "")
    for _ in range(3):
        m = _UNIT_TEXT_RE.match(s) or _UNIT_WORD_RE.match(s)
        if not m:
            break
        s = m.group("body").strip()
    s = _IN_RE.sub("", s)
    m = _THOUSANDS_RE.match(s)
    if m:
        s = m.group("sign") + m.group("int").replace(",", "") + (m.group("frac") or "")
    s = _TRAILING_ZEROS_RE.sub(r"\1", s)
    s = s.replace("infinity", "\\infty")
    return " ".join(s.split())


def _squash(s: str) -> str:
    return s.replace(" ", "")


_WORD_RE = re.compile(r"[A-Za-z]+(?:['\-][A-Za-z]+)*")


def is_text_answer(gold: str) -> bool:
    """True for answers that are words ('Evelyn', 'even', 'two lines') or a choice letter
    ('(C)'), which a CAS would misread as products of single-letter variables."""
    s = basic_normalize(gold)
    if re.fullmatch(r"\([A-Za-z]\)", s):
        return True
    words = _WORD_RE.findall(s)
    leftover = _WORD_RE.sub("", s).translate(str.maketrans("", "", " .,"))
    return bool(words) and not leftover and all(len(w) >= 2 for w in words)


def _text_key(answer: str) -> str:
    s = basic_normalize(answer)
    s = re.sub(r"\\(?:" + "|".join(_WRAPPERS) + r")\s*\{([^{}]*)\}", r"\1", s).strip()
    m = _CHOICE_RE.match(s)
    if m:
        return (m.group(1) or m.group(2)).lower()
    return re.sub(r"[^a-z0-9]", "", s.lower())


# ---------------------------------------------------------------------------------------
# math-verify

class _DropTimeoutNotice(logging.Filter):
    """math-verify logs a warning when its own signal timeouts are off; mathq times
    comparisons itself, so the notice is noise on a user's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutNotice())

_mv: Any = None


def _math_verify() -> Any:
    """Import math-verify on first use (it pulls in SymPy and ANTLR: about a second)."""
    global _mv
    if _mv is None:
        import math_verify

        _mv = math_verify
    return _mv


def _mv_parse(latex: str) -> list[Any]:
    mv = _math_verify()
    config = [mv.LatexExtractionConfig(boxed_match_priority=0)]
    return mv.parse("\\boxed{" + latex + "}", extraction_config=config,
                    fallback_mode="no_fallback", parsing_timeout=None)


def _same_clock_time(gold: str, pred: str) -> bool | None:
    """For clock-time answers ('4:30 p.m.'): same time, and same half of the day if both
    say which. None when ``gold`` is not a clock time."""
    g = _CLOCK_RE.match(basic_normalize(gold))
    if not g:
        return None
    p = _CLOCK_RE.match(basic_normalize(pred))
    if not p:
        return False
    same = (int(g.group(1)), g.group(2)) == (int(p.group(1)), p.group(2))
    halves = {x.group(3).lower() for x in (g, p) if x.group(3)}
    return same and len(halves) <= 1


def compare(gold: str, pred: str) -> Judgement:
    """Judge ``pred`` against ``gold`` with no time limit (see :func:`judge`)."""
    if max(len(gold), len(pred)) > MAX_INPUT_CHARS:
        g, p = " ".join(gold.split()), " ".join(pred.split())
        return Judgement(bool(p) and g == p, "unparsed", g[:MAX_ANSWER_CHARS],
                         p[:MAX_ANSWER_CHARS])
    clock = _same_clock_time(gold, pred)
    if clock is not None:
        return Judgement(clock, "clock", basic_normalize(gold), basic_normalize(pred))
    if is_text_answer(gold):
        g, p = _text_key(gold), _text_key(pred)
        return Judgement(bool(p) and g == p, "text" if p else "empty", g, p)
    g, p = normalize_answer(gold), normalize_answer(pred)
    if not p:
        return Judgement(False, "empty", g, p)
    if _squash(g) == _squash(p):
        return Judgement(True, "string", g, p)
    if max(len(g), len(p)) > MAX_ANSWER_CHARS:
        return Judgement(False, "unparsed", g, p)
    percent = g.endswith("\\%") or p.endswith("\\%")
    equal = _percent_equal(g, p) if percent else _math_equal(g, p)
    if equal is None:
        return Judgement(False, "unparsed", g, p)
    return Judgement(equal, "math-verify", g, p)


def _math_equal(gold: str, pred: str) -> bool | None:
    """math-verify's verdict, or None when it cannot parse one of the answers. Two plain
    numbers are compared exactly first (see :func:`exact_verdict`)."""
    gold_parsed, pred_parsed = _mv_parse(gold), _mv_parse(pred)
    if not gold_parsed or not pred_parsed:
        return None
    exact = exact_verdict(gold_parsed[0], pred_parsed[0])
    if exact is not None:
        return exact
    return bool(_math_verify().verify(gold_parsed, pred_parsed, timeout_seconds=None))


#: Decimal places math-verify rounds to when a float is involved: below this magnitude its
#: comparison cannot tell numbers apart.
FLOAT_ROUNDING = 6


def exact_verdict(gold: Any, pred: Any) -> bool | None:
    """Equal or not, for two numbers (no variables), decided without float rounding; None
    when that is not possible and math-verify should decide.

    math-verify compares ``(a - b).evalf(chop=True)`` with 0 and rounds floats to six
    places: ``1/2004!`` and ``1/2006!`` both chop to 0 and are called equal. Exact values
    (integers, fractions, factorials, radicals) are compared exactly here; when a float is
    involved and either value is too small for six decimal places (or beyond a float's
    integers), the comparison is relative instead, since rounding decides nothing there.
    """
    import sympy

    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
        return None
    if gold.free_symbols or pred.free_symbols or not (gold.is_number and pred.is_number):
        return None
    floats = gold.has(sympy.Float) or pred.has(sympy.Float)
    try:
        diff = sympy.expand(gold - pred)
        if not floats and diff.is_Rational:
            return diff == 0
        scale = max(abs(gold).evalf(30), abs(pred).evalf(30))
        if not scale.is_Number or scale == 0:
            return None
        if floats and 10**-FLOAT_ROUNDING <= scale <= 2**53:
            return None  # math-verify's rounding is meaningful here
        rel = (abs(diff) / scale).evalf(30)
    except (TypeError, ValueError, ArithmeticError, RecursionError):
        return None
    if not rel.is_Number:
        return None
    if floats:
        return bool(rel <= 10**-FLOAT_ROUNDING)
    return False if rel > sympy.Float("1e-25") else None


def _percent_equal(gold: str, pred: str) -> bool | None:
    """'12.5\\%' equals '12.5' (the number asked for) and '0.125' (its value), not '1250'."""
    def strip(x: str) -> str:
        return x.removesuffix("\\%").strip()

    def value(x: str) -> str:
        return f"\\frac{{{strip(x)}}}{{100}}" if x.endswith("\\%") else x

    same_number = _math_equal(strip(gold), strip(pred))
    if same_number or gold.endswith("\\%") == pred.endswith("\\%"):
        return same_number
    return _math_equal(value(gold), value(pred))


# ---------------------------------------------------------------------------------------
# Time limits

class ComparisonTimeout(BaseException):
    """Raised inside a comparison by the alarm; a BaseException so that the
    ``except Exception`` blocks in math-verify and SymPy do not swallow it."""


class _Alarm:
    armed = False


def _on_alarm(_signum: int, _frame: Any) -> None:
    if _Alarm.armed:
        raise ComparisonTimeout


def unjudged(method: str, gold: str, pred: str) -> Judgement:
    """The verdict when the comparison ran out of time or failed: unequal, with the answers
    as given (cut to :data:`MAX_ANSWER_CHARS`). Normalising them here would run the work that
    just overran again, with no limit at all."""
    return Judgement(False, method, gold[:MAX_ANSWER_CHARS], pred[:MAX_ANSWER_CHARS])


def signals_usable() -> bool:
    """Whether this thread can time work with SIGALRM (main thread, POSIX)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def judge_here(gold: str, pred: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Judgement:
    """:func:`compare` under a SIGALRM deadline; only callable from the main thread.

    The timer repeats every 0.1 s after the deadline, so a library that catches the first
    interruption is interrupted again. An outer SIGALRM timer is restored afterwards.
    """
    _math_verify()  # never import under the alarm: an interrupted import stays broken
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    started = time.monotonic()
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s, 0.1)
    try:
        try:
            _Alarm.armed = True
            return compare(gold, pred)
        finally:
            _Alarm.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except ComparisonTimeout:
        _Alarm.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        return unjudged("timeout", gold, pred)
    except Exception:  # a parser bug on odd model output must not stop a whole run
        logging.getLogger(__name__).debug("comparison failed", exc_info=True)
        return unjudged("error", gold, pred)
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            left = max(old_delay - (time.monotonic() - started), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)
