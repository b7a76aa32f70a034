"""Read a Modelfile by Ollama's rules and say, line by line, what ``ollama create`` would refuse.

Ollama's parser is a small state machine with some sharp edges this module reproduces
(from ``parser/parser.go``, read, not copied):

- an instruction is a word at the start of a line, case-insensitive: FROM, PARAMETER,
  TEMPLATE, SYSTEM, ADAPTER, DRAFT, LICENSE, MESSAGE, RENDERER, PARSER, REQUIRES;
  ``#`` starts a comment only where an instruction could start;
- a value runs to the end of the line, spaces included, and is trimmed; ``#`` inside it
  is text, so ``PARAMETER temperature 0 # greedy`` is the value ``0 # greedy``;
- a value that starts with ``"`` or ``\"\"\"`` runs until a line ends with the closing
  quotes, across lines; there are no escapes, so a value can never hold ``\"\"\"`` safely;
- characters that are not printable (other than space, tab and newlines) are dropped
  without a word, so a no-break space in a template silently disappears.

Then ``create`` refuses what its later steps refuse: no FROM, a FROM path with no file behind
it (Ollama then takes it for a model name, which fails), a TEMPLATE Go's text/template parser
refuses (see :mod:`mathq.modelfile.templatesyntax`, reported at the Modelfile line of the
error), a parameter it does not know or cannot parse (see :mod:`mathq.modelfile.options`), a
MESSAGE role other than system, user or assistant, a REQUIRES that is not a version.
Problems that Ollama lets through but that are certainly mistakes (an ignored parameter, an
instruction given twice where only the last counts, BOS inside a template, a quoted value
whose closing quotes are missing so that it swallows the instructions after it) are reported
too. Line numbers count from 1 as editors do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mathq.errors import InputFileError
from mathq.fsutil import READ_HINT
from mathq.inputs import UnreadableInput, read_bytes
from mathq.modelfile.options import get_option, parameter_problem
from mathq.modelfile.templatesyntax import ollama_template_problem
from mathq.recipes.prompt import BOS

INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "DRAFT", "LICENSE",
                "MESSAGE", "RENDERER", "PARSER", "REQUIRES")
MESSAGE_ROLES = ("system", "user", "assistant")
_SINGLE = ("TEMPLATE", "SYSTEM", "ADAPTER", "RENDERER", "PARSER", "REQUIRES")
_SEMVER = re.compile(
    r"v?(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*)){0,2}(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")
_WHITESPACE = " \t\r\n"
# A line inside a triple-quoted value that starts like an instruction: the value's closing
# quotes are missing and it runs on until a later instruction's closing quotes.
_SWALLOWED = re.compile(r"^(?:" + "|".join(INSTRUCTIONS) + r")[ \t]", re.MULTILINE)


@dataclass(frozen=True)
class Command:
    """One instruction as Ollama reads it: ``name`` is the parameter name or message role."""

    instruction: str
    name: str
    value: str
    line: int


@dataclass(frozen=True)
class Problem:
    """Something ``ollama create`` would refuse (or silently get wrong), at a line."""

    line: int
    message: str


@dataclass(frozen=True)
class ParsedModelfile:
    """The commands read before the first syntax error, and the problems found."""

    commands: tuple[Command, ...]
    problems: tuple[Problem, ...]
    syntax_error: Problem | None = None
    triple_quoted: tuple[bool, ...] = ()

    def values(self, instruction: str) -> list[str]:
        """The values of every command of one instruction, in file order."""
        return [c.value for c in self.commands if c.instruction == instruction]

    def parameters(self) -> list[tuple[str, str]]:
        """``(name, value)`` of every PARAMETER line, in file order."""
        return [(c.name, c.value) for c in self.commands if c.instruction == "PARAMETER"]


@dataclass(frozen=True)
class ModelfileCheck:
    """The result of checking one file."""

    path: Path
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        """True when ``ollama create`` would accept the file as it is."""
        return not self.problems

    def lines(self) -> list[str]:
        """``file:line: problem`` lines, as compilers print them."""
        return [f"{self.path}:{p.line}: {p.message}" for p in self.problems]


def _unquote(text: str) -> tuple[str, bool]:
    """Ollama's quote rule: a value opened with quotes is complete once it ends with them."""
    if text.startswith('"""'):
        return (text[3:-3], True) if len(text) >= 6 and text.endswith('"""') else ("", False)
    if text.startswith('"'):
        return (text[1:-1], True) if len(text) >= 2 and text.endswith('"') else ("", False)
    return text, True


def _describe(ch: str) -> str:
    return f"U+{ord(ch):04X}"


