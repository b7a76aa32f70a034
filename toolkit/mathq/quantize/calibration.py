"""Calibration text for importance matrices: math, and never the problems the smoke test grades.

A calibration source is a plain text file (used verbatim), a problem file in MATH's or
GSM8K's JSONL format, or a named Hub set from :data:`CALIBRATION_SETS` (train splits,
fetched and cached by :func:`mathq.datasets.problems.fetch_suite_file`, like the smoke suites).
Problems are laid out in the model's own prompt format when a recipe is given (DeepSeek's
chat turns for the instruct and RL models, Minerva's ``Problem:``/``Solution:`` blocks for
the base model), so the activations measured are the ones the model sees when it is used.

**Overlap with the smoke set.** Calibrating on graded problems would tune the quantization
to the very problems that judge it. The check compares problem statements after
whitespace normalisation against the *whole* smoke suite (any ``--n``/seed subset of it may
be graded later). Problems in a problem-file source that overlap are *dropped* and counted:
the set stays usable (a "train" file that also holds some test problems is common) and no
graded problem reaches the text. A plain text file cannot be split into problems safely, so
one that contains a smoke problem is *refused*: the user must remove it.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mathq.datasets.problems import (
    Problem,
    ProblemSet,
    Suite,
    fetch_suite_file,
    read_problems_jsonl,
)
from mathq.errors import CalibrationError
from mathq.inputs import UnreadableInput, file_problem, read_text
from mathq.progress import ProgressCallback, no_progress
from mathq.recipes.prompt import ChatMessage, render_chat

if TYPE_CHECKING:
    from mathq.recipes.prompt import PromptSpec

CALIBRATION_SETS: tuple[Suite, ...] = (
    Suite("math-train", "MATH train", "HuggingFaceTB/math_tasks", "data/math/train.jsonl",
          "main", 7500,
          "MATH train split (Hendrycks et al.): competition problems with worked solutions",
          "MIT"),
    Suite("gsm8k-train", "GSM8K train", "HuggingFaceTB/math_tasks", "data/gsm8k/train.jsonl",
          "main", 7473,
          "GSM8K train split: grade-school word problems with worked solutions", "MIT"),
)
"""Named calibration sources on the Hub: train splits, disjoint from the graded test sets."""

DEFAULT_CALIBRATION = "math-train"
PLAIN_TEXT_SUFFIXES = (".txt", ".md", ".tex", ".text")
_GSM8K_CALC = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: not model text
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class CalibrationText:
    """The text an importance matrix is computed on, and where it came from.

    ``dataset`` goes into the imatrix file (``imatrix.datasets``) and the quantized GGUF's
    metadata. ``excluded`` are the ids of source problems dropped because the smoke suite
    grades them.
    """

    text: str
    dataset: str
    n_items: int
    excluded: tuple[str, ...]
    sha256: str


def normalise(text: str) -> str:
    """Whitespace runs -> one space, ends stripped: how problem statements are compared."""
    return _SPACE.sub(" ", text).strip()


def get_calibration_set(name: str) -> Suite | None:
    """The named calibration set, or None."""
    return next((s for s in CALIBRATION_SETS if s.name == name), None)


def _known() -> str:
    return ", ".join(s.name for s in CALIBRATION_SETS)


def calibration_problems(ref: str, progress: ProgressCallback = no_progress
                         ) -> tuple[list[Problem] | str, str]:
    """Problems (and their source) for a set name or JSONL path; text for a plain text file."""
    path = Path(ref)
    named_file = path.exists() or path.is_symlink() or "/" in ref
    if path.suffix.lower() in PLAIN_TEXT_SUFFIXES or (named_file and path.suffix == ""):
        try:
            return read_text(path), str(path)
        except UnreadableInput as e:
            raise CalibrationError(f"calibration file {e.describe(path)}",
                                   f"give a UTF-8 text file or one of {_known()}") from None
    if path.suffix.lower() in (".jsonl", ".json") or named_file:
        if (problem := file_problem(path)) is not None:
            raise CalibrationError(f"calibration file {path} {problem}",
                                   f"give an existing file or one of {_known()}")
        return read_problems_jsonl(path), str(path)
    suite = get_calibration_set(ref)
    if suite is None:
        raise CalibrationError(f"no calibration set named {ref!r}",
                               f"known sets: {_known()}; or give a .txt or .jsonl file")
    local, commit = fetch_suite_file(suite, progress=progress)
    return (read_problems_jsonl(local),
            f"{suite.repo_id}@{commit or suite.revision}/{suite.filename}")


def item_text(problem: Problem) -> tuple[str, str]:
    """A problem's statement and worked solution as calibration text.

    GSM8K solutions lose their ``<<48/2=24>>`` calculator notes and gain the boxed answer
    that DeepSeek's prompt asks for; MATH solutions already end in ``\\boxed{}``.
    """
    solution = _GSM8K_CALC.sub("", problem.solution).strip()
    if "\\boxed" not in solution and problem.answer:
        solution = (solution + "\n" if solution else "") + \
            f"The final answer is $\\boxed{{{problem.answer}}}$."
    return problem.problem.strip(), solution


def render_items(problems: list[Problem], spec: PromptSpec | None) -> str:
    """Lay problems out as one text: the recipe's prompt format, or plain blocks."""
    if spec is None:
        return "\n\n".join(f"{p}\n\n{s}" for p, s in map(item_text, problems))
    messages = []
    for problem in problems:
        p, s = item_text(problem)
        messages += [ChatMessage("user", p), ChatMessage("assistant", s)]
    return render_chat(spec, messages)


