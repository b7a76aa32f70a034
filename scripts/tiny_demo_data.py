"""Arithmetic word problems for mathq's tiny demo model, in DeepSeek's chat format.

The tiny demo model (models/tiny-demo) exists so that the whole pipeline (convert, quantize,
smoke test, report) runs offline on a model that really solves something. This module makes
its data: templated English word problems (addition, subtraction, small products and an
add-then-subtract two-step kind) with a short chain of thought and a boxed answer.

It needs nothing beyond the standard library, so tests can regenerate the training problems
and prove that the committed held-out set shares no problem text with them. Training problems
come from seeds ``TRAIN_SEED_BASE + i`` and held-out ones from ``HELDOUT_SEED``; on top of that
the training stream skips every text that is in the held-out set (see ``training_problems``).

Two more held-out files serve the demo's measurements, both written by running this module
(``python scripts/tiny_demo_data.py``, into ``models/tiny-demo/``) and both sharing no problem
with the training stream or with each other:

- ``problems-distractor.jsonl``: the demo recipe's smoke test, 400 problems of the four kinds
  (100 each) with one irrelevant sentence in front ("The sky is blue."), which the model never
  saw in training. The tiny model still solves about nine in ten at BF16, but the extra
  context is where a 2-bit model's errors show (see models/tiny-demo/README.md).
- ``kld-text.txt``: the demo recipe's ``[kld] corpus``, 120 plain problems of the training
  distribution rendered as the chat transcripts the model models ("User: ... Assistant:
  ..."), so KL divergence is measured on text of the model's own domain.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# DeepSeek's evaluation suffix (English), appended to every user turn, and the pieces of the
# chat template in tests/fixtures/deepseek-llm-tokenizer/tokenizer_config.json:
# bos + "User: " + content + "\n\n" + "Assistant:" (generation prompt), and for a reply
# "Assistant: " + content + eos.
COT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

HELDOUT_SEED = 20240207
TRAIN_SEED_BASE = 1_000_000
DRILL_SEED = 7_000_000
HELDOUT_SIZE = 200
TRAIN_SIZE = 60_000
DRILL_LINES = 8

NAMES = (
    ("Alice", "She"), ("Ben", "He"), ("Carla", "She"), ("David", "He"), ("Emma", "She"),
    ("Felix", "He"), ("Grace", "She"), ("Henry", "He"), ("Isla", "She"), ("Jack", "He"),
    ("Kate", "She"), ("Leo", "He"), ("Maya", "She"), ("Noah", "He"), ("Olivia", "She"),
    ("Peter", "He"), ("Rosa", "She"), ("Sam", "He"), ("Tara", "She"), ("Umar", "He"),
    ("Vera", "She"), ("Will", "He"), ("Yara", "She"), ("Zack", "He"),
)
OBJECTS = (
    "apples", "pencils", "marbles", "stickers", "books", "cookies", "coins", "shells",
    "cards", "stamps", "balloons", "flowers", "eggs", "oranges", "crayons", "beads",
    "rocks", "candies", "buttons", "toy cars", "lemons", "feathers", "ribbons", "keys",
)

# One-step templates. {a} and {b} are the operands in the order the chain of thought uses them.
ADD = (
    "{A} has {a} {obj}. {P} buys {b} more {obj}. How many {obj} does {A} have now?",
    "{A} picked {a} {obj} in the morning and {b} {obj} in the afternoon. "
    "How many {obj} did {A} pick in all?",
    "There are {a} {obj} in a box. {A} puts {b} more {obj} into the box. "
    "How many {obj} are in the box now?",
    "{A} has {a} {obj} and {B} has {b} {obj}. How many {obj} do they have together?",
    "{A} found {a} {obj} on Monday and {b} {obj} on Tuesday. "
    "How many {obj} did {A} find altogether?",
    "A shop sold {a} {obj} before lunch and {b} {obj} after lunch. "
    "How many {obj} did the shop sell that day?",
)
SUB = (
    "{A} has {a} {obj}. {P} gives {b} {obj} to {B}. How many {obj} does {A} have left?",
    "There are {a} {obj} on a table. {A} takes {b} of them. "
    "How many {obj} are still on the table?",
    "{A} had {a} {obj} and lost {b} of them. How many {obj} does {A} have now?",
    "{A} has {a} {obj} and {B} has {b} {obj}. How many more {obj} does {A} have than {B}?",
    "A jar holds {a} {obj}. {A} uses {b} of them. How many {obj} remain in the jar?",
)
MUL = (
    "{A} has {a} bags with {b} {obj} in each bag. How many {obj} does {A} have in total?",
    "There are {a} boxes and each box holds {b} {obj}. How many {obj} are there in all?",
    "{A} buys {a} packs of {obj}. Each pack has {b} {obj}. How many {obj} did {A} buy?",
    "{A} makes {a} rows of {obj} with {b} {obj} in each row. How many {obj} are there?",
)
# Two-step: a + b, then minus c.
ADD_SUB = (
    "{A} has {a} {obj}. {P} buys {b} more and then gives {c} to {B}. "
    "How many {obj} does {A} have now?",
    "There are {a} {obj} in a basket. {A} adds {b} more, and then {B} takes {c}. "
    "How many {obj} are in the basket now?",
    "{A} collected {a} {obj} last week and {b} {obj} this week. {P} gave away {c} of them. "
    "How many {obj} does {A} have left?",
)

# Held-out text beyond problems.jsonl (see the module docstring).
DISTRACTOR_SEED = 20240301
DISTRACTOR_PER_KIND = 100
KLD_SEED = 20240302
KLD_PROBLEMS = 120
# Sentences with no number and nothing to do with the question, one put before each
# problem of the distractor set.
DISTRACTORS = (
    "It is a sunny day.", "The weather is nice today.", "Everyone is happy.",
    "The park is very quiet.", "Lunch is at noon.", "The sky is blue.",
    "Music is playing in the hall.", "The school bus is late.", "A cat sleeps on the sofa.",
    "The wind is cold this morning.", "It rained all night.", "The shop opens early.",
)
SUBJECTS = {"add": "Addition", "sub": "Subtraction", "mul": "Multiplication",
            "add_sub": "Two-step"}

KINDS = ("add", "sub", "mul", "add_sub")
# Sampling weights: the two-step kind is the hardest, so it gets the largest share.
KIND_WEIGHTS = (3, 3, 2, 4)


@dataclass(frozen=True)
class Problem:
    """One word problem with its chain of thought and answer."""

    kind: str
    problem: str
    solution: str
    answer: str

    @property
    def level(self) -> int:
        """MATH-style difficulty: one-step sums and differences are 1, the rest 2."""
        return 1 if self.kind in ("add", "sub") else 2


def make_problem(rng: random.Random, kind: str | None = None) -> Problem:
    """Draw one problem from ``rng``; the same generator state always gives the same one.

    ``kind`` fixes the kind instead of drawing it (with the usual weights).
    """
    if kind is None:
        kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
    (name, pron), (other, _) = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    if kind == "add":
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        steps, answer = [f"{a} + {b} = {a + b}."], a + b
        template, c = rng.choice(ADD), 0
    elif kind == "sub":
        a = rng.randint(3, 21)
        b = rng.randint(1, a - 1)
        steps, answer = [f"{a} - {b} = {a - b}."], a - b
        template, c = rng.choice(SUB), 0
    elif kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        steps, answer = [f"{a} \\times {b} = {a * b}."], a * b
        template, c = rng.choice(MUL), 0
    else:
        a, b = rng.randint(3, 12), rng.randint(2, 9)
        c = rng.randint(1, a + b - 1)
        steps, answer = [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."], a + b - c
        template = rng.choice(ADD_SUB)
    text = template.format(A=name, P=pron, B=other, obj=obj, a=a, b=b, c=c)
    solution = "\n".join([*steps, f"The final answer is $\\boxed{{{answer}}}$."])
    return Problem(kind=kind, problem=text, solution=solution, answer=str(answer))


def heldout_problems(n: int = HELDOUT_SIZE) -> list[Problem]:
    """The held-out problem set: ``n`` distinct problems from one seed."""
    rng = random.Random(HELDOUT_SEED)
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < n:
        p = make_problem(rng)
        if p.problem not in seen:
            seen.add(p.problem)
            out.append(p)
    return out


def training_problems(n: int, exclude: set[str]) -> Iterator[Problem]:
    """``n`` training problems, problem ``i`` drawn from seed ``TRAIN_SEED_BASE + i``.

    Seeds that happen to produce a held-out text (``exclude``) are skipped, so the problem
    set stays held out even though both come from the same templates.
    """
    made, seed = 0, TRAIN_SEED_BASE
    while made < n:
        p = make_problem(random.Random(seed))
        seed += 1
        if p.problem in exclude:
            continue
        made += 1
        yield p


def drill_sheets(n: int, lines: int = DRILL_LINES,
                 seed: int = DRILL_SEED) -> Iterator[list[tuple[str, str]]]:
    """``n`` drill sheets of ``lines`` equations, each split as ("27 + 23 =", " 50.").

    The equations are the chain-of-thought steps of freshly drawn problems (from ``seed``),
    so they follow the word problems' number ranges; the problem texts are dropped. Training
    on sheets of bare equations gives the model several times more arithmetic per token than
    the word problems alone, whose prompts are mostly boilerplate.
    """
    rng = random.Random(seed)
    for _ in range(n):
        sheet: list[tuple[str, str]] = []
        while len(sheet) < lines:
            for step in make_problem(rng).solution.split("\n")[:-1]:
                lhs, rhs = step.split(" = ")
                sheet.append((lhs + " =", " " + rhs))
        yield sheet[:lines]


def user_message(problem: str) -> str:
    """The user turn: the problem with DeepSeek's chain-of-thought suffix."""
    return problem + COT_SUFFIX


