"""Declarative fraud rules: a YAML file of CEL conditions, compiled once into one Python function.

A rules file looks like::

    version: "2026-11-29.1"          # becomes the verdict's rules_version
    rules:
      - id: large-amount
        description: "Amount {amount} is over the limit of 1000"
        condition: amount > 1000
        action: block                # block | review | allow
        shadow: false                # optional: evaluated and reported, decision unchanged

Conditions are written in a subset of CEL (https://github.com/google/cel-spec):
literals (numbers, strings, true/false, null, lists), variables and `map.field` access,
``&& || !``, ``== != < <= > >=``, ``+ - * / %``, unary minus, ``x in [...]``, ``c ? a : b``,
``size()``, ``has(map.field)``, and the string methods ``startsWith endsWith contains matches``.
Anything else is rejected when the file is loaded, naming the construct.

Differences from full CEL, on purpose:
- one numeric type, ``number``: ints and doubles mix freely and ``/`` is true division
  (``7 / 2 == 3.5``); ``%`` truncates toward zero like CEL's int modulo;
- a condition whose evaluation touches a missing value (an absent optional field, a feature an
  entity has no history for) is false: the rule does not fire. Evaluation goes left to right
  with short-circuit ``&&``/``||``/``?:``, so ``has(by_customer.seconds_since_last) &&
  by_customer.seconds_since_last < 60`` is the way to test a value that may be missing.
  Division by zero, likewise, makes the condition false. Unlike CEL, ``&&`` and ``||`` do not
  absorb an error on their left: ``score > 0.9 || amount > 5000`` does not fire when there is no
  score; write ``(has(score) && score > 0.9) || amount > 5000``.
- ``has()`` also accepts a top-level name (``has(terminal_id)``): true when the value is present.

How it is fast: the loader parses each condition into a small AST, type-checks it against the
schema, and generates the source of ONE Python function that loads every referenced variable once
and tests every rule in turn. The generated code comes only from the whitelisted AST (names are
numbered locals, literals are ``repr`` of Python numbers and strings), never from user text, and
it is executed with empty builtins. A missing value is a sentinel whose every operation raises,
so a touched missing value aborts that one rule's test, which a per-rule ``try`` turns into
"did not fire". Every variable without which a rule cannot fire is checked up front, so the
common missing case (an entity without history) costs an identity test, not an exception.
``Ruleset.source`` shows the generated code.

Errors (all raised at load, never per transaction)::

    DetectorError
    └── ConfigError (ValueError)
        └── RulesError      the file is unusable; the message lists every problem, each naming
                            the file, the rule and the problem
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

import yaml

from detector.errors import RulesError

log = logging.getLogger(__name__)

#: Rule actions, most severe first: the order of reasons in a verdict.
ACTIONS: Final = ("block", "review", "allow")
_SEVERITY: Final = {action: rank for rank, action in enumerate(ACTIONS)}
_SCALAR_TYPES: Final = frozenset({"number", "string", "bool"})

#: Known variable names: top-level name -> "number" | "string" | "bool", or for a nested map
#: (an entity's features) a mapping of field name -> one of those types.
Schema = Mapping[str, "str | Mapping[str, str]"]


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated rule.

    Attributes:
        variables: the variables its condition references, dotted (``by_customer.count_1h``).
    """

    id: str
    description: str
    condition: str
    action: str
    shadow: bool
    variables: frozenset[str]


class Hit(NamedTuple):
    """A rule that fired on one transaction (immutable).

    A NamedTuple rather than a frozen dataclass: hits are built per transaction, and a tuple is
    several times cheaper to build.

    Attributes:
        description: the rule's description with its ``{placeholders}`` rendered.
        values: each variable the condition references, with its value (None when missing).
    """

    rule: str
    action: str
    description: str
    shadow: bool
    values: Mapping[str, object]

    def as_dict(self) -> dict[str, Any]:
        """The hit as a verdict reason: ``{rule, action, description, shadow, values}``."""
        return {
            "rule": self.rule,
            "action": self.action,
            "description": self.description,
            "shadow": self.shadow,
            "values": dict(self.values),
        }


class Evaluation(NamedTuple):
    """The outcome of a ruleset on one activation (immutable).

    Attributes:
        decision: ``allow`` | ``review`` | ``block``.
        hits: every rule that fired, shadow ones too, most severe first, file order within one
            action.
    """

    decision: str
    hits: tuple[Hit, ...] = ()


_NOTHING_FIRED: Final = Evaluation("allow", ())


# --------------------------------------------------------------------------------------------
# Missing values


class _MissingValueError(Exception):
    """Raised by any operation on a missing value; the rule that touched it does not fire."""


