"""Grade completions, keep per-problem results, and re-grade stored results files.

A results file is JSONL, one :class:`ProblemResult` a line, written by the smoke stage.
:func:`regrade_file` re-extracts and re-judges every line from its stored ``completion``
and gold ``answer`` without running a model, so a grader fix re-scores old runs. Fields it
does not know are kept as they were; the file is replaced atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathq.datasets.problems import Problem
from mathq.errors import ProblemSetError, shorten
from mathq.evaluate.grading.equivalence import (
    DEFAULT_TIMEOUT_S,
    MAX_ANSWER_CHARS,
    Judgement,
    normalize_answer,
)
from mathq.evaluate.grading.extract import Extraction, extract_answer
from mathq.evaluate.grading.isolation import judge
from mathq.fsutil import READ_HINT, atomic_output, check_writable
from mathq.inputs import UnreadableInput, parse_json, read_bytes
from mathq.progress import Progress, ProgressCallback, no_progress

#: Verdicts, and what each means. Only "correct" counts towards accuracy.
VERDICTS: tuple[tuple[str, str], ...] = (
    ("correct", "the extracted answer equals the gold answer"),
    ("wrong", "an answer was found and it differs from the gold answer"),
    ("no-answer", "no rule found an answer in the completion"),
    ("timeout", "the comparison ran out of time (counted as wrong)"),
)

Judge = Callable[[str, str], Judgement]


@dataclass(frozen=True)
class Grade:
    """The verdict on one completion: what was extracted, by which rule, and how judged."""

    answer: str | None
    rule: str
    verdict: str
    method: str
    extraction: Extraction

    @property
    def correct(self) -> bool:
        """Whether the verdict counts towards accuracy."""
        return self.verdict == "correct"


def split_top_level(answer: str) -> list[str]:
    """Split on commas outside brackets: '1, -2' -> 2 parts, '(1, 2)' -> 1 part."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(answer):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(answer[start:i])
            start = i + 1
    parts.append(answer[start:])
    return [p.strip() for p in parts if p.strip()]


def grade_completion(gold: str, completion: str, *, few_shot: bool = False,
                     judge: Judge = judge) -> Grade:
    """Extract the answer from ``completion`` and judge it against ``gold``.

    As in DeepSeek's scorer, when the gold answer lists k answers and the model boxed
    each one separately, the last k distinct boxes are judged together.
    """
    ex = extract_answer(completion, few_shot=few_shot)
    if ex.answer is None:
        return Grade(None, ex.rule, "no-answer", "empty", ex)
    answer = ex.answer
    verdict = judge(gold, answer)
    if not verdict.equal and ex.rule == "boxed" and len(ex.boxed) > 1 \
            and len(gold) <= MAX_ANSWER_CHARS:  # normalised here, outside any time limit
        k = len(split_top_level(normalize_answer(gold)))
        distinct = list(dict.fromkeys(ex.boxed))
        if 1 < k <= len(distinct):
            joined = ", ".join(distinct[-k:])
            together = judge(gold, joined)
            if together.equal:
                answer, verdict = joined, together
    name = "correct" if verdict.equal else "timeout" if verdict.method == "timeout" else "wrong"
    return Grade(answer, ex.rule, name, verdict.method, ex)


@dataclass(frozen=True)
class ProblemResult:
    """One line of a results file: the problem, what the model said, and the verdict."""

    id: str
    answer: str
    completion: str
    subject: str = ""
    level: int | None = None
    extracted: str | None = None
    rule: str = "none"
    verdict: str = "no-answer"
    method: str = "empty"
    few_shot: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float | None = None
    finish_reason: str | None = None
    # Which smoke run wrote the record, and its seconds since that run began generating:
    # summaries add up wall time over the runs of a resumed evaluation.
    run: str | None = None
    run_seconds: float | None = None
    # The in-process engine's decode steps for this answer, and the drafted tokens those
    # steps reached and kept (``accepted``, the name results files store kept drafts by;
    # None from other backends and before mathq recorded them).
    steps: int | None = None
    drafted: int | None = None
    accepted: int | None = None
    # The token ids the in-process engine generated (the one that completed a stop string
    # included): a later variant drafts from them exactly, where the text tokenized anew
    # may be cut into other tokens than the model wrote. None from other backends.
    completion_ids: tuple[int, ...] | None = None

    @property
    def correct(self) -> bool:
        """Whether the verdict counts towards accuracy."""
        return self.verdict == "correct"

    def to_json(self) -> dict[str, Any]:
        """The JSON object written as one line of a results file."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, row: Mapping[str, Any], where: str = "") -> ProblemResult:
        """Build from a results-file object, ignoring unknown keys; ``where`` names the
        file and line in errors."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: v for k, v in row.items() if k in known}
        for name in ("id", "answer", "completion"):
            if name not in values:
                raise ProblemSetError(f"{where}: missing field {name!r}",
                                      "each result needs id, completion and the gold answer")
        if not isinstance(values["id"], (str, int)) or isinstance(values["id"], bool):
            raise ProblemSetError(f"{where}: field 'id' must be a string or a number, got "
                                  f"{_json_type(values['id'])}", 'give each result an id, '
                                  'e.g. "id": "test/algebra/1.json"')
        values["id"] = str(values["id"])
        for name, value in values.items():
            kinds = _FIELD_TYPES.get(name)
            if kinds is None or (value is None and name not in ("answer", "completion")):
                continue
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                wanted = " or ".join(_TYPE_WORDS[k] for k in kinds)
                raise ProblemSetError(
                    f"{where}: field {name!r} must be {wanted}, got {_json_type(value)}",
                    f"fix that line; e.g. \"{name}\": {_EXAMPLES[name]}")
        ids = values.get("completion_ids")
        if ids is not None:
            example = 'fix that line; e.g. "completion_ids": [791, 4320]'
            if not isinstance(ids, list):
                raise ProblemSetError(f"{where}: field 'completion_ids' must be a list of token "
                                      f"ids, got {_json_type(ids)}", example)
            bad = first_bad_token_id(ids)
            if bad is not None:
                raise ProblemSetError(
                    f"{where}: field 'completion_ids' holds {shorten(json.dumps(ids[bad]))} at "
                    f"position {bad}; token ids are whole numbers from 0", example)
            values["completion_ids"] = tuple(ids)
        return cls(**values)


