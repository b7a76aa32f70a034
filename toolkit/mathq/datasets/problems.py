"""Problem sets: the Hub suites mathq knows, local JSONL files, and deterministic subsets.

``SUITES`` is the one table of suite name -> Hugging Face dataset repo, file and revision.
A suite's file is fetched with ``huggingface_hub`` into the ordinary Hugging Face cache,
so a second run (and any run with ``HF_HUB_OFFLINE=1``) reads it from disk. Any local
JSONL file in MATH's format (``problem``, ``solution``, ``answer``, ``subject``, ``level``,
``unique_id``), in the original MATH release's spelling (``type``, ``"Level 3"``, answer
only inside the solution's last ``\\boxed{}``) or in GSM8K's (``question``, ``answer``
ending ``#### 72``) loads the same way. A malformed line is reported with file and line.

Subsets are stratified by (subject, level), so ``--n 100`` of MATH-500 keeps its mix of
subjects and difficulties, and depend only on the seed: the same command picks the same
problems on any machine and Python version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mathq.errors import DownloadError, ProblemSetError, shorten
from mathq.inputs import UnreadableInput, file_problem, parse_json, read_text
from mathq.progress import Progress, ProgressCallback, no_progress


@dataclass(frozen=True)
class Problem:
    """One problem with its gold answer (LaTeX for MATH, a number for GSM8K)."""

    id: str
    problem: str
    answer: str
    subject: str = ""
    level: int | None = None
    solution: str = ""


@dataclass(frozen=True)
class Suite:
    """A problem set on the Hugging Face Hub: where its file is and what it holds."""

    name: str
    title: str
    repo_id: str
    filename: str
    revision: str
    size: int
    description: str
    license: str


SUITES: tuple[Suite, ...] = (
    Suite("math500", "MATH-500", "HuggingFaceH4/MATH-500", "test.jsonl", "main", 500,
          "MATH-500: 500 MATH test problems sampled uniformly (openai/prm800k)", "MIT"),
    Suite("math", "MATH", "HuggingFaceTB/math_tasks", "data/math/test.jsonl", "main", 5000,
          "the full MATH test set (Hendrycks et al.), as packaged for Qwen2.5-Math's evaluation",
          "MIT"),
    Suite("gsm8k", "GSM8K", "HuggingFaceTB/math_tasks", "data/gsm8k/test.jsonl", "main", 1319,
          "GSM8K test (grade-school word problems, '#### n' answers)", "MIT"),
)

@dataclass(frozen=True)
class ProblemSet:
    """Problems in file order, with where they came from (file, or repo@commit)."""

    name: str
    source: str
    problems: tuple[Problem, ...]

    def __len__(self) -> int:
        return len(self.problems)

    def subjects(self) -> list[str]:
        """Distinct subjects in first-seen order."""
        return list(dict.fromkeys(p.subject for p in self.problems if p.subject))

    def by_id(self) -> dict[str, Problem]:
        """Problems keyed by id (ids are unique; the loader checks)."""
        return {p.id: p for p in self.problems}


def get_suite(name: str) -> Suite:
    """The suite called ``name``, or ProblemSetError listing the known ones."""
    for s in SUITES:
        if s.name == name:
            return s
    known = ", ".join(s.name for s in SUITES)
    raise ProblemSetError(f"no problem set named {name!r}",
                          f"known suites: {known}; or give the path of a JSONL file")


def suite_title(name: str) -> str:
    """How a reader calls a problem set: a known suite's title (``MATH-500`` for
    ``math500``), else ``name`` itself (a local file's stem, which a recipe can replace with
    ``[smoke] suite_title``)."""
    return next((s.title for s in SUITES if s.name == name), name)


def load_problem_set(ref: str | Path, *, revision: str | None = None,
                     progress: ProgressCallback = no_progress) -> ProblemSet:
    """Load a suite by name (from the Hub or its cache) or a local JSONL file by path."""
    path = Path(ref)
    if isinstance(ref, Path) or path.exists() or path.is_symlink() \
            or path.suffix in (".jsonl", ".json") or os.sep in str(ref):
        if (problem := file_problem(path)) is not None:
            raise ProblemSetError(f"problem file {path} {problem}",
                                  "give an existing JSONL file or a suite name "
                                  f"({', '.join(s.name for s in SUITES)})", path=str(path))
        return ProblemSet(path.stem, str(path), tuple(read_problems_jsonl(path)))
    suite = get_suite(str(ref))
    local, commit = fetch_suite_file(suite, revision=revision, progress=progress)
    problems = tuple(read_problems_jsonl(local))
    return ProblemSet(suite.name, f"{suite.repo_id}@{commit or suite.revision}/{suite.filename}",
                      problems)


def gold_answers(ref: str | Path, progress: ProgressCallback = no_progress) -> dict[str, str]:
    """Problem id -> reference answer of a suite or JSONL file, for re-grading results."""
    return {p.id: p.answer for p in load_problem_set(ref, progress=progress).problems}


def fetch_suite_file(suite: Suite, *, revision: str | None = None,
                     progress: ProgressCallback = no_progress) -> tuple[Path, str | None]:
    """Download (or find in the HF cache) a suite's file; return its path and commit hash.

    ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are honoured by huggingface_hub itself.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    from mathq.download.hub import hub_endpoint, hub_errors

    rev = revision or suite.revision
    progress(Progress("problems", 0, 1, "files", item=suite.filename))
    where = f"{suite.repo_id}/{suite.filename}@{rev}"
    try:
        with hub_errors(suite.repo_id, rev, hub_endpoint(),
                        repo_hint="check HF_ENDPOINT, or give a local JSONL file"):
            try:
                local = Path(hf_hub_download(suite.repo_id, suite.filename,
                                             repo_type="dataset", revision=rev))
            except RemoteEntryNotFoundError as e:
                raise DownloadError(f"the Hub dataset {suite.repo_id}@{rev} has no file "
                                    f"{suite.filename}",
                                    "check HF_ENDPOINT, or give a local JSONL file") from e
    except LocalEntryNotFoundError as e:
        raise DownloadError(
            f"{where} is not in the Hugging Face cache and the Hub cannot be reached",
            "connect once to cache it (HF_HUB_OFFLINE=1 only reads the cache), "
            "or give a local JSONL file") from e
    except DownloadError:
        raise
    except OSError as e:  # the cache folder cannot be written, the disk is full
        raise DownloadError(f"could not store {where} in the Hugging Face cache: "
                            f"{e.strerror or e}", "check HF_HOME's folder and free space, "
                            "or give a local JSONL file") from e
    progress(Progress("problems", 1, 1, "files", item=suite.filename))
    # The cache layout is .../snapshots/<commit>/<filename>; the commit names the version.
    parts = local.parts
    commit = None
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts):
            commit = parts[i + 1]
    return local, commit