class _Missing:
    """The value of a variable the activation does not have (absent, None)."""

    __slots__ = ()

    def _touch(self, *_args: object) -> Any:
        raise _MissingValueError

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _touch
    __bool__ = __len__ = __hash__ = __neg__ = __pos__ = __iter__ = __contains__ = _touch
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _touch
    __truediv__ = __rtruediv__ = __mod__ = __rmod__ = __float__ = __index__ = _touch

    def __getattr__(self, name: str) -> Any:
        raise _MissingValueError

    def __repr__(self) -> str:
        return "MISSING"


_MISSING: Final = _Missing()


def _sequence(*items: object) -> tuple[object, ...]:
    """A list value built from expressions; touching a missing item is touching a missing value."""
    for item in items:
        if item is _MISSING:
            raise _MissingValueError
    return items


# What a rule's test may raise on values of the wrong shape; each means "did not fire".
_EVAL_ERRORS: Final = (
    _MissingValueError,
    TypeError,
    AttributeError,
    ArithmeticError,
    ValueError,
)


# --------------------------------------------------------------------------------------------
# Lexer and parser (CEL subset)


class _SyntaxProblem(Exception):
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
        raise _SyntaxProblem(f"unknown escape sequence \\{code} in string")

    return _ESCAPE_RE.sub(one, body)