def first_bad_token_id(ids: list[Any]) -> int | None:
    """Where ``ids`` (a JSON list) first holds something that is not a token id (a whole
    number from 0), or None when every element is one."""
    return next((i for i, t in enumerate(ids) if type(t) is not int or t < 0), None)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "answer": (str,), "completion": (str,), "subject": (str,), "level": (int,),
    "extracted": (str,), "rule": (str,), "verdict": (str,), "method": (str,),
    "few_shot": (bool,), "prompt_tokens": (int,), "completion_tokens": (int,),
    "seconds": (int, float), "finish_reason": (str,), "run": (str,),
    "run_seconds": (int, float), "steps": (int,), "drafted": (int,), "accepted": (int,),
}
_TYPE_WORDS = {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}
_EXAMPLES = {"answer": '"5" (the gold answer, quoted)', "completion": '"... \\\\boxed{5}"',
             "subject": '"Algebra"', "level": "3", "extracted": '"5"', "rule": '"boxed"',
             "verdict": '"correct"', "method": '"math-verify"', "few_shot": "false",
             "prompt_tokens": "120", "completion_tokens": "300", "seconds": "1.5",
             "finish_reason": '"stop"', "run": '"20250101T000000"', "run_seconds": "12.5",
             "steps": "120", "drafted": "300", "accepted": "280"}


def _json_type(value: Any) -> str:
    """JSON's name for a value's type: what the user wrote, not Python's name for it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def result_for(problem: Problem, completion: str, *, few_shot: bool = False,
               judge: Judge = judge, **measures: Any) -> ProblemResult:
    """Grade ``completion`` for ``problem`` into a results-file record.

    ``measures`` are the run's figures: prompt_tokens, completion_tokens, seconds,
    finish_reason.
    """
    g = grade_completion(problem.answer, completion, few_shot=few_shot, judge=judge)
    return ProblemResult(id=problem.id, answer=problem.answer, completion=completion,
                         subject=problem.subject, level=problem.level, extracted=g.answer,
                         rule=g.rule, verdict=g.verdict, method=g.method, few_shot=few_shot,
                         **measures)


@dataclass(frozen=True)
class Tally:
    """Correct out of total, and the percentage, for one slice of the results."""

    correct: int
    total: int
    accuracy: float

    @classmethod
    def of(cls, correct: int, total: int) -> Tally:
        """A tally with its accuracy in percent (0 when empty)."""
        return cls(correct, total, 100.0 * correct / total if total else 0.0)


@dataclass(frozen=True)
class GradeSummary:
    """Accuracy overall and by subject, level, extraction rule and verdict."""

    total: int
    correct: int
    accuracy: float
    verdicts: dict[str, int]
    by_rule: dict[str, int]
    by_subject: dict[str, Tally]
    by_level: dict[str, Tally]


def summarize(results: Iterable[ProblemResult]) -> GradeSummary:
    """Count verdicts and accuracy per subject and level (levels sorted, subjects by name)."""
    results = list(results)
    correct = sum(r.correct for r in results)

    def tallies(key: Callable[[ProblemResult], str]) -> dict[str, Tally]:
        groups: dict[str, list[bool]] = {}
        for r in results:
            groups.setdefault(key(r), []).append(r.correct)
        return {k: Tally.of(sum(v), len(v)) for k, v in sorted(groups.items())}

    return GradeSummary(
        total=len(results), correct=correct,
        accuracy=100.0 * correct / len(results) if results else 0.0,
        verdicts={v: n for v, _ in VERDICTS if (n := sum(r.verdict == v for r in results))},
        by_rule=dict(Counter(r.rule for r in results).most_common()),
        by_subject=tallies(lambda r: r.subject or "(none)"),
        by_level=tallies(lambda r: str(r.level) if r.level is not None else "(none)"),
    )


_RESULTS_HINT = "give the per-problem JSONL a smoke run wrote (build/<model>/smoke/<QUANT>.jsonl)"


def read_results(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a results file; a malformed line raises with ``path:line``."""
    return [row for _, row in _numbered_results(Path(path))]


