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
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

import yaml

from detector.errors import RulesError
from detector.rules.compiler import (
    EVAL_ERRORS,
    MISSING,
    SCALAR_TYPES,
    Compiled,
    Context,
    Schema,
    compile_node,
    compile_template,
    format_value,
    sequence,
)
from detector.rules.language import SyntaxProblem, parse

log = logging.getLogger(__name__)

#: Rule actions, most severe first: the order of reasons in a verdict.
ACTIONS: Final = ("block", "review", "allow")
_SEVERITY: Final = {action: rank for rank, action in enumerate(ACTIONS)}


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
#: How problems show a bad value: bounded, so a few lines of YAML aliases that expand to a
#: billion items cannot make a message of that size.
_REPR: Final = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 60, 60, 5, 5
_shown: Final = _REPR.repr

_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")


def _check_schema(schema: Schema) -> None:
    for name, kind in schema.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"schema: {name!r} is not a valid variable name")
        fields = {name: kind} if isinstance(kind, str) else kind
        for field_name, field_kind in fields.items():
            if field_kind not in SCALAR_TYPES or not re.fullmatch(
                r"[A-Za-z_][A-Za-z0-9_]*", field_name
            ):
                raise ValueError(
                    f"schema: {name}.{field_name}: type must be one of "
                    f"{sorted(SCALAR_TYPES)}, got {field_kind!r}"
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
        problems.append(f"{source}: unknown key {_shown(key)} (expected 'version' and 'rules')")
    version = document.get("version")
    if not isinstance(version, str) or not version.strip():
        problems.append(f"{source}: version: must be a non-empty string, got {_shown(version)}")
    entries = document.get("rules")
    if not isinstance(entries, list):
        problems.append(f"{source}: rules: must be a list of rules, got {type(entries).__name__}")
        entries = []
    ctx = Context(schema)
    compiled: list[tuple[Rule, Compiled, tuple[tuple[str | None, str], ...]]] = []
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
                f"id: must be letters, digits, '_.:-' (at most 100), got {_shown(rule_id)}"
            )
        for key in sorted(set(entry) - _RULE_KEYS, key=str):
            rule_problems.append(f"unknown field {_shown(key)}")
        for key in ("description", "condition", "action"):
            if key not in entry:
                rule_problems.append(f"missing field {key!r}")
            elif not isinstance(entry[key], str):
                rule_problems.append(f"{key}: must be a string, got {_shown(entry[key])}")
        action = entry.get("action")
        if isinstance(action, str) and action not in ACTIONS:
            rule_problems.append(
                f"unknown action {_shown(action)} (expected one of {', '.join(ACTIONS)})"
            )
        shadow = entry.get("shadow", False)
        if not isinstance(shadow, bool):
            rule_problems.append(f"shadow: must be true or false, got {_shown(shadow)}")
        condition = entry.get("condition")
        description = entry.get("description")
        result: Compiled | None = None
        template: tuple[tuple[str | None, str], ...] = ()
        before = set(ctx.referenced)
        ctx.referenced.clear()
        if isinstance(condition, str):
            try:
                result = compile_node(parse(condition), ctx)
                if result.type != "bool":
                    rule_problems.append(f"condition must be a bool, got {result.type}")
            except SyntaxProblem as problem:
                rule_problems.append(str(problem))
        variables = frozenset(ctx.referenced)
        ctx.referenced.update(before)
        if isinstance(description, str):
            try:
                template = compile_template(description, schema)
            except SyntaxProblem as problem:
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
    compiled: list[tuple[Rule, Compiled, tuple[tuple[str | None, str], ...]]],
    ctx: Context,
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
        # One join of a flat tuple: a chain of `+` over thousands of placeholders would be an
        # expression too deep for Python's compiler.
        parts = ", ".join(
            repr(literal) if name is None else f"fmt({loads[name]})" for name, literal in template
        )
        text = f"join(({parts},))" if parts else ""
        values = ", ".join(f"{name!r}: {loads[name]}" for name in sorted(rule.variables))
        lines.append(
            f"    return new(Hit, ({rule.id!r}, {rule.action!r}, {text or repr('')},"
            f" {rule.shadow!r}, {{{values}}}))"
        )
    code = "\n".join(lines) + "\n"
    namespace: dict[str, object] = {
        "__builtins__": {},
        "M": MISSING,
        "EMPTY": {},
        "ERRORS": EVAL_ERRORS,
        "fmod": math.fmod,
        "len": len,
        "fmt": format_value,
        "join": "".join,
        "seq": sequence,
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