def _tokenize(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(source):
        match = _TOKEN_RE.match(source, position)
        if match is None:
            raise _SyntaxProblem(
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
                raise _SyntaxProblem(f"unsigned integer literal {text}{following} is not supported")
            value: object = (
                float(text) if kind == "float" else int(text, 16 if kind == "hex" else 10)
            )
            tokens.append(_Token("number", text, value, column))
        elif kind == "string":
            if tokens and tokens[-1].kind == "ident" and tokens[-1].text in ("r", "R", "b", "B"):
                raise _SyntaxProblem(
                    f"{tokens[-1].text}-prefixed string literals are not supported"
                )
            tokens.append(_Token("string", text, _unescape(text[1:-1]), column))
        else:
            tokens.append(_Token(kind, text, None, column))
    tokens.append(_Token("end", "end of condition", None, len(source) + 1))
    return tokens


# AST nodes. Positions are kept out of them: problems name the construct instead.


@dataclass(frozen=True, slots=True)
class _Lit:
    value: object


@dataclass(frozen=True, slots=True)
class _Ident:
    name: str


@dataclass(frozen=True, slots=True)
class _Select:
    operand: _Node
    field: str


@dataclass(frozen=True, slots=True)
class _Unary:
    op: str
    operand: _Node


@dataclass(frozen=True, slots=True)
class _Binary:
    op: str
    left: _Node
    right: _Node


@dataclass(frozen=True, slots=True)
class _Cond:
    test: _Node
    then: _Node
    other: _Node


@dataclass(frozen=True, slots=True)
class _List:
    items: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Call:
    function: str
    target: _Node | None
    args: tuple[_Node, ...]


_Node = _Lit | _Ident | _Select | _Unary | _Binary | _Cond | _List | _Call

_RELATIONS: Final = frozenset({"==", "!=", "<", "<=", ">", ">=", "in"})


class _Parser:
    """Recursive descent over CEL's grammar (cel-spec doc/langdef.md), minus maps and indexing."""

    def __init__(self, source: str) -> None:
        self.tokens = _tokenize(source)
        self.index = 0

    def parse(self) -> _Node:
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
    def unexpected(token: _Token, wanted: str) -> _SyntaxProblem:
        found = token.text if token.kind == "end" else repr(token.text)
        return _SyntaxProblem(
            f"syntax error at column {token.column}: expected {wanted}, found {found}"
        )

    def expr(self) -> _Node:
        test = self.binary_level(0)
        if self.accept("?"):
            then = self.binary_level(0)
            self.expect(":")
            node: _Node = _Cond(test, then, self.expr())
        else:
            node = test
        return node

    _LEVELS: Final = (("||",), ("&&",), tuple(_RELATIONS), ("+", "-"), ("*", "/", "%"))

    def binary_level(self, level: int) -> _Node:
        if level == len(self._LEVELS):
            return self.unary()
        node = self.binary_level(level + 1)
        while True:
            token = self.peek()
            is_op = token.kind == "op" or (token.kind == "ident" and token.text == "in")
            if not (is_op and token.text in self._LEVELS[level]):
                return node
            self.advance()
            node = _Binary(token.text, node, self.binary_level(level + 1))

    def unary(self) -> _Node:
        if self.accept("!"):
            return _Unary("!", self.unary())
        if self.accept("-"):
            operand = self.unary()
            if isinstance(operand, _Lit) and type(operand.value) in (int, float):
                return _Lit(-operand.value)  # type: ignore[operator]
            return _Unary("-", operand)
        return self.member()

    def member(self) -> _Node:
        node = self.primary()
        while True:
            if self.accept("."):
                token = self.advance()
                if token.kind != "ident":
                    raise self.unexpected(token, "a field or method name")
                if self.accept("("):
                    node = _Call(token.text, node, self.arguments())
                else:
                    node = _Select(node, token.text)
            elif self.peek().text == "[" and self.peek().kind == "op":
                raise _SyntaxProblem("index access x[...] is not supported")
            else:
                return node

    def arguments(self) -> tuple[_Node, ...]:
        args: list[_Node] = []
        if self.accept(")"):
            return ()
        while True:
            args.append(self.expr())
            if self.accept(")"):
                return tuple(args)
            self.expect(",")

    def primary(self) -> _Node:
        token = self.advance()
        if token.kind in ("number", "string"):
            return _Lit(token.value)
        if token.kind == "ident":
            if token.text in _KEYWORDS:
                return _Lit(_KEYWORDS[token.text])
            if token.text in _RESERVED or token.text == "in":
                raise _SyntaxProblem(f"reserved word {token.text!r} cannot be used here")
            if self.accept("("):
                return _Call(token.text, None, self.arguments())
            return _Ident(token.text)
        if token.kind == "op":
            if token.text == "(":
                node = self.expr()
                self.expect(")")
                return node
            if token.text == "[":
                items: list[_Node] = []
                while not self.accept("]"):
                    items.append(self.expr())
                    if not self.accept(","):
                        self.expect("]")
                        break
                return _List(tuple(items))
            if token.text == "{":
                raise _SyntaxProblem("map literals {...} are not supported")
            if token.text == ".":
                raise _SyntaxProblem("leading-dot names (.x) are not supported")
        raise self.unexpected(token, "a value, name or '('")


#: Deeper conditions are rejected: nobody writes them, and Python's own parser has limits.
MAX_DEPTH: Final = 100


def _depth(node: _Node) -> int:
    children: tuple[_Node, ...]
    if isinstance(node, _Select | _Unary):
        children = (node.operand,)
    elif isinstance(node, _Binary):
        children = (node.left, node.right)
    elif isinstance(node, _Cond):
        children = (node.test, node.then, node.other)
    elif isinstance(node, _List):
        children = node.items
    elif isinstance(node, _Call):
        children = node.args if node.target is None else (node.target, *node.args)
    else:
        return 1
    return 1 + max((_depth(child) for child in children), default=0)


def _parse(source: str) -> _Node:
    try:
        node = _Parser(source).parse()
        depth = _depth(node)
    except RecursionError:
        depth = MAX_DEPTH + 1
    if depth > MAX_DEPTH:
        raise _SyntaxProblem(f"condition is nested too deeply: more than {MAX_DEPTH} levels")
    return node


# --------------------------------------------------------------------------------------------
# Type check and code generation


@dataclass(slots=True)
class _Compiled:
    """One (sub)condition as Python source, its type, and what a missing variable does to it.

    The three sets are sound, not complete: a variable listed is certain to have that effect.
    They let the evaluator skip a rule with an identity test instead of raising and catching.
    """

    code: str
    type: str  # number | string | bool | null | list[T] | list[any]
    must: frozenset[str]  # if one of these is missing, evaluating this raises
    not_true_set: frozenset[str] | None = None  # ... the value is not true (false or raises)
    not_false_set: frozenset[str] | None = None  # ... the value is not false (true or raises)

    @property
    def not_true(self) -> frozenset[str]:
        return self.must if self.not_true_set is None else self.not_true_set

    @property
    def not_false(self) -> frozenset[str]:
        return self.must if self.not_false_set is None else self.not_false_set


@dataclass(slots=True)
class _Context:
    """Shared by every rule of one ruleset: variable locals, regex globals."""

    schema: Schema
    locals: dict[str, str] = field(default_factory=dict)
    namespace: dict[str, object] = field(default_factory=dict)
    referenced: set[str] = field(default_factory=set)
    tested: set[str] = field(default_factory=set)  # variables some has() looks at

    def variable(self, name: str) -> str:
        if name not in self.locals:
            self.locals[name] = f"v{len(self.locals)}"
        self.referenced.add(name)
        return self.locals[name]

    def constant(self, value: object) -> str:
        name = f"k{len(self.namespace)}"
        self.namespace[name] = value
        return name


_STRING_METHODS: Final = {"startsWith": "startswith", "endsWith": "endswith"}


def _describe(node: _Node) -> str:
    """A short name of a construct for error messages."""
    if isinstance(node, _Ident):
        return node.name
    if isinstance(node, _Select):
        return f"{_describe(node.operand)}.{node.field}"
    if isinstance(node, _Lit):
        return "null" if node.value is None else repr(node.value)
    if isinstance(node, _Call):
        prefix = "" if node.target is None else f"{_describe(node.target)}."
        return f"{prefix}{node.function}(...)"
    return type(node).__name__.strip("_").lower()


def _variable_name(node: _Node, schema: Schema) -> tuple[str, str]:
    """Resolve a name or ``map.field`` to its dotted name and type."""
    if isinstance(node, _Ident):
        if node.name.startswith("__"):
            raise _SyntaxProblem(f'unknown variable "{node.name}"')
        kind = schema.get(node.name)
        if kind is None:
            raise _SyntaxProblem(f'unknown variable "{node.name}"')
        if not isinstance(kind, str):
            raise _SyntaxProblem(
                f'"{node.name}" is a map: use one of its fields, e.g. "{node.name}.{next(iter(kind), "x")}"'
            )
        return node.name, kind
    assert isinstance(node, _Select)
    if isinstance(node.operand, _Ident):
        base = schema.get(node.operand.name)
        dotted = f"{node.operand.name}.{node.field}"
        if base is None or node.operand.name.startswith("__"):
            raise _SyntaxProblem(f'unknown variable "{dotted}"')
        if isinstance(base, str):
            raise _SyntaxProblem(f'field access "{dotted}" on {base} "{node.operand.name}"')
        kind = base.get(node.field)
        if kind is None or node.field.startswith("__"):
            raise _SyntaxProblem(f'unknown variable "{dotted}"')
        return dotted, kind
    raise _SyntaxProblem(
        f'field access ".{node.field}" on {_describe(node.operand)} is not supported'
    )


def _both(left: _Compiled, right: _Compiled) -> frozenset[str]:
    return left.must | right.must


def _compile(node: _Node, ctx: _Context) -> _Compiled:
    if isinstance(node, _Lit):
        value = node.value
        if value is None:
            return _Compiled("None", "null", frozenset())
        if isinstance(value, bool):
            return _Compiled(repr(value), "bool", frozenset())
        if isinstance(value, int | float):
            return _Compiled(repr(value), "number", frozenset())
        return _Compiled(repr(value), "string", frozenset())
    if isinstance(node, _Ident | _Select):
        name, kind = _variable_name(node, ctx.schema)
        return _Compiled(ctx.variable(name), kind, frozenset({name}))
    if isinstance(node, _Unary):
        operand = _compile(node.operand, ctx)
        wanted = "bool" if node.op == "!" else "number"
        if operand.type != wanted:
            raise _SyntaxProblem(f"operator {node.op} needs a {wanted}, got {operand.type}")
        if node.op == "-":
            return _Compiled(f"(-{operand.code})", wanted, operand.must)
        return _Compiled(
            f"(not {operand.code})", wanted, operand.must, operand.not_false, operand.not_true
        )
    if isinstance(node, _Binary):
        return _compile_binary(node, ctx)
    if isinstance(node, _Cond):
        test, then, other = (_compile(n, ctx) for n in (node.test, node.then, node.other))
        if test.type != "bool":
            raise _SyntaxProblem(f"condition of ?: must be a bool, got {test.type}")
        branches = _common_type(then.type, other.type)
        if branches is None:
            raise _SyntaxProblem(
                f"branches of ?: have different types: {then.type} and {other.type}"
            )
        return _Compiled(
            f"({then.code} if {test.code} else {other.code})",
            branches,
            test.must | (then.must & other.must),
            test.must | (then.not_true & other.not_true),
            test.must | (then.not_false & other.not_false),
        )
    if isinstance(node, _List):
        items = [_compile(item, ctx) for item in node.items]
        kind = "any"
        for item in items:
            if item.type.startswith("list"):
                raise _SyntaxProblem("lists of lists are not supported")
            common = _common_type(kind, item.type)
            if common is None:
                raise _SyntaxProblem(f"list mixes {kind} and {item.type} elements")
            kind = common
        must = frozenset().union(*(item.must for item in items))
        codes = ", ".join(item.code for item in items)
        if all(isinstance(item, _Lit) for item in node.items):
            trailing = "," if len(items) == 1 else ""
            return _Compiled(f"({codes}{trailing})", f"list[{kind}]", must)
        # seq() refuses missing items: a tuple would compare a missing item by identity.
        return _Compiled(f"seq({codes})", f"list[{kind}]", must)
    return _compile_call(node, ctx)


def _common_type(a: str, b: str) -> str | None:
    if a == b or b == "any":
        return a
    if a == "any":
        return b
    return None


def _compile_binary(node: _Binary, ctx: _Context) -> _Compiled:
    left = _compile(node.left, ctx)
    right = _compile(node.right, ctx)
    op = node.op
    pair = f"{left.type} {op} {right.type}"
    if op in ("&&", "||"):
        if left.type != "bool" or right.type != "bool":
            raise _SyntaxProblem(f"operator {op} needs bools, got {pair}")
        # Python's short-circuit: the left side is always evaluated, the right one maybe.
        if op == "&&":
            return _Compiled(
                f"({left.code} and {right.code})",
                "bool",
                left.must,
                left.not_true | right.not_true,
                left.must | (left.not_false & right.not_false),
            )
        return _Compiled(
            f"({left.code} or {right.code})",
            "bool",
            left.must,
            left.must | (left.not_true & right.not_true),
            left.not_false | right.not_false,
        )
    if op in ("==", "!="):
        if not (left.type == right.type or "null" in (left.type, right.type)):
            raise _SyntaxProblem(f"cannot compare {pair}")
        return _Compiled(f"({left.code} {op} {right.code})", "bool", _both(left, right))
    if op in ("<", "<=", ">", ">="):
        if left.type != right.type or left.type not in ("number", "string"):
            raise _SyntaxProblem(f"cannot order {pair}")
        return _Compiled(f"({left.code} {op} {right.code})", "bool", _both(left, right))
    if op == "in":
        if not right.type.startswith("list["):
            raise _SyntaxProblem(f"right side of 'in' must be a list, got {right.type}")
        element = right.type[5:-1]
        if _common_type(left.type, element) is None:
            raise _SyntaxProblem(f"cannot look for a {left.type} in a list of {element}")
        literals = isinstance(node.right, _List) and all(
            isinstance(item, _Lit) and item.value is not None for item in node.right.items
        )
        if literals and node.right.items:  # type: ignore[union-attr]
            # A constant set: hashed lookup, folded to a frozenset constant by CPython.
            container = "{" + right.code[1:-1].rstrip(",") + "}"
        elif literals:
            container = "NOTHING"  # hashes the left side, so a missing one still counts as touched
        else:
            container = right.code
        return _Compiled(f"({left.code} in {container})", "bool", _both(left, right))
    # arithmetic
    if op == "+" and left.type == right.type and left.type in ("string", "number"):
        return _Compiled(f"({left.code} + {right.code})", left.type, _both(left, right))
    if op == "+" and left.type.startswith("list[") and right.type.startswith("list["):
        kind = _common_type(left.type[5:-1], right.type[5:-1])
        if kind is None:
            raise _SyntaxProblem(f"cannot add {pair}")
        return _Compiled(f"({left.code} + {right.code})", f"list[{kind}]", _both(left, right))
    if left.type != "number" or right.type != "number":
        raise _SyntaxProblem(f"operator {op} needs numbers, got {pair}")
    if op == "%":
        return _Compiled(f"fmod({left.code}, {right.code})", "number", _both(left, right))
    return _Compiled(f"({left.code} {op} {right.code})", "number", _both(left, right))


def _compile_call(node: _Call, ctx: _Context) -> _Compiled:
    name = node.function
    if name == "has" and node.target is None:
        if len(node.args) != 1 or not isinstance(node.args[0], _Ident | _Select):
            raise _SyntaxProblem("has() takes one field, e.g. has(by_customer.seconds_since_last)")
        variable, _ = _variable_name(node.args[0], ctx.schema)
        ctx.tested.add(variable)
        return _Compiled(f"({ctx.variable(variable)} is not M)", "bool", frozenset())
    if name == "size":
        operands = ([node.target] if node.target is not None else []) + list(node.args)
        if len(operands) != 1:
            raise _SyntaxProblem("size() takes one string or list")
        operand = _compile(operands[0], ctx)
        if operand.type != "string" and not operand.type.startswith("list["):
            raise _SyntaxProblem(f"size() needs a string or list, got {operand.type}")
        return _Compiled(f"len({operand.code})", "number", operand.must)
    if name in ("startsWith", "endsWith", "contains", "matches") and node.target is not None:
        target = _compile(node.target, ctx)
        if len(node.args) != 1:
            raise _SyntaxProblem(f"{name}() takes one string argument")
        arg = _compile(node.args[0], ctx)
        if target.type != "string" or arg.type != "string":
            raise _SyntaxProblem(f"{name}() needs strings, got {target.type}.{name}({arg.type})")
        must = _both(target, arg)
        if name == "contains":
            return _Compiled(f"({arg.code} in {target.code})", "bool", must)
        if name == "matches":
            pattern = node.args[0]
            if not isinstance(pattern, _Lit):
                raise _SyntaxProblem("matches() needs a literal pattern")
            try:
                regex = re.compile(str(pattern.value))
            except re.error as error:
                raise _SyntaxProblem(f"bad regular expression {pattern.value!r}: {error}") from None
            search = ctx.constant(regex.search)
            return _Compiled(f"({search}({target.code}) is not None)", "bool", target.must)
        method = _STRING_METHODS[name]
        return _Compiled(f"{target.code}.{method}({arg.code})", "bool", must)
    if node.target is not None:
        _compile(node.target, ctx)  # report a problem inside the target first
    form = f"{_describe(node.target)}.{name}()" if node.target is not None else f"{name}()"
    raise _SyntaxProblem(f"unsupported function {form}")


# --------------------------------------------------------------------------------------------
# Descriptions

_PLACEHOLDER_RE: Final = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def _format_value(value: object) -> str:
    if value is None or value is _MISSING:
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.2f}"
    return str(value)


def _template(description: str, schema: Schema) -> tuple[tuple[str | None, str], ...]:
    """Split a description into (variable or None, literal text) parts; checks the names."""
    parts: list[tuple[str | None, str]] = []
    position = 0
    for match in _PLACEHOLDER_RE.finditer(description):
        text = description[position : match.start()]
        position = match.end()
        token = match.group()
        if token in ("{{", "}}"):
            parts.append((None, text + token[0]))
            continue
        name = match.group(1).strip()
        node = _Parser(name).parse() if name else None
        if not isinstance(node, _Ident | _Select):
            raise _SyntaxProblem(f"description: placeholder {token} is not a variable name")
        variable, _ = _variable_name(node, schema)
        parts.append((None, text))
        parts.append((variable, ""))
    parts.append((None, description[position:]))
    return tuple((name, text) for name, text in parts if name is not None or text)


# --------------------------------------------------------------------------------------------
# Ruleset


@dataclass(frozen=True, slots=True)
class Ruleset:
    """A validated, compiled ruleset. Build with `load_ruleset` or `parse_ruleset`.

    Attributes:
        version: the file's version; the verdict's ``rules_version``.
        rules: every rule, in file order.
        variables: every variable a condition or description references, dotted
            (``{"amount", "by_customer.count_1h", "score"}``): what the caller must compute.
        source: the Python source of the compiled evaluator (for debugging and review).
    """

    version: str
    rules: tuple[Rule, ...]
    variables: frozenset[str]
    source: str = field(repr=False, compare=False)
    _function: Callable[[Mapping[str, object]], list[int]] = field(repr=False, compare=False)
    _hits: tuple[Callable[[Mapping[str, object]], Hit], ...] = field(repr=False, compare=False)
    _live: tuple[str | None, ...] = field(repr=False, compare=False)

    def evaluate(self, activation: Mapping[str, object]) -> Evaluation:
        """Run every rule on one transaction.

        Args:
            activation: transaction fields at top level (amount as a number), a nested mapping
                (or None) per entity (``by_customer``...), ``score``. Absent keys and None
                values are missing. Values of the wrong type make the rules that use them false.

        Returns:
            The decision (a non-shadow ``allow`` hit wins, then block, then review, else allow)
            and every hit, most severe first.
        """
        fired = self._function(activation)
        if not fired:
            return _NOTHING_FIRED
        makers = self._hits
        hits = tuple([makers[index](activation) for index in fired])
        live = {self._live[index] for index in fired}
        if "allow" in live:
            decision = "allow"
        elif "block" in live:
            decision = "block"
        elif "review" in live:
            decision = "review"
        else:
            decision = "allow"
        return Evaluation(decision, hits)


def default_ruleset_path() -> Path:
    """The bundled ruleset: ``amount > 1000`` blocks."""
    return Path(__file__).with_name("rulesets") / "default.yaml"


def load_ruleset(path: str | Path, schema: Schema) -> Ruleset:
    """Read, validate and compile a rules file; all or nothing.

    Args:
        path: the YAML rules file.
        schema: the variables conditions may use (see `Schema`).

    Raises:
        RulesError: the file cannot be read, is not valid YAML, or has invalid rules; the message
            lists every problem as ``<file>: rule "<id>": <problem>``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RulesError(path.name, [f"{path}: cannot read: {error}"]) from None
    return parse_ruleset(text, schema, source=path.name)


_RULE_KEYS: Final = frozenset({"id", "description", "condition", "action", "shadow"})
_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")


def _check_schema(schema: Schema) -> None:
    for name, kind in schema.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"schema: {name!r} is not a valid variable name")
        fields = {name: kind} if isinstance(kind, str) else kind
        for field_name, field_kind in fields.items():
            if field_kind not in _SCALAR_TYPES or not re.fullmatch(
                r"[A-Za-z_][A-Za-z0-9_]*", field_name
            ):
                raise ValueError(
                    f"schema: {name}.{field_name}: type must be one of "
                    f"{sorted(_SCALAR_TYPES)}, got {field_kind!r}"
                )


def parse_ruleset(text: str, schema: Schema, *, source: str = "<rules>") -> Ruleset:
    """Validate and compile a ruleset from YAML text. See `load_ruleset`.

    Args:
        source: the file name to put in error messages.
    """
    _check_schema(schema)
    try:
        # libyaml's loader when the wheel has it: ten times faster on large rule files.
        document = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        detail = " ".join(str(getattr(error, "problem", None) or error).split())
        raise RulesError(
            source,
            [
                f"{source}: not valid YAML{line}: {detail}"
                " (quote a condition that starts with ! or contains ': ' or ' #')"
            ],
        ) from None
    problems: list[str] = []
    if not isinstance(document, dict):
        raise RulesError(source, [f"{source}: must be a mapping with 'version' and 'rules'"])
    for key in sorted(set(document) - {"version", "rules"}, key=str):
        problems.append(f"{source}: unknown key {key!r} (expected 'version' and 'rules')")
    version = document.get("version")
    if not isinstance(version, str) or not version.strip():
        problems.append(f"{source}: version: must be a non-empty string, got {version!r}")
    entries = document.get("rules")
    if not isinstance(entries, list):
        problems.append(f"{source}: rules: must be a list of rules, got {type(entries).__name__}")
        entries = []
    ctx = _Context(schema)
    compiled: list[tuple[Rule, _Compiled, tuple[tuple[str | None, str], ...]]] = []
    seen: set[str] = set()
    for number, entry in enumerate(entries, start=1):
        rule_problems: list[str] = []
        label = f"rule #{number}"
        if not isinstance(entry, dict):
            problems.append(f"{source}: {label}: must be a mapping, got {type(entry).__name__}")
            continue
        rule_id = entry.get("id")
        if isinstance(rule_id, str) and _ID_RE.fullmatch(rule_id):
            label = f'rule "{rule_id}"'
            if rule_id in seen:
                rule_problems.append("duplicate id")
            seen.add(rule_id)
        elif "id" not in entry:
            rule_problems.append("missing field 'id'")
        else:
            rule_problems.append(
                f"id: must be letters, digits, '_.:-' (at most 100), got {rule_id!r}"
            )
        for key in sorted(set(entry) - _RULE_KEYS, key=str):
            rule_problems.append(f"unknown field {key!r}")
        for key in ("description", "condition", "action"):
            if key not in entry:
                rule_problems.append(f"missing field {key!r}")
            elif not isinstance(entry[key], str):
                rule_problems.append(f"{key}: must be a string, got {entry[key]!r}")
        action = entry.get("action")
        if isinstance(action, str) and action not in ACTIONS:
            rule_problems.append(
                f"unknown action {action!r} (expected one of {', '.join(ACTIONS)})"
            )
        shadow = entry.get("shadow", False)
        if not isinstance(shadow, bool):
            rule_problems.append(f"shadow: must be true or false, got {shadow!r}")
        condition = entry.get("condition")
        description = entry.get("description")
        result: _Compiled | None = None
        template: tuple[tuple[str | None, str], ...] = ()
        before = set(ctx.referenced)
        ctx.referenced.clear()
        if isinstance(condition, str):
            try:
                result = _compile(_parse(condition), ctx)
                if result.type != "bool":
                    rule_problems.append(f"condition must be a bool, got {result.type}")
            except _SyntaxProblem as problem:
                rule_problems.append(str(problem))
        variables = frozenset(ctx.referenced)
        ctx.referenced.update(before)
        if isinstance(description, str):
            try:
                template = _template(description, schema)
            except _SyntaxProblem as problem:
                rule_problems.append(str(problem))
        problems.extend(f"{source}: {label}: {problem}" for problem in rule_problems)
        if rule_problems or result is None:
            continue
        assert isinstance(rule_id, str) and isinstance(description, str)
        assert isinstance(condition, str) and isinstance(action, str)
        rule = Rule(rule_id, description, condition, action, shadow, variables)
        compiled.append((rule, result, template))
    if problems:
        raise RulesError(source, problems)
    assert isinstance(version, str)
    return _build(version, compiled, ctx, source)


def _build(
    version: str,
    compiled: list[tuple[Rule, _Compiled, tuple[tuple[str | None, str], ...]]],
    ctx: _Context,
    source: str,
) -> Ruleset:
    """Generate, compile and wrap the evaluator of a checked ruleset."""
    # Most severe first, file order within one action: fired indices come out in verdict order.
    ordered = sorted(range(len(compiled)), key=lambda i: (_SEVERITY[compiled[i][0].action], i))
    lines = ["def evaluate(a):", "    get = a.get"]
    # A variable every rule using it guards (the rule cannot fire without it) never reaches
    # the rule's code when missing: it can stay None and skip the sentinel. The others
    # (touched conditionally, or tested by has()) are the raising sentinel M when missing.
    plain = {
        name
        for name in ctx.locals
        if name not in ctx.tested
        and all(name in result.not_true for rule, result, _ in compiled if name in rule.variables)
    }
    maps: dict[str, str] = {}
    for name, local in ctx.locals.items():
        default = "" if name in plain else ", M"
        if "." in name:
            top, leaf = name.split(".", 1)
            if top not in maps:
                maps[top] = f"m{len(maps)}"
                lines.append(f"    {maps[top]} = get({top!r}) or EMPTY")
            lines.append(f"    {local} = {maps[top]}.get({leaf!r}{default})")
        else:
            lines.append(f"    {local} = get({name!r}{default})")
        if name not in plain:
            lines.append(f"    if {local} is None: {local} = M")
    lines.append("    fired = []")
    for position, index in enumerate(ordered):
        rule, result, _ = compiled[index]
        guard = " and ".join(
            f"{ctx.locals[name]} is not {'None' if name in plain else 'M'}"
            for name in sorted(result.not_true)
        )
        indent = "    "
        lines.append(f"    # {rule.id!r}")
        if guard:
            lines.append(f"    if {guard}:")
            indent += "    "
        lines += [
            f"{indent}try:",
            f"{indent}    if {result.code}:",
            f"{indent}        fired.append({position})",
            f"{indent}except ERRORS:",
            f"{indent}    pass",
        ]
    lines.append("    return fired")
    # One small function per rule builds its Hit from the activation, only when it fired.
    for position, index in enumerate(ordered):
        rule, _, template = compiled[index]
        lines += ["", f"def hit{position}(a):", "    get = a.get"]
        names = sorted(rule.variables | {name for name, _ in template if name is not None})
        loads: dict[str, str] = {}
        nested: dict[str, str] = {}
        for name in names:
            loads[name] = f"x{len(loads)}"
            if "." in name:
                top, leaf = name.split(".", 1)
                if top not in nested:
                    nested[top] = f"n{len(nested)}"
                    lines.append(f"    {nested[top]} = get({top!r}) or EMPTY")
                lines.append(f"    {loads[name]} = {nested[top]}.get({leaf!r})")
            else:
                lines.append(f"    {loads[name]} = get({name!r})")
        text = " + ".join(
            repr(literal) if name is None else f"fmt({loads[name]})" for name, literal in template
        )
        values = ", ".join(f"{name!r}: {loads[name]}" for name in sorted(rule.variables))
        lines.append(
            f"    return new(Hit, ({rule.id!r}, {rule.action!r}, {text or repr('')},"
            f" {rule.shadow!r}, {{{values}}}))"
        )
    code = "\n".join(lines) + "\n"
    namespace: dict[str, object] = {
        "__builtins__": {},
        "M": _MISSING,
        "EMPTY": {},
        "ERRORS": _EVAL_ERRORS,
        "fmod": math.fmod,
        "len": len,
        "fmt": _format_value,
        "seq": _sequence,
        "NOTHING": frozenset(),
        "Hit": Hit,
        "new": tuple.__new__,  # Hit's fields in order, minus NamedTuple's Python-level __new__
        **ctx.namespace,
    }
    # The source is generated from the checked AST only: numbered locals, and repr() of numbers
    # and strings; no text of the rules file is ever executed as code.
    exec(compile(code, f"<rules {source}>", "exec"), namespace)
    function: Callable[[Mapping[str, object]], list[int]] = namespace["evaluate"]  # type: ignore[assignment]
    makers = tuple(namespace[f"hit{position}"] for position in range(len(ordered)))
    live = tuple(
        None if compiled[index][0].shadow else compiled[index][0].action for index in ordered
    )
    variables = frozenset(ctx.locals) | frozenset(
        name for _, _, template in compiled for name, _ in template if name is not None
    )
    log.info("rules %s: %s rules compiled, version %s", source, len(compiled), version)
    return Ruleset(
        version=version,
        rules=tuple(rule for rule, _, _ in compiled),
        variables=variables,
        source=code,
        _function=function,
        _hits=makers,  # type: ignore[arg-type]
        _live=live,
    )