def _numbered_results(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """The JSON objects of a results file with their line numbers (blank lines are
    skipped, so the numbers are the file's, not the objects' count)."""
    try:
        data = read_bytes(path)
    except UnreadableInput as e:
        raise ProblemSetError(e.describe(path), READ_HINT if "cannot be read" in str(e)
                              else _RESULTS_HINT, path=str(path)) from None
    rows: list[tuple[int, dict[str, Any]]] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProblemSetError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x})",
                                  _RESULTS_HINT, path=str(path), line=lineno) from None
        try:
            row = parse_json(line)
        except UnreadableInput as e:
            raise ProblemSetError(e.describe(where), "each line must be one JSON object; fix "
                                  "or delete that line", path=str(path), line=lineno) from None
        if not isinstance(row, dict):
            raise ProblemSetError(f"{where}: expected a JSON object, got {_json_type(row)}",
                                  'each line must look like {"id": ..., "answer": ..., '
                                  '"completion": ...}', path=str(path), line=lineno)
        # A repeated id would be counted twice in the accuracy, as a suite refuses it.
        if isinstance(row.get("id"), (str, int)) and not isinstance(row.get("id"), bool):
            key = str(row["id"])
            if key in seen:
                raise ProblemSetError(f"{where}: id {shorten(key)!r} repeats line {seen[key]}",
                                      "ids must be unique within a file; delete one of the "
                                      "two lines", path=str(path), line=lineno)
            seen[key] = lineno
        rows.append((lineno, row))
    if not rows:
        raise ProblemSetError(f"{path}: no results in the file (it is empty)", _RESULTS_HINT,
                              path=str(path))
    return rows


def write_results(path: Path, results: Iterable[ProblemResult | Mapping[str, Any]]) -> None:
    """Write records as JSONL through a temporary file renamed into place."""
    with atomic_output(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in results:
            row = r.to_json() if isinstance(r, ProblemResult) else dict(r)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@dataclass(frozen=True)
class RegradeReport:
    """What ``mathq grade`` did: the files, the new summary, and which verdicts changed."""

    path: Path
    out: Path
    summary: GradeSummary
    changes: tuple[tuple[str, str, str], ...]  # (id, old verdict, new verdict)


def regrade_file(path: Path, *, out: Path | None = None,
                 gold: Mapping[str, str] | None = None, workers: int = 0,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 progress: ProgressCallback = no_progress) -> RegradeReport:
    """Re-extract and re-judge every record of a results file and write it back.

    ``gold`` maps ids to answers for records that lack ``answer`` (or to override it).
    With ``workers`` > 0, comparisons run in that many worker processes in parallel;
    with 0 they run here, in the main thread, or in one worker process otherwise.
    """
    path = Path(path)
    rows = _numbered_results(path)
    target = Path(out) if out is not None else path
    check_writable(target)  # before the grading, not after it
    records: list[tuple[dict[str, Any], ProblemResult]] = []
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        if gold is not None and str(row.get("id")) in gold:
            row = {**row, "answer": gold[str(row.get("id"))]}
        records.append((row, ProblemResult.from_json(row, where)))

    def one(rec: ProblemResult, judge_fn: Judge) -> Grade:
        return grade_completion(rec.answer, rec.completion, few_shot=rec.few_shot,
                                judge=judge_fn)

    grades: list[Grade] = []
    done = correct = 0

    def tick(g: Grade, item: str) -> None:
        nonlocal done, correct
        done += 1
        correct += g.correct
        progress(Progress("grade", done, len(records), "problems", item=item,
                          info=f"{100.0 * correct / done:.1f}% correct"))

    if workers > 0:
        from mathq.evaluate.grading.isolation import JudgePool

        # A process per record at most, and a few per core: more only cost memory (each
        # holds SymPy), and the pool starts them all at once.
        workers = max(1, min(workers, len(records), 4 * (os.cpu_count() or 1)))
        with JudgePool(workers, timeout_s) as pool, ThreadPoolExecutor(workers) as ex:
            futures = [ex.submit(one, rec, pool.judge) for _, rec in records]
            for fut, (_, rec) in zip(futures, records, strict=True):
                grades.append(fut.result())
                tick(grades[-1], rec.id)
    else:
        for _, rec in records:
            grades.append(one(rec, lambda g, p: judge(g, p, timeout_s)))
            tick(grades[-1], rec.id)

    new_rows, results, changes = [], [], []
    for (row, rec), g in zip(records, grades, strict=True):
        updated = {**row, "extracted": g.answer, "rule": g.rule, "verdict": g.verdict,
                   "method": g.method}
        new_rows.append(updated)
        results.append(dataclasses.replace(rec, extracted=g.answer, rule=g.rule,
                                           verdict=g.verdict, method=g.method))
        old = row.get("verdict")
        if old != g.verdict:
            changes.append((rec.id, str(old) if old is not None else "-", g.verdict))
    write_results(target, new_rows)
    return RegradeReport(path, target, summarize(results), tuple(changes))
