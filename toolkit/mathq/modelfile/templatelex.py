"""Go's text/template lexer, in Python: template text into items (text, delimiters,
identifiers, fields, variables, literals, keywords), stopping at the first error with Go's
message. It follows ``text/template/parse/lex.go`` (read, not copied) state by state; the
parser in :mod:`mathq.modelfile.templatesyntax` reads its items.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

#: Go's template keywords (lex.go's ``key`` table, bar ".").
KEYWORDS = ("block", "break", "continue", "define", "else", "end", "if", "range", "nil",
            "template", "with")
_SPACE = " \t\r\n"
_TERMINATORS = ".,|:)("


@dataclass
class Item:
    """One lexer item: its type, its text and the line it starts on."""

    typ: str  # error, bool, char, charconst, complex, assign, declare, eof, field, ident,
    # ldelim, lparen, number, pipe, rawstring, rdelim, rparen, space, string, text, variable,
    # dot, or a keyword
    val: str
    line: int

    def describe(self) -> str:
        """The item as Go's parser names it in an error message."""
        if self.typ == "eof":
            return "EOF"
        if self.typ == "error":
            return self.val
        if self.typ in KEYWORDS or self.typ == "dot":
            return f"<{self.val}>"
        return go_quote(self.val if len(self.val) <= 10 else self.val[:10]) + (
            "..." if len(self.val) > 10 else "")