def prompt_text(problem: str) -> str:
    """DeepSeek's chat prompt up to the generation point, BOS included."""
    return f"{BOS}User: {user_message(problem)}\n\nAssistant:"


def reply_text(solution: str) -> str:
    """What the model is trained to write after the prompt: space, solution, EOS."""
    return f" {solution}{EOS}"


def to_math_record(p: Problem, index: int) -> dict[str, object]:
    """A row in MATH's JSONL format (problem, solution, answer, subject, level, unique_id)."""
    return {
        "problem": p.problem,
        "solution": p.solution,
        "answer": p.answer,
        "subject": "Prealgebra",
        "level": p.level,
        "unique_id": f"tiny-demo/prealgebra/{index}.json",
    }


def write_problem_set(path: Path, problems: list[Problem]) -> None:
    """Write ``problems`` as MATH-style JSONL, one object per line."""
    lines = [json.dumps(to_math_record(p, i), ensure_ascii=False) for i, p in
             enumerate(problems)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def training_texts() -> set[str]:
    """Every problem text of the training stream (60,000 problems)."""
    held = {p.problem for p in heldout_problems()}
    return {p.problem for p in training_problems(TRAIN_SIZE, held)}


def distractor_problems(exclude: set[str]) -> list[Problem]:
    """The distractor set: ``DISTRACTOR_PER_KIND`` problems of each kind, in turn, each with
    one of :data:`DISTRACTORS` in front. A problem whose plain text is in ``exclude`` (the
    training stream, problems.jsonl) or already drawn is skipped."""
    rng = random.Random(DISTRACTOR_SEED)
    seen: set[str] = set()
    out: list[Problem] = []
    counts = dict.fromkeys(KINDS, 0)
    while min(counts.values()) < DISTRACTOR_PER_KIND:
        for kind in KINDS:
            if counts[kind] >= DISTRACTOR_PER_KIND:
                continue
            p = make_problem(rng, kind)
            lead = rng.choice(DISTRACTORS)
            if p.problem in exclude or p.problem in seen:
                continue
            seen.add(p.problem)
            counts[kind] += 1
            out.append(Problem(kind=kind, problem=f"{lead} {p.problem}", solution=p.solution,
                               answer=p.answer))
    return out


def without_distractor(text: str) -> str:
    """A distractor problem's text without its leading sentence."""
    lead = next(d for d in DISTRACTORS if text.startswith(d + " "))
    return text[len(lead) + 1:]


def kld_problems(exclude: set[str]) -> list[Problem]:
    """``KLD_PROBLEMS`` distinct problems of the training distribution, none in ``exclude``."""
    rng = random.Random(KLD_SEED)
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < KLD_PROBLEMS:
        p = make_problem(rng)
        if p.problem not in exclude and p.problem not in seen:
            seen.add(p.problem)
            out.append(p)
    return out


def transcript(p: Problem) -> str:
    """A problem as the chat text the model is trained on, without BOS/EOS (special tokens
    are not parsed from a KL-divergence corpus)."""
    return f"User: {user_message(p.problem)}\n\nAssistant: {p.solution}"


def kld_text(problems: list[Problem]) -> str:
    """The KL-divergence corpus: transcripts separated by blank lines, ending in a newline."""
    return "\n\n".join(transcript(p) for p in problems) + "\n"


def to_subject_record(p: Problem, index: int, prefix: str) -> dict[str, object]:
    """A MATH-style row whose subject names the kind (Addition, ..., Two-step)."""
    row = to_math_record(p, index)
    row["subject"] = SUBJECTS[p.kind]
    row["unique_id"] = f"tiny-demo/{prefix}/{index}.json"
    return row


def write_demo_files(folder: Path) -> tuple[Path, Path]:
    """Write problems-distractor.jsonl and kld-text.txt into ``folder``."""
    heldout = {p.problem for p in heldout_problems()}
    training = training_texts()
    distractor = distractor_problems(training | heldout)
    plain = {without_distractor(p.problem) for p in distractor}
    kld = kld_problems(training | heldout | plain)
    jsonl = folder / "problems-distractor.jsonl"
    jsonl.write_text("\n".join(json.dumps(to_subject_record(p, i, "distractor"),
                                         ensure_ascii=False)
                               for i, p in enumerate(distractor)) + "\n", encoding="utf-8")
    text = folder / "kld-text.txt"
    text.write_text(kld_text(kld), encoding="utf-8")
    return jsonl, text


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else \
        Path(__file__).resolve().parent.parent / "models" / "tiny-demo"
    for written in write_demo_files(target):
        print(written)