def overlapping(problems: list[Problem], smoke: ProblemSet) -> set[str]:
    """Ids of ``problems`` whose statement is one the smoke suite grades."""
    graded = {normalise(p.problem) for p in smoke.problems}
    return {p.id for p in problems if normalise(p.problem) in graded}


def check_text_overlap(text: str, source: str, smoke: ProblemSet) -> None:
    """Refuse plain calibration text that contains a graded problem statement."""
    flat = normalise(text)
    hits = [p for p in smoke.problems if normalise(p.problem) and normalise(p.problem) in flat]
    if hits:
        raise CalibrationError(
            f"{source} contains {len(hits)} problem(s) of the smoke set {smoke.name} "
            f"(first: {hits[0].id})",
            "remove them from the file, or calibrate on a problem file (.jsonl) or a named "
            "set, from which mathq drops graded problems itself")


def load_calibration(ref: str, progress: ProgressCallback = no_progress,
                     ) -> tuple[str | list[Problem], str]:
    """The calibration source read and checked on its own (an empty text is refused), so
    bad input is named before the smoke set is loaded."""
    loaded, source = calibration_problems(ref, progress)
    if isinstance(loaded, str) and not loaded.strip():
        raise CalibrationError(f"{source} is empty", "give a file with math text")
    return loaded, source


def build_calibration_text(ref: str, smoke: ProblemSet, *, spec: PromptSpec | None = None,
                           max_chars: int | None = None, seed: int = 0,
                           progress: ProgressCallback = no_progress,
                           preloaded: tuple[str | list[Problem], str] | None = None,
                           ) -> CalibrationText:
    """The calibration text for ``ref`` (or ``preloaded``, from :func:`load_calibration`),
    checked against (and cleaned of) ``smoke``.

    Problems are shuffled with ``seed`` (train files are often sorted by subject) and taken
    until the text reaches ``max_chars``, so a 100-chunk run does not render all of MATH.
    """
    loaded, source = preloaded or load_calibration(ref, progress)
    if isinstance(loaded, str):
        check_text_overlap(loaded, source, smoke)
        text = loaded[:max_chars] if max_chars else loaded
        return CalibrationText(text, source, 1, (), _sha(text))
    dropped = overlapping(loaded, smoke)
    kept = [p for p in loaded if p.id not in dropped]
    if not kept:
        raise CalibrationError(
            f"every problem of {source} is in the smoke set {smoke.name}",
            "calibrate on problems that are not graded, e.g. "
            f"--calibration {DEFAULT_CALIBRATION}")
    random.Random(seed).shuffle(kept)
    chosen: list[Problem] = []
    size = 0
    for p in kept:
        chosen.append(p)
        size += len(p.problem) + len(p.solution) + 32
        if max_chars is not None and size >= max_chars:
            break
    text = render_items(chosen, spec)
    return CalibrationText(text, source, len(chosen),
                           tuple(sorted(dropped)), _sha(text))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