def go_quote(s: str) -> str:
    """Go's %q of a string (enough of it for error messages)."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x80 else f"\\u{ord(ch):04x}")
    return '"' + "".join(out) + '"'


def _is_alnum(ch: str) -> bool:
    return ch == "_" or ch.isalpha() or unicodedata.category(ch) == "Nd"


def _rune(ch: str) -> str:
    return f"U+{ord(ch):04X} '{ch}'" if ch.isprintable() else f"U+{ord(ch):04X}"


class Lexer:
    """Go's lexer: text and actions into items, stopping after the first error."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.pos = self.start = 0
        self.line = self.start_line = 1
        self.items: list[Item] = []
        self.paren_depth = 0

    # -- helpers
    def next(self) -> str:
        if self.pos >= len(self.s):
            self.pos = len(self.s) + 1  # past the end: backup() returns to len
            return ""
        ch = self.s[self.pos]
        self.pos += 1
        if ch == "\n":
            self.line += 1
        return ch

    def backup(self) -> None:
        if self.pos > len(self.s):
            self.pos = len(self.s)
            return
        if self.pos > 0:
            self.pos -= 1
            if self.s[self.pos] == "\n":
                self.line -= 1

    def peek(self) -> str:
        return self.s[self.pos] if self.pos < len(self.s) else ""

    def emit(self, typ: str) -> None:
        self.items.append(Item(typ, self.s[self.start:self.pos], self.start_line))
        self.start, self.start_line = self.pos, self.line

    def ignore(self) -> None:
        self.line += self.s.count("\n", self.start, self.pos)
        self.start, self.start_line = self.pos, self.line

    def error(self, message: str) -> None:
        self.items.append(Item("error", message, self.start_line))

    def accept(self, valid: str) -> bool:
        ch = self.next()
        if ch and ch in valid:
            return True
        self.backup()
        return False

    def accept_run(self, valid: str) -> None:
        while (ch := self.next()) and ch in valid:
            pass
        self.backup()

    def at_right_delim(self) -> tuple[bool, bool]:
        s, p = self.s, self.pos
        if s[p:p + 2] in (" -", "\t-", "\r-", "\n-") and s.startswith("}}", p + 2):
            return True, True
        return s.startswith("}}", p), False

    def at_terminator(self) -> bool:
        ch = self.peek()
        return ch == "" or ch in _SPACE or ch in _TERMINATORS or self.s.startswith("}}", self.pos)

    # -- states
    def run(self) -> list[Item]:
        """Lex the whole text: the items up to EOF, or up to and including an error."""
        state = self.lex_text
        while state is not None:
            state = state()
        return self.items

    def lex_text(self):
        x = self.s.find("{{", self.pos)
        if x >= 0:
            self.pos = x
            trim = 0
            if _left_trim(self.s, x + 2):
                seg = self.s[self.start:x]
                trim = len(seg) - len(seg.rstrip(_SPACE))
            self.pos -= trim
            if self.pos > self.start:
                self.line += self.s.count("\n", self.start, self.pos)
                self.emit("text")
            self.pos += trim
            self.ignore()
            return self.lex_left_delim
        self.pos = len(self.s)
        if self.pos > self.start:
            self.line += self.s.count("\n", self.start, self.pos)
            self.emit("text")
        self.emit("eof")
        return None

    def lex_left_delim(self):
        self.pos += 2
        trim = _left_trim(self.s, self.pos)
        after = 2 if trim else 0
        if self.s.startswith("/*", self.pos + after):
            self.pos += after
            self.ignore()
            return self.lex_comment
        self.emit("ldelim")
        self.pos += after
        self.ignore()
        self.paren_depth = 0
        return self.lex_inside_action

    def lex_comment(self):
        self.pos += 2
        i = self.s.find("*/", self.pos)
        if i < 0:
            self.error("unclosed comment")
            return None
        self.pos = i + 2
        delim, trim = self.at_right_delim()
        if not delim:
            self.error("comment ends before closing delimiter")
            return None
        if trim:
            self.pos += 2
        self.pos += 2
        if trim:
            rest = self.s[self.pos:]
            self.pos += len(rest) - len(rest.lstrip(_SPACE))
        self.ignore()
        return self.lex_text

    def lex_right_delim(self):
        trim = self.s[self.pos:self.pos + 1] in tuple(_SPACE) and \
            self.s[self.pos + 1:self.pos + 2] == "-"
        if trim:
            self.pos += 2
            self.ignore()
        self.pos += 2
        self.emit("rdelim")
        if trim:
            rest = self.s[self.pos:]
            self.pos += len(rest) - len(rest.lstrip(_SPACE))
            self.ignore()
        return self.lex_text

    def lex_inside_action(self):
        delim, _ = self.at_right_delim()
        if delim:
            if self.paren_depth == 0:
                return self.lex_right_delim
            self.error("unclosed left paren")
            return None
        ch = self.next()
        if ch == "":
            self.error("unclosed action")
            return None
        if ch in _SPACE:
            self.backup()
            return self.lex_space
        if ch == "=":
            self.emit("assign")
        elif ch == ":":
            if self.next() != "=":
                self.error("expected :=")
                return None
            self.emit("declare")
        elif ch == "|":
            self.emit("pipe")
        elif ch == '"':
            return self.lex_quote
        elif ch == "`":
            return self.lex_raw_quote
        elif ch == "$":
            return self.lex_variable
        elif ch == "'":
            return self.lex_char
        elif ch == "." and self.pos < len(self.s) and not "0" <= self.s[self.pos] <= "9":
            return self.lex_field
        elif ch in "+-." or "0" <= ch <= "9":
            self.backup()
            return self.lex_number
        elif _is_alnum(ch):
            self.backup()
            return self.lex_identifier
        elif ch == "(":
            self.emit("lparen")
            self.paren_depth += 1
        elif ch == ")":
            self.emit("rparen")
            self.paren_depth -= 1
            if self.paren_depth < 0:
                self.error(f"unexpected right paren {_rune(ch)}")
                return None
        elif " " <= ch <= "~":
            self.emit("char")
        else:
            self.error(f"unrecognized character in action: {_rune(ch)}")
            return None
        return self.lex_inside_action

    def lex_space(self):
        n = 0
        while (ch := self.peek()) and ch in _SPACE:
            self.next()
            n += 1
        p = self.pos - 1
        if self.s[p:p + 1] in tuple(_SPACE) and self.s[p + 1:p + 2] == "-" \
                and self.s.startswith("}}", p + 2):
            self.backup()
            if n == 1:
                return self.lex_right_delim
        self.emit("space")
        return self.lex_inside_action

    def lex_identifier(self):
        while True:
            ch = self.next()
            if ch and _is_alnum(ch):
                continue
            self.backup()
            word = self.s[self.start:self.pos]
            if not self.at_terminator():
                self.error(f"bad character {_rune(ch)}")
                return None
            if word in KEYWORDS:
                self.emit(word)
            elif word[0] == ".":
                self.emit("field")
            elif word in ("true", "false"):
                self.emit("bool")
            else:
                self.emit("ident")
            return self.lex_inside_action

    def lex_field(self):
        return self._field_or_variable("field")

    def lex_variable(self):
        if self.at_terminator():
            self.emit("variable")
            return self.lex_inside_action
        return self._field_or_variable("variable")

    def _field_or_variable(self, typ: str):
        if self.at_terminator():
            self.emit("variable" if typ == "variable" else "dot")
            return self.lex_inside_action
        while True:
            ch = self.next()
            if not (ch and _is_alnum(ch)):
                self.backup()
                break
        if not self.at_terminator():
            self.error(f"bad character {_rune(ch)}")
            return None
        self.emit(typ)
        return self.lex_inside_action

    def _quoted(self, closing: str, what: str, typ: str):
        while True:
            ch = self.next()
            if ch == "\\":
                ch = self.next()
                if ch and ch != "\n":
                    continue
                self.error(f"unterminated {what}")
                return None
            if ch in ("", "\n"):
                self.error(f"unterminated {what}")
                return None
            if ch == closing:
                break
        self.emit(typ)
        return self.lex_inside_action

    def lex_char(self):
        return self._quoted("'", "character constant", "charconst")

    def lex_quote(self):
        return self._quoted('"', "quoted string", "string")

    def lex_raw_quote(self):
        end = self.s.find("`", self.pos)
        if end < 0:
            self.pos = len(self.s)
            self.error("unterminated raw quoted string")
            return None
        self.line += self.s.count("\n", self.pos, end + 1)
        self.pos = end + 1
        self.emit("rawstring")
        return self.lex_inside_action

    def lex_number(self):
        if not self._scan_number():
            self.error(f"bad number syntax: {go_quote(self.s[self.start:self.pos])}")
            return None
        if self.peek() in ("+", "-"):
            if not self._scan_number() or self.s[self.pos - 1] != "i":
                self.error(f"bad number syntax: {go_quote(self.s[self.start:self.pos])}")
                return None
            self.emit("complex")
        else:
            self.emit("number")
        return self.lex_inside_action

    def _scan_number(self) -> bool:
        self.accept("+-")
        digits = "0123456789_"
        if self.accept("0"):
            if self.accept("xX"):
                digits = "0123456789abcdefABCDEF_"
            elif self.accept("oO"):
                digits = "01234567_"
            elif self.accept("bB"):
                digits = "01_"
        self.accept_run(digits)
        if self.accept("."):
            self.accept_run(digits)
        if len(digits) == 11 and self.accept("eE"):
            self.accept("+-")
            self.accept_run("0123456789_")
        if len(digits) == 23 and self.accept("pP"):
            self.accept("+-")
            self.accept_run("0123456789_")
        self.accept("i")
        ch = self.peek()
        if ch and _is_alnum(ch):
            self.next()
            return False
        return True


def _left_trim(s: str, at: int) -> bool:
    return s[at:at + 1] == "-" and s[at + 1:at + 2] in tuple(_SPACE) and at + 1 < len(s)