_LEVEL_RE = re.compile(r"^\s*(?:level\s*)?([0-9]+)\s*$", re.IGNORECASE)
_GSM8K_ANSWER_RE = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def read_problems_jsonl(path: Path) -> list[Problem]:
    """Read MATH- or GSM8K-style JSONL; every error names ``path:line`` and the field."""
    path = Path(path)
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    try:
        text = read_text(path)
    except UnreadableInput as e:
        raise ProblemSetError(e.describe(path), "give a JSONL file of problems",
                              path=str(path)) from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = parse_json(line)
        except UnreadableInput as e:
            raise ProblemSetError(e.describe(where), "each line must be one JSON object",
                                  path=str(path), line=lineno) from None
        if not isinstance(row, dict):
            kind = {list: "an array", str: "a string", bool: "true/false",
                    type(None): "null"}.get(type(row), "a number")
            raise ProblemSetError(f"{where}: expected a JSON object, got {kind}",
                                  'each line must be one problem, e.g. {"problem": ..., '
                                  '"answer": ...}', path=str(path), line=lineno)
        try:
            problem = _row_to_problem(row, where, default_id=f"{path.stem}/{lineno}")
        except ProblemSetError as e:
            e.path, e.line = str(path), lineno
            raise
        if problem.id in seen:
            raise ProblemSetError(
                f"{where}: id {problem.id!r} repeats line {seen[problem.id]}",
                "ids (unique_id) must be unique within a file", path=str(path), line=lineno)
        seen[problem.id] = lineno
        problems.append(problem)
    if not problems:
        raise ProblemSetError(f"{path}: no problems in the file (it is empty)",
                              "give a JSONL file with one MATH or GSM8K problem per line",
                              path=str(path))
    return problems


