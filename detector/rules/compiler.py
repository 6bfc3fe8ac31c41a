"""Type check and code generation: a condition's syntax tree becomes Python source.

Variables are checked against the `Schema` of what the detector provides; a value the
transaction or an entity lacks is `MISSING`, and any operation on it makes the rule not fire.
Descriptions' ``{placeholders}`` are checked and compiled here too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import re2

from detector.rules.language import (
    INT_MAGNITUDE_MAX,
    Binary,
    Call,
    Cond,
    Ident,
    ListNode,
    Lit,
    Node,
    Select,
    SyntaxProblem,
    Unary,
    parse,
)

__all__ = [
    "EVAL_ERRORS",
    "MISSING",
    "SCALAR_TYPES",
    "Compiled",
    "Context",
    "Missing",
    "MissingValueError",
    "Schema",
    "compile_node",
    "compile_pattern",
    "compile_template",
    "format_value",
    "sequence",
    "variable_name",
]

SCALAR_TYPES: Final = frozenset({"number", "string", "bool"})

#: Known variable names: top-level name -> "number" | "string" | "bool", or for a nested map
#: (an entity's features) a mapping of field name -> one of those types.
Schema = Mapping[str, "str | Mapping[str, str]"]


# --------------------------------------------------------------------------------------------
# Missing values


class MissingValueError(Exception):
    """Raised by any operation on a missing value; the rule that touched it does not fire."""


class Missing:
    """The value of a variable the activation does not have (absent, None)."""

    __slots__ = ()

    def _touch(self, *_args: object) -> Any:
        raise MissingValueError

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _touch
    __bool__ = __len__ = __hash__ = __neg__ = __pos__ = __iter__ = __contains__ = _touch
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _touch
    __truediv__ = __rtruediv__ = __mod__ = __rmod__ = __float__ = __index__ = _touch

    def __getattr__(self, name: str) -> Any:
        raise MissingValueError

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = Missing()


def sequence(*items: object) -> tuple[object, ...]:
    """A list value built from expressions; touching a missing item is touching a missing value."""
    for item in items:
        if item is MISSING:
            raise MissingValueError
    return items


# What a rule's test may raise on values of the wrong shape; each means "did not fire".
EVAL_ERRORS: Final = (
    MissingValueError,
    TypeError,
    AttributeError,
    ArithmeticError,
    ValueError,
)


# --------------------------------------------------------------------------------------------
# Type check and code generation


@dataclass(slots=True)
class Compiled:
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
class Context:
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


def _describe(node: Node) -> str:
    """A short name of a construct for error messages."""
    if isinstance(node, Ident):
        return node.name
    if isinstance(node, Select):
        return f"{_describe(node.operand)}.{node.field}"
    if isinstance(node, Lit):
        return "null" if node.value is None else repr(node.value)
    if isinstance(node, Call):
        prefix = "" if node.target is None else f"{_describe(node.target)}."
        return f"{prefix}{node.function}(...)"
    return type(node).__name__.removesuffix("Node").lower()


def variable_name(node: Node, schema: Schema) -> tuple[str, str]:
    """Resolve a name or ``map.field`` to its dotted name and type."""
    if isinstance(node, Ident):
        if node.name.startswith("__"):
            raise SyntaxProblem(f'unknown variable "{node.name}"')
        kind = schema.get(node.name)
        if kind is None:
            raise SyntaxProblem(f'unknown variable "{node.name}"')
        if not isinstance(kind, str):
            raise SyntaxProblem(
                f'"{node.name}" is a map: use one of its fields, e.g. "{node.name}.{next(iter(kind), "x")}"'
            )
        return node.name, kind
    assert isinstance(node, Select)
    if isinstance(node.operand, Ident):
        base = schema.get(node.operand.name)
        dotted = f"{node.operand.name}.{node.field}"
        if base is None or node.operand.name.startswith("__"):
            raise SyntaxProblem(f'unknown variable "{dotted}"')
        if isinstance(base, str):
            raise SyntaxProblem(f'field access "{dotted}" on {base} "{node.operand.name}"')
        kind = base.get(node.field)
        if kind is None or node.field.startswith("__"):
            raise SyntaxProblem(f'unknown variable "{dotted}"')
        return dotted, kind
    raise SyntaxProblem(
        f'field access ".{node.field}" on {_describe(node.operand)} is not supported'
    )


def _both(left: Compiled, right: Compiled) -> frozenset[str]:
    return left.must | right.must


def compile_node(node: Node, ctx: Context) -> Compiled:
    if isinstance(node, Lit):
        value = node.value
        if value is None:
            return Compiled("None", "null", frozenset())
        if isinstance(value, bool):
            return Compiled(repr(value), "bool", frozenset())
        if isinstance(value, int | float):
            if value == INT_MAGNITUDE_MAX:  # only its negation is a 64-bit integer
                raise SyntaxProblem(f"integer literal {value} is out of range (64-bit integers)")
            return Compiled(repr(value), "number", frozenset())
        return Compiled(repr(value), "string", frozenset())
    if isinstance(node, Ident | Select):
        name, kind = variable_name(node, ctx.schema)
        return Compiled(ctx.variable(name), kind, frozenset({name}))
    if isinstance(node, Unary):
        operand = compile_node(node.operand, ctx)
        wanted = "bool" if node.op == "!" else "number"
        if operand.type != wanted:
            raise SyntaxProblem(f"operator {node.op} needs a {wanted}, got {operand.type}")
        if node.op == "-":
            return Compiled(f"(-{operand.code})", wanted, operand.must)
        return Compiled(
            f"(not {operand.code})", wanted, operand.must, operand.not_false, operand.not_true
        )
    if isinstance(node, Binary):
        return _compile_binary(node, ctx)
    if isinstance(node, Cond):
        test, then, other = (compile_node(n, ctx) for n in (node.test, node.then, node.other))
        if test.type != "bool":
            raise SyntaxProblem(f"condition of ?: must be a bool, got {test.type}")
        branches = _common_type(then.type, other.type)
        if branches is None:
            raise SyntaxProblem(
                f"branches of ?: have different types: {then.type} and {other.type}"
            )
        return Compiled(
            f"({then.code} if {test.code} else {other.code})",
            branches,
            test.must | (then.must & other.must),
            test.must | (then.not_true & other.not_true),
            test.must | (then.not_false & other.not_false),
        )
    if isinstance(node, ListNode):
        items = [compile_node(item, ctx) for item in node.items]
        kind = "any"
        for item in items:
            if item.type.startswith("list"):
                raise SyntaxProblem("lists of lists are not supported")
            common = _common_type(kind, item.type)
            if common is None:
                raise SyntaxProblem(f"list mixes {kind} and {item.type} elements")
            kind = common
        must = frozenset().union(*(item.must for item in items))
        codes = ", ".join(item.code for item in items)
        if all(isinstance(item, Lit) for item in node.items):
            trailing = "," if len(items) == 1 else ""
            return Compiled(f"({codes}{trailing})", f"list[{kind}]", must)
        # seq() refuses missing items: a tuple would compare a missing item by identity.
        return Compiled(f"seq({codes})", f"list[{kind}]", must)
    return _compile_call(node, ctx)


def _common_type(a: str, b: str) -> str | None:
    if a == b or b == "any":
        return a
    if a == "any":
        return b
    return None


def _compile_binary(node: Binary, ctx: Context) -> Compiled:
    left = compile_node(node.left, ctx)
    right = compile_node(node.right, ctx)
    op = node.op
    pair = f"{left.type} {op} {right.type}"
    if op in ("&&", "||"):
        if left.type != "bool" or right.type != "bool":
            raise SyntaxProblem(f"operator {op} needs bools, got {pair}")
        # Python's short-circuit: the left side is always evaluated, the right one maybe.
        if op == "&&":
            return Compiled(
                f"({left.code} and {right.code})",
                "bool",
                left.must,
                left.not_true | right.not_true,
                left.must | (left.not_false & right.not_false),
            )
        return Compiled(
            f"({left.code} or {right.code})",
            "bool",
            left.must,
            left.must | (left.not_true & right.not_true),
            left.not_false | right.not_false,
        )
    if op in ("==", "!="):
        if not (left.type == right.type or "null" in (left.type, right.type)):
            raise SyntaxProblem(f"cannot compare {pair}")
        return Compiled(f"({left.code} {op} {right.code})", "bool", _both(left, right))
    if op in ("<", "<=", ">", ">="):
        if left.type != right.type or left.type not in ("number", "string"):
            raise SyntaxProblem(f"cannot order {pair}")
        return Compiled(f"({left.code} {op} {right.code})", "bool", _both(left, right))
    if op == "in":
        if not right.type.startswith("list["):
            raise SyntaxProblem(f"right side of 'in' must be a list, got {right.type}")
        element = right.type[5:-1]
        if _common_type(left.type, element) is None:
            raise SyntaxProblem(f"cannot look for a {left.type} in a list of {element}")
        literals = isinstance(node.right, ListNode) and all(
            isinstance(item, Lit) and item.value is not None for item in node.right.items
        )
        if literals and node.right.items:  # type: ignore[union-attr]
            # A constant set: hashed lookup, folded to a frozenset constant by CPython.
            container = "{" + right.code[1:-1].rstrip(",") + "}"
        elif literals:
            container = "NOTHING"  # hashes the left side, so a missing one still counts as touched
        else:
            container = right.code
        return Compiled(f"({left.code} in {container})", "bool", _both(left, right))
    # arithmetic
    if op == "+" and left.type == right.type and left.type in ("string", "number"):
        return Compiled(f"({left.code} + {right.code})", left.type, _both(left, right))
    if op == "+" and left.type.startswith("list[") and right.type.startswith("list["):
        kind = _common_type(left.type[5:-1], right.type[5:-1])
        if kind is None:
            raise SyntaxProblem(f"cannot add {pair}")
        return Compiled(f"({left.code} + {right.code})", f"list[{kind}]", _both(left, right))
    if left.type != "number" or right.type != "number":
        raise SyntaxProblem(f"operator {op} needs numbers, got {pair}")
    if op == "%":
        return Compiled(f"fmod({left.code}, {right.code})", "number", _both(left, right))
    return Compiled(f"({left.code} {op} {right.code})", "number", _both(left, right))


def compile_pattern(pattern: str) -> Any:
    """A `matches()` pattern compiled by RE2, as CEL specifies: time linear in the input.

    Python's `re` backtracks: `^(a|aa)+$` on 40 characters of a transaction field would hold
    the interpreter for minutes. RE2 has no backreferences or lookaround; a pattern using them
    is refused here, at load.

    Raises:
        SyntaxProblem: the pattern is not valid RE2 syntax (or too large for RE2's memory).
    """
    options = re2.Options()
    options.log_errors = False  # the problem goes into our error, not to stderr
    try:
        return re2.compile(pattern, options)
    except re2.error as error:
        detail = error.args[0] if error.args else error
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        raise SyntaxProblem(f"bad regular expression {pattern!r}: {detail}") from None


def _compile_call(node: Call, ctx: Context) -> Compiled:
    name = node.function
    if name == "has" and node.target is None:
        if len(node.args) != 1 or not isinstance(node.args[0], Ident | Select):
            raise SyntaxProblem("has() takes one field, e.g. has(by_customer.seconds_since_last)")
        variable, _ = variable_name(node.args[0], ctx.schema)
        ctx.tested.add(variable)
        return Compiled(f"({ctx.variable(variable)} is not M)", "bool", frozenset())
    if name == "size":
        operands = ([node.target] if node.target is not None else []) + list(node.args)
        if len(operands) != 1:
            raise SyntaxProblem("size() takes one string or list")
        operand = compile_node(operands[0], ctx)
        if operand.type != "string" and not operand.type.startswith("list["):
            raise SyntaxProblem(f"size() needs a string or list, got {operand.type}")
        return Compiled(f"len({operand.code})", "number", operand.must)
    if name in ("startsWith", "endsWith", "contains", "matches") and node.target is not None:
        target = compile_node(node.target, ctx)
        if len(node.args) != 1:
            raise SyntaxProblem(f"{name}() takes one string argument")
        arg = compile_node(node.args[0], ctx)
        if target.type != "string" or arg.type != "string":
            raise SyntaxProblem(f"{name}() needs strings, got {target.type}.{name}({arg.type})")
        must = _both(target, arg)
        if name == "contains":
            return Compiled(f"({arg.code} in {target.code})", "bool", must)
        if name == "matches":
            pattern = node.args[0]
            if not isinstance(pattern, Lit):
                raise SyntaxProblem("matches() needs a literal pattern")
            search = ctx.constant(compile_pattern(str(pattern.value)).search)
            return Compiled(f"({search}({target.code}) is not None)", "bool", target.must)
        method = _STRING_METHODS[name]
        return Compiled(f"{target.code}.{method}({arg.code})", "bool", must)
    if node.target is not None:
        compile_node(node.target, ctx)  # report a problem inside the target first
    form = f"{_describe(node.target)}.{name}()" if node.target is not None else f"{name}()"
    raise SyntaxProblem(f"unsupported function {form}")


# --------------------------------------------------------------------------------------------
# Descriptions

_PLACEHOLDER_RE: Final = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def format_value(value: object) -> str:
    if value is None or value is MISSING:
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.2f}"
    return str(value)


def compile_template(description: str, schema: Schema) -> tuple[tuple[str | None, str], ...]:
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
        try:
            node = parse(name) if name else None
        except SyntaxProblem:  # nested too deeply included: only a name is accepted anyway
            node = None
        if not isinstance(node, Ident | Select):
            shown = token if len(token) <= 60 else f"{token[:57]}..."
            raise SyntaxProblem(f"description: placeholder {shown} is not a variable name")
        variable, _ = variable_name(node, schema)
        parts.append((None, text))
        parts.append((variable, ""))
    parts.append((None, description[position:]))
    return tuple((name, text) for name, text in parts if name is not None or text)