class _Scanner:
    """Ollama's parser states, walked one character at a time with editor line numbers."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.commands: list[Command] = []
        self.quoted: list[bool] = []  # per command: its value was opened with """
        self.problems: list[Problem] = []
        self.syntax_error: Problem | None = None

    def word_at(self, start: int) -> str:
        end = start
        while end < len(self.text) and self.text[end] not in _WHITESPACE:
            end += 1
        return self.text[start:end]

    def run(self) -> None:
        """Walk the text; on the first syntax error record it and stop, as Ollama does."""
        text, state, buf = self.text, "nil", ""
        line, start_line, word_start, name_start = 1, 1, 0, 0
        instruction = name = ""
        i = 0
        while i < len(text):
            ch = text[i]
            newline = ch in "\r\n"
            if state == "nil":
                if ch == "#":
                    state = "comment"
                elif ch not in _WHITESPACE:
                    state, buf, start_line, word_start = "name", ch, line, i
            elif state == "comment":
                if newline:
                    state = "nil"
            elif state == "name":
                if ch.isascii() and ch.isalpha():
                    buf += ch
                elif ch in " \t" and buf.upper() in INSTRUCTIONS:
                    instruction, name, buf, name_start = buf.upper(), "", "", i + 1
                    state = {"PARAMETER": "parameter", "MESSAGE": "role"}.get(instruction,
                                                                            "value")
                elif newline and buf.upper() in INSTRUCTIONS:
                    return self.fail(start_line, f"{buf.upper()} has no value")
                else:
                    word = self.word_at(word_start)
                    return self.fail(start_line, f"unknown instruction {word!r}; expected one "
                                     f"of {', '.join(INSTRUCTIONS)}")
            elif state == "parameter":
                if ch.isascii() and (ch.isalnum() or ch == "_"):
                    buf += ch
                elif ch in " \t":
                    name, buf, state = buf, "", "value"
                elif newline:
                    return self.fail(start_line, f"PARAMETER {buf} has no value")
                else:
                    return self.fail(line, f"parameter name {self.word_at(name_start)!r} "
                                     "may hold only letters, digits and '_'")
            elif state == "role":
                if ch.isascii() and ch.isalpha():
                    buf += ch
                elif ch in " \t" and buf in MESSAGE_ROLES:
                    name, buf, state = buf, "", "value"
                else:
                    got = buf if ch in _WHITESPACE else buf + ch
                    return self.fail(start_line, "MESSAGE role must be system, user or "
                                     f"assistant, got {got!r}")
            elif state == "value":
                if newline or ch in " \t":
                    value, ok = _unquote(buf.strip(_WHITESPACE))
                    if ok and newline:
                        self.commands.append(Command(instruction, name, value, start_line))
                        self.quoted.append(buf.lstrip(_WHITESPACE).startswith('"""'))
                        state, buf = "nil", ""
                    else:
                        buf += ch
                elif ch.isprintable():
                    buf += ch
                else:
                    self.problems.append(Problem(line, f"{instruction} value contains "
                                                f"{_describe(ch)}, which Ollama drops"))
            if ch == "\n" or (ch == "\r" and text[i + 1:i + 2] != "\n"):
                line += 1
            i += 1
        if state == "value":
            value, ok = _unquote(buf.strip(_WHITESPACE))
            if not ok:
                quote = '"""' if buf.lstrip(_WHITESPACE).startswith('"""') else '"'
                return self.fail(start_line, f"{instruction} value opened with {quote} "
                                 "is never closed")
            self.commands.append(Command(instruction, name, value, start_line))
            self.quoted.append(buf.lstrip(_WHITESPACE).startswith('"""'))
        elif state == "name" and buf.upper() not in INSTRUCTIONS:
            return self.fail(start_line, f"unknown instruction {buf!r}; expected one of "
                             f"{', '.join(INSTRUCTIONS)}")
        elif state == "name":
            return self.fail(start_line, f"{buf.upper()} has no value")
        elif state in ("parameter", "role"):
            return self.fail(start_line, f"{instruction} has no value")

    def fail(self, line: int, message: str) -> None:
        self.syntax_error = Problem(line, message)
        self.problems.append(self.syntax_error)


def parse_modelfile(text: str) -> ParsedModelfile:
    """Read Modelfile text into commands, stopping at the first syntax error as Ollama does."""
    scanner = _Scanner(text.removeprefix("\ufeff"))
    scanner.run()
    return ParsedModelfile(tuple(scanner.commands), tuple(scanner.problems),
                           scanner.syntax_error, tuple(scanner.quoted))