def _text_field(row: dict[str, Any], names: Sequence[str], where: str, *,
                required: bool) -> str:
    for name in names:
        if name in row:
            value = row[name]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            if not isinstance(value, str):
                raise ProblemSetError(f"{where}: field {name!r} must be a string, "
                                      f"got {type(value).__name__}")
            return value
    if required:
        raise ProblemSetError(f"{where}: missing field {' or '.join(map(repr, names))}",
                              "MATH lines need problem and answer (or a solution with "
                              "\\boxed{}); GSM8K lines need question and '#### n' answer")
    return ""


def _row_to_problem(row: dict[str, Any], where: str, default_id: str) -> Problem:
    text = _text_field(row, ("problem", "question"), where, required=True)
    solution = _text_field(row, ("solution",), where, required=False)
    answer = _text_field(row, ("answer",), where, required=not solution)
    if "question" in row and "problem" not in row and "####" in answer:
        # GSM8K: the reasoning, then '#### 72'. Keep the reasoning as the solution.
        m = _GSM8K_ANSWER_RE.search(answer)
        solution = answer[: answer.rindex("####")].strip()
        answer = m.group(1).replace(",", "") if m else ""
    if not answer.strip() and solution:
        boxed = last_boxed(solution)
        answer = boxed or ""
    if not answer.strip():
        raise ProblemSetError(f"{where}: empty answer",
                              "give an 'answer' field or a solution ending in \\boxed{...}")
    level = row.get("level")
    parsed_level: int | None = None
    if isinstance(level, int) and not isinstance(level, bool):
        parsed_level = level
    elif isinstance(level, str) and (m := _LEVEL_RE.match(level)) and len(m.group(1)) <= 3:
        parsed_level = int(m.group(1))  # (more digits would trip Python's int() limit)
    elif level not in (None, "") and not (isinstance(level, str) and "?" in level):
        raise ProblemSetError(f"{where}: level must be 1-5 or 'Level N', got "
                              f"{shorten(repr(level), 60)}")
    if parsed_level is not None and not 1 <= parsed_level <= 5:
        raise ProblemSetError(f"{where}: level must be 1-5 or 'Level N', got "
                              f"{shorten(str(parsed_level), 40)}")
    subject = _text_field(row, ("subject", "type"), where, required=False)
    pid = row.get("unique_id", row.get("id", row.get("idx")))
    return Problem(id=str(pid) if pid is not None else default_id, problem=text,
                   answer=answer.strip(), subject=subject, level=parsed_level,
                   solution=solution)


def _canonical_subject(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower().replace("&", "and"))


def filter_problems(problems: Iterable[Problem], *, subjects: Sequence[str] = (),
                    levels: Sequence[int] = ()) -> list[Problem]:
    """Problems whose subject is one of ``subjects`` (any spelling: 'number_theory',
    'Number Theory') and whose level is one of ``levels``; empty means no filter."""
    problems = list(problems)
    if subjects:
        present = {_canonical_subject(p.subject): p.subject for p in problems}
        wanted = set()
        for s in subjects:
            key = _canonical_subject(s)
            if key not in present:
                raise ProblemSetError(f"no problems with subject {s!r}",
                                      f"subjects here: {', '.join(sorted(set(present.values())))}")
            wanted.add(key)
        problems = [p for p in problems if _canonical_subject(p.subject) in wanted]
    if levels:
        problems = [p for p in problems if p.level in set(levels)]
        if not problems:
            raise ProblemSetError(f"no problems at level {', '.join(map(str, levels))}",
                                  "MATH levels run from 1 to 5")
    return problems


