"""Go's ``text/template`` parser, in Python: does Ollama accept a TEMPLATE, and if not, where not.

Ollama parses a Modelfile's TEMPLATE with ``template.New("").Option("missingkey=zero")
.Funcs(funcs).Parse(text)`` when the model is created, so every error Go's parser reports
is an error ``ollama create`` reports. This module follows Go's own lexer and parser
(``text/template/parse``: ``lex.go`` and ``parse.go``, read, not copied) state by state:
actions and their trim markers, comments, pipelines with declarations and parenthesised
sub-pipelines, the block keywords (if, else, else if, range with break/continue, with,
define, block, template, end), string, raw-string, character and number literals, and the
check that every function an action calls is defined, either one of Go's built-ins or one
of Ollama's own. Errors carry the line Go names and Go's wording.

``tests/test_gotemplate.py`` runs Go's parser on a table of templates and checks that this
one accepts and refuses the same ones, at the same line.
"""


from __future__ import annotations

import re
from dataclasses import dataclass, field

from mathq.modelfile.templatelex import Item, Lexer, go_quote

#: Functions text/template defines for every template (text/template/funcs.go, builtins()).
GO_BUILTIN_FUNCS = ("and", "call", "html", "index", "slice", "js", "len", "not", "or", "print",
                    "printf", "println", "urlquery", "eq", "ge", "gt", "le", "lt", "ne")
#: Functions Ollama adds (template/template.go, ``funcs``): json, currentDate,
#: yesterdayDate and toTypeScriptType.
OLLAMA_FUNCS = ("json", "currentDate", "yesterdayDate", "toTypeScriptType")
#: Block and parenthesis nesting this parser follows (Go's has no fixed limit); deeper
#: templates are reported rather than overflowing Python's stack.
MAX_NESTING = 100


class TemplateSyntaxError(ValueError):
    """Go's parser refuses the template: ``line`` (1-based, in the template) and Go's words."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"{line}: {message}")
        self.line = line
        self.message = message


# ---------------------------------------------------------------------------------------
# Literals, checked as Go's strconv checks them

_ESCAPES = "abfnrtv\\"
_GO_INT = re.compile(r"[+-]?(?:0[xX](?:_?[0-9a-fA-F])+|0[oO](?:_?[0-7])+|0[bB](?:_?[01])+|"
                     r"0(?:_?[0-7])*|[1-9](?:_?[0-9])*)")
_GO_DEC_FLOAT = re.compile(r"[+-]?(?:(?:[0-9](?:_?[0-9])*)?\.?(?:[0-9](?:_?[0-9])*)?)"
                           r"(?:[eE][+-]?[0-9](?:_?[0-9])*)?")
_GO_HEX_FLOAT = re.compile(r"[+-]?0[xX](?:_?[0-9a-fA-F])*\.?(?:[0-9a-fA-F](?:_?[0-9a-fA-F])*)?"
                           r"[pP][+-]?[0-9](?:_?[0-9])*")


def _unquote_error(literal: str) -> str | None:
    """What strconv.Unquote says about a Go string or character literal, or None if valid."""
    quote, body = literal[0], literal[1:-1]
    if quote == "`":
        return None
    i = 0
    count = 0
    while i < len(body):
        ch = body[i]
        if ch == quote:
            return "invalid syntax"
        if ch != "\\":
            i += 1
            count += 1
            continue
        esc = body[i + 1:i + 2]
        if esc in _ESCAPES or esc == quote:
            i += 2
        elif esc == "x":
            if not re.fullmatch(r"[0-9a-fA-F]{2}", body[i + 2:i + 4]):
                return "invalid syntax"
            i += 4
        elif esc in "01234567" and esc:
            if not re.fullmatch(r"[0-7]{3}", body[i + 1:i + 4]) or int(body[i + 1:i + 4], 8) > 255:
                return "invalid syntax"
            i += 4
        elif esc in ("u", "U"):
            n = 4 if esc == "u" else 8
            hexd = body[i + 2:i + 2 + n]
            if not re.fullmatch(f"[0-9a-fA-F]{{{n}}}", hexd):
                return "invalid syntax"
            value = int(hexd, 16)
            if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                return "invalid syntax"
            i += 2 + n
        else:
            return "invalid syntax"
        count += 1
    if quote == "'" and count != 1:
        return "invalid syntax" if count == 0 else f"malformed character constant: {literal}"
    return None


def _go_int(text: str) -> int | None:
    """strconv.ParseInt(text, 0, 64)'s reading of a literal (any size), or None."""
    if not _GO_INT.fullmatch(text):
        return None
    sign = -1 if text[0] == "-" else 1
    digits = text.lstrip("+-").replace("_", "")
    if len(digits) > 1 and digits[0] == "0" and digits[1] in "01234567":
        return sign * int(digits, 8)  # Go's legacy octal: 0777
    return sign * int(digits, 0)