def _command_problems(parsed: ParsedModelfile) -> list[Problem]:
    problems: list[Problem] = []
    if not any(c.instruction == "FROM" for c in parsed.commands):
        problems.append(Problem(1, "no FROM instruction; Ollama needs one"))
    first_seen: dict[str, int] = {}
    for c, triple in zip(parsed.commands, parsed.triple_quoted, strict=True):
        swallowed = _SWALLOWED.search(c.value) if triple and '"""' in c.value else None
        if swallowed:
            at = c.line + c.value.count("\n", 0, swallowed.start())
            line_text = c.value[swallowed.start():].split("\n", 1)[0]
            problems.append(Problem(c.line, f'{c.instruction} opened with """ is not closed '
                                    f"before line {at} ({line_text[:40]!r}), so Ollama reads "
                                    f'that line into its value; close it with """'))
            continue
        if c.instruction == "TEMPLATE" and (bad := ollama_template_problem(c.value)):
            problems.append(Problem(c.line + bad[0] - 1, f"TEMPLATE: {bad[1]}"))
        key = f"PARAMETER {c.name}" if c.instruction == "PARAMETER" else c.instruction
        single = c.instruction in _SINGLE or (
            c.instruction == "PARAMETER" and (opt := get_option(c.name)) is not None
            and opt.kind != "string_list")
        if single and key in first_seen:
            problems.append(Problem(c.line, f"{key} is given again (first on line "
                                    f"{first_seen[key]}); Ollama keeps only the last"))
        first_seen.setdefault(key, c.line)
        if c.instruction in ("FROM", "ADAPTER", "DRAFT") and not c.value:
            problems.append(Problem(c.line, f"{c.instruction} needs a model name or a path"))
        elif c.instruction == "PARAMETER" and (problem := parameter_problem(c.name, c.value)):
            problems.append(Problem(c.line, problem))
        elif c.instruction == "REQUIRES" and not _SEMVER.fullmatch(c.value):
            problems.append(Problem(c.line, f"REQUIRES needs a version such as 0.12.0, "
                                    f"got {c.value!r}"))
        elif c.instruction == "TEMPLATE" and BOS in c.value:
            problems.append(Problem(c.line, "TEMPLATE contains BOS; the tokenizer adds it, "
                                    "so every prompt would start with two"))
    return problems


def check_modelfile_text(text: str) -> tuple[Problem, ...]:
    """Every problem in Modelfile text: the first syntax error, or all semantic ones."""
    parsed = parse_modelfile(text)
    if parsed.syntax_error is not None:  # Ollama stops here; later lines are not commands
        return parsed.problems
    return tuple(sorted([*parsed.problems, *_command_problems(parsed)],
                        key=lambda p: p.line))


def _looks_like_path(value: str) -> bool:
    """A FROM value that can only be a path (a bare ``m.gguf`` is also a valid model name)."""
    return value.startswith(("/", "./", "../", "~", ".\\", "..\\"))


def _file_problems(path: Path, parsed: ParsedModelfile) -> list[Problem]:
    """FROM/ADAPTER/DRAFT paths that do not exist next to the Modelfile: Ollama takes such a
    value for a model name, and ``create`` fails."""
    problems = []
    for c in parsed.commands:
        if c.instruction in ("FROM", "ADAPTER", "DRAFT") and _looks_like_path(c.value):
            target = path.parent / Path(c.value).expanduser()
            if not target.exists():
                problems.append(Problem(c.line, f"{c.instruction} {c.value}: no such file "
                                        "(paths are relative to the Modelfile); build the "
                                        "GGUF first or fix the path"))
    return problems


#: A Modelfile is a page of text and a template; 16 MiB is no Modelfile.
MODELFILE_LIMIT = 16 << 20


def check_modelfile(path: Path) -> ModelfileCheck:
    """Check one Modelfile on disk, FROM paths included; an undecodable file is reported,
    a missing or unreadable one raised."""
    path = Path(path)
    try:
        data = read_bytes(path, MODELFILE_LIMIT)
    except UnreadableInput as e:
        raise InputFileError(f"cannot read Modelfile {e.describe(path)}", READ_HINT) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return ModelfileCheck(path, (Problem(line, "not valid UTF-8 (byte "
                                             f"0x{data[e.start]:02x}); save the file as "
                                             "UTF-8"),))
    problems = check_modelfile_text(text)
    parsed = parse_modelfile(text)
    if parsed.syntax_error is None:
        problems = tuple(sorted([*problems, *_file_problems(path, parsed)],
                                key=lambda p: p.line))
    return ModelfileCheck(path, problems)
