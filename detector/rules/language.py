"""The rule condition language: a subset of CEL, read into a syntax tree.

`parse` turns one condition into `Node`s or raises `SyntaxProblem` naming the column and what
was expected; `detector.rules.compiler` type-checks and compiles the tree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "INT_MAGNITUDE_MAX",
    "MAX_DEPTH",
    "Binary",
    "Call",
    "Cond",
    "Ident",
    "ListNode",
    "Lit",
    "Node",
    "Parser",
    "Select",
    "SyntaxProblem",
    "Unary",
    "parse",
    "tree_depth",
]


# --------------------------------------------------------------------------------------------
# Lexer and parser (CEL subset)


class SyntaxProblem(Exception):
    """A problem in one condition; the loader adds file and rule."""


_TOKEN_RE: Final = re.compile(
    r"""
     (?P<ws>\s+)
    |(?P<comment>//[^\n]*)
    |(?P<float>\d+\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\.\d+(?:[eE][+-]?\d+)?)
    |(?P<hex>0[xX][0-9a-fA-F]+)
    |(?P<int>\d+)
    |(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    |(?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<op>&&|\|\||==|!=|<=|>=|[<>!+\-*/%?:()\[\]{},.])
    """,
    re.VERBOSE,
)
_ESCAPES: Final = {
    "n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v",
    "\\": "\\", '"': '"', "'": "'", "`": "`", "?": "?",
}  # fmt: skip
_ESCAPE_RE: Final = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|.)")
_RESERVED: Final = frozenset(
    [
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
        "void",
        "while",
    ]
)
_KEYWORDS: Final = {"true": True, "false": False, "null": None}


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # number | string | ident | op | end
    text: str
    value: object
    column: int


def _unescape(body: str) -> str:
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code[0] in "xuU":
            return chr(int(code[1:], 16))
        if len(code) == 3:
            return chr(int(code, 8))
        if code in _ESCAPES:
            return _ESCAPES[code]
        raise SyntaxProblem(f"unknown escape sequence \\{code} in string")

    return _ESCAPE_RE.sub(one, body)


#: CEL's int is 64-bit; the literal 2**63 is allowed for `-9223372036854775808`, and
#: `compiler` refuses it unnegated.
INT_MAGNITUDE_MAX: Final = 2**63
#: More characters than any literal in range has (0x and 16 hex digits; 19 decimal digits):
#: longer literals are refused before int() sees them (it refuses beyond 4,300 digits).
_INT_TEXT_MAX: Final = 20


def _number(kind: str, text: str) -> int | float:
    """The value of a number literal CEL can hold: a 64-bit int or a finite double."""
    if kind == "float":
        value = float(text)
        if not math.isfinite(value):
            raise SyntaxProblem(f"number literal {text} is out of range (not finite)")
        return value
    if len(text) > _INT_TEXT_MAX:
        raise SyntaxProblem(
            f"integer literal of {len(text)} characters is out of range (64-bit integers)"
        )
    number = int(text, 16 if kind == "hex" else 10)
    if number > INT_MAGNITUDE_MAX:
        raise SyntaxProblem(f"integer literal {text} is out of range (64-bit integers)")
    return number


def _tokenize(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(source):
        match = _TOKEN_RE.match(source, position)
        if match is None:
            raise SyntaxProblem(
                f"syntax error at column {position + 1}: unexpected character {source[position]!r}"
            )
        kind = match.lastgroup or ""
        text = match.group()
        column = position + 1
        position = match.end()
        if kind in ("ws", "comment"):
            continue
        if kind in ("int", "hex", "float"):
            following = source[position : position + 1]
            if following in ("u", "U"):
                raise SyntaxProblem(f"unsigned integer literal {text}{following} is not supported")
            tokens.append(_Token("number", text, _number(kind, text), column))
        elif kind == "string":
            if tokens and tokens[-1].kind == "ident" and tokens[-1].text in ("r", "R", "b", "B"):
                raise SyntaxProblem(f"{tokens[-1].text}-prefixed string literals are not supported")
            tokens.append(_Token("string", text, _unescape(text[1:-1]), column))
        else:
            tokens.append(_Token(kind, text, None, column))
    tokens.append(_Token("end", "end of condition", None, len(source) + 1))
    return tokens


# AST nodes. Positions are kept out of them: problems name the construct instead.


@dataclass(frozen=True, slots=True)
class Lit:
    value: object


@dataclass(frozen=True, slots=True)
class Ident:
    name: str


@dataclass(frozen=True, slots=True)
class Select:
    operand: Node
    field: str


@dataclass(frozen=True, slots=True)
class Unary:
    op: str
    operand: Node


@dataclass(frozen=True, slots=True)
class Binary:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Cond:
    test: Node
    then: Node
    other: Node


@dataclass(frozen=True, slots=True)
class ListNode:
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Call:
    function: str
    target: Node | None
    args: tuple[Node, ...]


Node = Lit | Ident | Select | Unary | Binary | Cond | ListNode | Call

_RELATIONS: Final = frozenset({"==", "!=", "<", "<=", ">", ">=", "in"})


class Parser:
    """Recursive descent over CEL's grammar (cel-spec doc/langdef.md), minus maps and indexing."""

    def __init__(self, source: str) -> None:
        self.tokens = _tokenize(source)
        self.index = 0

    def parse(self) -> Node:
        node = self.expr()
        token = self.peek()
        if token.kind != "end":
            raise self.unexpected(token, "an operator or end of condition")
        return node

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def accept(self, text: str) -> bool:
        token = self.peek()
        if token.kind == "op" and token.text == text:
            self.index += 1
            return True
        if token.kind == "ident" and token.text == text == "in":
            self.index += 1
            return True
        return False

    def expect(self, text: str) -> None:
        if not self.accept(text):
            raise self.unexpected(self.peek(), repr(text))

    @staticmethod
    def unexpected(token: _Token, wanted: str) -> SyntaxProblem:
        found = token.text if token.kind == "end" else repr(token.text)
        return SyntaxProblem(
            f"syntax error at column {token.column}: expected {wanted}, found {found}"
        )

    def expr(self) -> Node:
        test = self.binary_level(0)
        if self.accept("?"):
            then = self.binary_level(0)
            self.expect(":")
            node: Node = Cond(test, then, self.expr())
        else:
            node = test
        return node

    _LEVELS: Final = (("||",), ("&&",), tuple(_RELATIONS), ("+", "-"), ("*", "/", "%"))

    def binary_level(self, level: int) -> Node:
        if level == len(self._LEVELS):
            return self.unary()
        node = self.binary_level(level + 1)
        while True:
            token = self.peek()
            is_op = token.kind == "op" or (token.kind == "ident" and token.text == "in")
            if not (is_op and token.text in self._LEVELS[level]):
                return node
            self.advance()
            node = Binary(token.text, node, self.binary_level(level + 1))

    def unary(self) -> Node:
        if self.accept("!"):
            return Unary("!", self.unary())
        if self.accept("-"):
            operand = self.unary()
            if isinstance(operand, Lit) and type(operand.value) in (int, float):
                return Lit(-operand.value)  # type: ignore[operator]
            return Unary("-", operand)
        return self.member()

    def member(self) -> Node:
        node = self.primary()
        while True:
            if self.accept("."):
                token = self.advance()
                if token.kind != "ident":
                    raise self.unexpected(token, "a field or method name")
                if self.accept("("):
                    node = Call(token.text, node, self.arguments())
                else:
                    node = Select(node, token.text)
            elif self.peek().text == "[" and self.peek().kind == "op":
                raise SyntaxProblem("index access x[...] is not supported")
            else:
                return node

    def arguments(self) -> tuple[Node, ...]:
        args: list[Node] = []
        if self.accept(")"):
            return ()
        while True:
            args.append(self.expr())
            if self.accept(")"):
                return tuple(args)
            self.expect(",")

    def primary(self) -> Node:
        token = self.advance()
        if token.kind in ("number", "string"):
            return Lit(token.value)
        if token.kind == "ident":
            if token.text in _KEYWORDS:
                return Lit(_KEYWORDS[token.text])
            if token.text in _RESERVED or token.text == "in":
                raise SyntaxProblem(f"reserved word {token.text!r} cannot be used here")
            if self.accept("("):
                return Call(token.text, None, self.arguments())
            return Ident(token.text)
        if token.kind == "op":
            if token.text == "(":
                node = self.expr()
                self.expect(")")
                return node
            if token.text == "[":
                items: list[Node] = []
                while not self.accept("]"):
                    items.append(self.expr())
                    if not self.accept(","):
                        self.expect("]")
                        break
                return ListNode(tuple(items))
            if token.text == "{":
                raise SyntaxProblem("map literals {...} are not supported")
            if token.text == ".":
                raise SyntaxProblem("leading-dot names (.x) are not supported")
        raise self.unexpected(token, "a value, name or '('")


#: Deeper conditions are rejected: nobody writes them, and Python's own parser has limits.
MAX_DEPTH: Final = 100


def tree_depth(node: Node) -> int:
    children: tuple[Node, ...]
    if isinstance(node, Select | Unary):
        children = (node.operand,)
    elif isinstance(node, Binary):
        children = (node.left, node.right)
    elif isinstance(node, Cond):
        children = (node.test, node.then, node.other)
    elif isinstance(node, ListNode):
        children = node.items
    elif isinstance(node, Call):
        children = node.args if node.target is None else (node.target, *node.args)
    else:
        return 1
    return 1 + max((tree_depth(child) for child in children), default=0)


def parse(source: str) -> Node:
    try:
        node = Parser(source).parse()
        depth = tree_depth(node)
    except RecursionError:
        depth = MAX_DEPTH + 1
    if depth > MAX_DEPTH:
        raise SyntaxProblem(f"condition is nested too deeply: more than {MAX_DEPTH} levels")
    return node