def _number_error(text: str, typ: str) -> str | None:
    """What Go's newNumber says about a number literal, or None if valid."""
    if typ == "charconst":
        return _unquote_error(text)
    if typ == "complex":
        return None

    def is_float(s: str) -> bool:
        return bool((_GO_DEC_FLOAT.fullmatch(s) and any(c.isdigit() for c in s))
                    or _GO_HEX_FLOAT.fullmatch(s))

    if text.endswith("i") and is_float(text[:-1]):
        return None
    value = _go_int(text)
    if value is not None:
        if -(2**63) <= value < 2**64:
            return None
        return f"integer overflow: {go_quote(text)}"
    if is_float(text):
        if not any(c in text for c in ".eEpP"):
            return f"integer overflow: {go_quote(text)}"
        return None
    return f"illegal number syntax: {go_quote(text)}"


# ---------------------------------------------------------------------------------------
# The parser

@dataclass
class _Node:
    kind: str  # text, action, if, range, with, template, end, else, break, continue,
    # comment, list, pipe, command and the argument kinds: bool, dot, nil, number,
    # string, field, variable, ident, chain
    line: int = 0
    children: list[_Node] = field(default_factory=list)
    pipe: _Node | None = None
    text: str = ""


class _Parser:
    """Go's recursive-descent parser over the lexer's items (three-token lookahead)."""

    def __init__(self, text: str, funcs: frozenset[str]) -> None:
        self.items = Lexer(text).run()
        self.i = 0
        self.seen = 0  # index of the last item fetched, whose line Go's errors name
        self.funcs = funcs
        self.vars: list[str] = ["$"]
        self.action_line = 0
        self.range_depth = 0
        self.defined: dict[str, bool] = {}  # template name -> non-empty
        self.template_calls_without_pipe: list[int] = []
        self.depth = 0

    # -- tokens
    def next(self) -> Item:
        item = self.items[min(self.i, len(self.items) - 1)]
        self.seen = max(self.seen, min(self.i, len(self.items) - 1))
        self.i += 1
        return item

    def backup(self, n: int = 1) -> None:
        self.i -= n

    def peek(self) -> Item:
        item = self.next()
        self.backup()
        return item

    def next_non_space(self) -> Item:
        while (item := self.next()).typ == "space":
            pass
        return item

    def peek_non_space(self) -> Item:
        item = self.next_non_space()
        self.backup()
        return item

    def errorf(self, message: str) -> None:
        raise TemplateSyntaxError(self.items[self.seen].line, message)

    def unexpected(self, item: Item, context: str) -> None:
        if item.typ == "error":
            extra = ""
            if self.action_line and self.action_line != item.line:
                extra = f" in action started at :{self.action_line}"
                if item.val.endswith(" action"):
                    extra = extra[len(" in action"):]
            self.errorf(f"{item.val}{extra}")
        self.errorf(f"unexpected {item.describe()} in {context}")

    def expect(self, *types: str, context: str) -> Item:
        item = self.next_non_space()
        if item.typ not in types:
            self.unexpected(item, context)
        return item

    # -- structure
    def parse(self) -> None:
        root: list[_Node] = []
        while self.peek().typ != "eof":
            if self.peek().typ == "ldelim":
                start = self.i
                self.next()
                if self.next_non_space().typ == "define":
                    self.parse_definition()
                    continue
                self.i = start
            node = self.text_or_action()
            if node.kind in ("end", "else"):
                self.errorf(f"unexpected {{{{{node.kind}}}}}")
            root.append(node)
        self.add("", root)

    def add(self, name: str, nodes: list[_Node]) -> None:
        non_empty = not _is_empty(nodes)
        if self.defined.get(name) and non_empty:
            self.errorf(f"template: multiple definition of template {go_quote(name)}")
        self.defined[name] = self.defined.get(name, False) or non_empty

    def parse_definition(self) -> None:
        context = "define clause"
        name_item = self.expect("string", "rawstring", context=context)
        name = self.unquote(name_item)
        self.expect("rdelim", context=context)
        saved_vars, self.vars = self.vars, ["$"]
        nodes, end = self.item_list()
        self.vars = saved_vars
        if end.kind != "end":
            self.errorf(f"unexpected {{{{{end.kind}}}}} in {context}")
        self.add(name, nodes)

    def item_list(self) -> tuple[list[_Node], _Node]:
        nodes: list[_Node] = []
        while self.peek_non_space().typ != "eof":
            node = self.text_or_action()
            if node.kind in ("end", "else"):
                return nodes, node
            nodes.append(node)
        self.errorf("unexpected EOF")
        raise AssertionError("unreachable")

    def text_or_action(self) -> _Node:
        item = self.next_non_space()
        if item.typ == "text":
            return _Node("text", item.line, text=item.val)
        if item.typ == "ldelim":
            self.action_line = item.line
            try:
                return self.action()
            finally:
                self.action_line = 0
        self.unexpected(item, "input")
        raise AssertionError("unreachable")

    def action(self) -> _Node:
        item = self.next_non_space()
        handler = {"block": self.block_control, "break": self.break_control,
                   "continue": self.continue_control, "else": self.else_control,
                   "end": self.end_control, "if": self.if_control,
                   "range": self.range_control, "template": self.template_control,
                   "with": self.with_control}.get(item.typ)
        if handler is not None:
            return handler(item)
        self.backup()
        line = self.peek().line
        return _Node("action", line, pipe=self.pipeline("command", "rdelim"))

    def break_control(self, item: Item) -> _Node:
        return self._loop_control(item, "break")

    def continue_control(self, item: Item) -> _Node:
        return self._loop_control(item, "continue")

    def _loop_control(self, item: Item, word: str) -> _Node:
        token = self.next_non_space()
        if token.typ != "rdelim":
            self.unexpected(token, f"{{{{{word}}}}}")
        if self.range_depth == 0:
            self.errorf(f"{{{{{word}}}}} outside {{{{range}}}}")
        return _Node(word, item.line)

    def pipeline(self, context: str, end: str) -> _Node:
        pipe = _Node("pipe", self.peek_non_space().line)
        declared = 0
        while self.peek_non_space().typ == "variable":
            start = self.i
            v = self.next_non_space()
            nxt = self.peek_non_space()
            if nxt.typ in ("assign", "declare"):
                self.next_non_space()
                self.vars.append(v.val)
                declared += 1
                break
            if nxt.typ == "char" and nxt.val == ",":
                self.next_non_space()
                self.vars.append(v.val)
                declared += 1
                if context == "range" and declared < 2:
                    if self.peek_non_space().typ in ("variable", "rdelim", "rparen"):
                        continue
                    self.errorf("range can only initialize variables")
                self.errorf(f"too many declarations in {context}")
            self.i = start
            break
        while True:
            item = self.next_non_space()
            if item.typ == end:
                self.check_pipeline(pipe, context)
                return pipe
            if item.typ in ("bool", "charconst", "complex", "dot", "field", "ident", "number",
                            "nil", "rawstring", "string", "variable", "lparen"):
                self.backup()
                pipe.children.append(self.command())
            else:
                self.unexpected(item, context)

    def check_pipeline(self, pipe: _Node, context: str) -> None:
        if not pipe.children:
            self.errorf(f"missing value for {context}")
        for stage, cmd in enumerate(pipe.children[1:], 2):
            if cmd.children[0].kind in ("bool", "dot", "nil", "number", "string"):
                self.errorf(f"non executable command in pipeline stage {stage}")

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise TemplateSyntaxError(self.items[self.seen].line, f"blocks or parentheses "
                                      f"nested deeper than {MAX_NESTING} levels, more than "
                                      "mathq checks; flatten the template")

    def parse_control(self, allow_else_if: bool, context: str) -> _Node:
        depth = len(self.vars)
        self.nest()
        try:
            pipe = self.pipeline(context, "rdelim")
            if context == "range":
                self.range_depth += 1
            body, nxt = self.item_list()
            if context == "range":
                self.range_depth -= 1
            else_list: list[_Node] = []
            if nxt.kind == "else":
                if allow_else_if and self.peek().typ == "if":
                    self.next()
                    else_list = [self.if_control(self.items[self.i - 1])]
                elif context == "with" and self.peek().typ == "with":
                    # {{else with}}: Go 1.23, which current Ollama is built with
                    self.next()
                    else_list = [self.with_control(self.items[self.i - 1])]
                else:
                    else_list, nxt = self.item_list()
                    if nxt.kind != "end":
                        self.errorf(f"expected end; found {{{{{nxt.kind}}}}}")
            return _Node(context, pipe.line, [*body, *else_list], pipe=pipe)
        finally:
            del self.vars[depth:]
            self.depth -= 1

    def if_control(self, _item: Item) -> _Node:
        return self.parse_control(True, "if")

    def range_control(self, _item: Item) -> _Node:
        return self.parse_control(False, "range")

    def with_control(self, _item: Item) -> _Node:
        return self.parse_control(False, "with")

    def end_control(self, _item: Item) -> _Node:
        return _Node("end", self.expect("rdelim", context="end").line)

    def else_control(self, _item: Item) -> _Node:
        peek = self.peek_non_space()
        if peek.typ in ("if", "with"):
            return _Node("else", peek.line)
        return _Node("else", self.expect("rdelim", context="else").line)

    def block_control(self, _item: Item) -> _Node:
        context = "block clause"
        token = self.next_non_space()
        name = self.template_name(token, context)
        pipe = self.pipeline(context, "rdelim")
        saved_vars, self.vars = self.vars, ["$"]
        self.nest()
        nodes, end = self.item_list()
        self.depth -= 1
        self.vars = saved_vars
        if end.kind != "end":
            self.errorf(f"unexpected {{{{{end.kind}}}}} in {context}")
        self.add(name, nodes)
        return _Node("template", token.line, pipe=pipe, text=name)

    def template_control(self, _item: Item) -> _Node:
        context = "template clause"
        token = self.next_non_space()
        name = self.template_name(token, context)
        pipe = None
        if self.next_non_space().typ != "rdelim":
            self.backup()
            pipe = self.pipeline(context, "rdelim")
        else:
            self.template_calls_without_pipe.append(token.line)
        return _Node("template", token.line, pipe=pipe, text=name)

    def template_name(self, token: Item, context: str) -> str:
        if token.typ in ("string", "rawstring"):
            return self.unquote(token)
        self.unexpected(token, context)
        raise AssertionError("unreachable")

    def unquote(self, item: Item) -> str:
        problem = _unquote_error(item.val)
        if problem:
            self.errorf(problem)
        return item.val[1:-1]

    def command(self) -> _Node:
        cmd = _Node("command", self.peek_non_space().line)
        while True:
            self.peek_non_space()
            operand = self.operand()
            if operand is not None:
                cmd.children.append(operand)
            token = self.next()
            if token.typ == "space":
                continue
            if token.typ in ("rdelim", "rparen"):
                self.backup()
            elif token.typ != "pipe":
                self.unexpected(token, "operand")
            break
        if not cmd.children:
            self.errorf("empty command")
        return cmd

    def operand(self) -> _Node | None:
        node = self.term()
        if node is None:
            return None
        if self.peek().typ == "field":
            while self.peek().typ == "field":
                self.next()
            if node.kind in ("bool", "string", "number", "nil", "dot"):
                self.errorf(f"unexpected . after term {go_quote(node.text)}")
            node = _Node(node.kind if node.kind in ("field", "variable") else "chain",
                         node.line)
        return node

    def term(self) -> _Node | None:
        item = self.next_non_space()
        typ = item.typ
        if typ == "ident":
            if item.val not in self.funcs:
                self.errorf(f"function {go_quote(item.val)} not defined")
            return _Node("ident", item.line, text=item.val)
        if typ == "dot":
            return _Node("dot", item.line, text=".")
        if typ == "nil":
            return _Node("nil", item.line, text="nil")
        if typ == "variable":
            name = item.val.split(".")[0]
            if name not in self.vars:
                self.errorf(f"undefined variable {go_quote(name)}")
            return _Node("variable", item.line, text=item.val)
        if typ == "field":
            return _Node("field", item.line, text=item.val)
        if typ == "bool":
            return _Node("bool", item.line, text=item.val)
        if typ in ("charconst", "complex", "number"):
            problem = _number_error(item.val, typ)
            if problem:
                self.errorf(problem)
            return _Node("number", item.line, text=item.val)
        if typ == "lparen":
            self.nest()
            pipe = self.pipeline("parenthesized pipeline", "rparen")
            self.depth -= 1
            return pipe
        if typ in ("string", "rawstring"):
            self.unquote(item)
            return _Node("string", item.line, text=item.val)
        self.backup()
        return None


def _is_empty(nodes: list[_Node]) -> bool:
    return all(n.kind == "text" and not n.text.strip() for n in nodes)


def parse_template(text: str, funcs: tuple[str, ...] = GO_BUILTIN_FUNCS + OLLAMA_FUNCS) -> None:
    """Parse ``text`` as Go's text/template would with these functions defined; raise
    :class:`TemplateSyntaxError` (Go's line and message) on the first error."""
    parser = _Parser(text, frozenset(funcs))
    parser.parse()


def ollama_template_problem(text: str) -> tuple[int, str] | None:
    """(line within the template, message) for the first thing ``ollama create`` refuses in a
    TEMPLATE, or None: Go's parse errors, then Ollama's own refusal of a ``{{template}}``
    call without a pipeline (its Vars() walk fails with "undefined template specified")."""
    parser = _Parser(text, frozenset(GO_BUILTIN_FUNCS + OLLAMA_FUNCS))
    try:
        parser.parse()
    except TemplateSyntaxError as e:
        return e.line, e.message
    if parser.template_calls_without_pipe:
        return (parser.template_calls_without_pipe[0],
                "{{template}} without a pipeline: Ollama refuses it (undefined template "
                "specified); pass one, e.g. {{template \"name\" .}}")
    return None