def _cell_rng(seed: int, cell: tuple[str, int | None]) -> random.Random:
    # A per-cell generator keyed by a stable hash (not Python's salted hash()), so the pick
    # inside one subject/level cell does not change when other cells are filtered away.
    digest = hashlib.sha256(f"{seed}|{cell[0]}|{cell[1]}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def stratified_sample(problems: Sequence[Problem], n: int, seed: int = 0) -> list[Problem]:
    """``n`` problems keeping the (subject, level) proportions of ``problems``.

    Each cell gets its proportional share rounded by largest remainder (ties broken by
    cell size, then name), then draws that many problems with a generator seeded by
    ``seed`` and the cell. The result keeps the input order. ``n`` at or above the size
    returns everything.
    """
    if n < 1:
        raise ProblemSetError(f"cannot sample {n} problems", "--n must be at least 1")
    if n >= len(problems):
        return list(problems)
    cells: dict[tuple[str, int | None], list[int]] = {}
    for i, p in enumerate(problems):
        cells.setdefault((p.subject, p.level), []).append(i)
    total = len(problems)
    quotas = {c: n * len(ix) / total for c, ix in cells.items()}
    counts = {c: math.floor(q) for c, q in quotas.items()}
    left = n - sum(counts.values())

    def order(c: tuple[str, int | None]) -> tuple[float, int, str, int]:
        return (-(quotas[c] - counts[c]), -len(cells[c]), c[0], c[1] if c[1] is not None else -1)

    for c in sorted(cells, key=order)[:left]:
        counts[c] += 1
    chosen: list[int] = []
    for c, ix in cells.items():
        chosen.extend(_cell_rng(seed, c).sample(ix, counts[c]))
    return [problems[i] for i in sorted(chosen)]


def select_problems(pset: ProblemSet, *, n: int | None = None, seed: int = 0,
                    subjects: Sequence[str] = (), levels: Sequence[int] = ()) -> ProblemSet:
    """Filter by subject and level, then take a stratified subset of ``n`` (if given)."""
    chosen = filter_problems(pset.problems, subjects=subjects, levels=levels)
    if n is not None:
        chosen = stratified_sample(chosen, n, seed)
    return replace(pset, problems=tuple(chosen))


def write_problems_jsonl(path: Path, problems: Iterable[Problem]) -> None:
    """Write problems in MATH-500's JSONL format (through a temporary file)."""
    from mathq.fsutil import atomic_output

    with atomic_output(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"problem": p.problem, "solution": p.solution,
                                "answer": p.answer, "subject": p.subject, "level": p.level,
                                "unique_id": p.id}, ensure_ascii=False) + "\n")


# The boxed answers of a LaTeX text: a problem's gold answer is its solution's last box, and
# the grader reads a model's answer the same way (mathq.evaluate.grading.extract).
BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)
_BOX_TAIL = re.compile(r"[^\s$]+")


def match_brace(text: str, open_at: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_at``; None if the text ends first.

    Escaped characters (``\\{``, ``\\}``, ``\\\\``) are skipped as pairs, so ``\\{1,2\\}``
    inside a box does not unbalance it.
    """
    depth = 0
    for m in _BRACE_TOKENS.finditer(text, open_at):
        c = m.group()
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return None


def _closing_braces(text: str) -> dict[int, int]:
    """Every ``{`` position mapped to its closing ``}`` (unclosed ones left out), in one
    pass: what :func:`match_brace` answers for each, without rescanning the text per box
    (many unclosed boxes would make that quadratic)."""
    partners: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_TOKENS.finditer(text):
        c = m.group()
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            partners[stack.pop()] = m.start()
    return partners


def find_boxed(text: str, last: int | None = None) -> list[str]:
    """Contents of every complete ``\\boxed{...}``/``\\fbox{...}``/``\\boxed 5``, in order
    (only the ``last`` ones when given).

    A box the output was cut off inside (no closing brace) is skipped, and so are empty
    boxes (a model echoing "put your answer in \\boxed{}"). Linear in the text's length;
    with ``last``, memory too (the contents of many nested boxes overlap: all of them
    would be quadratic).
    """
    spans: list[tuple[int, int, bool]] = []  # (start, end, a \\boxed 5 tail)
    partners: dict[int, int] | None = None
    for m in BOX_RE.finditer(text):
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            if partners is None:
                partners = _closing_braces(text)
            close = partners.get(i)
            if close is None:
                continue
            spans.append((i + 1, close, False))
        elif i > m.end():
            # \boxed 5 : the next run of non-space characters, up to a $ or a sentence end.
            tail = _BOX_TAIL.match(text, i)
            if tail:
                spans.append((tail.start(), tail.end(), True))
    found: list[str] = []
    for start, end, is_tail in reversed(spans):
        content = text[start:end].rstrip(".,;") if is_tail else text[start:end].strip()
        if content:
            found.append(content)
            if last is not None and len(found) == last:
                break
    return found[::-1]


def last_boxed(text: str) -> str | None:
    """The last non-empty complete boxed answer in ``text``, if any."""
    boxes = find_boxed(text)
    return boxes[-1] if boxes else None
