"""The rules engine: the CEL subset, load-time validation, missing values, decisions, speed."""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.config import DetectorConfig, load_rules, state_config
from detector.errors import ConfigError, RulesError
from detector.rules import (
    Evaluation,
    Ruleset,
    load_ruleset,
    parse_ruleset,
)

SCHEMA: dict[str, Any] = {
    "amount": "number",
    "score": "number",
    "country": "string",
    "ip_country": "string",
    "merchant_category": "string",
    "channel": "string",
    "merchant": "string",
    "terminal_id": "string",
    "flag": "bool",
    "by_customer": {
        "count_1h": "number",
        "mean_30d": "number",
        "amount_ratio_30d": "number",
        "seconds_since_last": "number",
    },
    "by_terminal": {"count_1h": "number"},
}

BASE: dict[str, Any] = {
    "amount": 120.0,
    "score": 0.2,
    "country": "FR",
    "ip_country": "FR",
    "merchant_category": "5411",
    "channel": "online",
    "merchant": "crypto-exchange-7",
    "terminal_id": None,
    "flag": False,
    "by_customer": {"count_1h": 7.0, "mean_30d": 30.0, "seconds_since_last": 20.0},
    "by_terminal": {},
}


def one_rule(condition: str, action: str = "block", **extra: Any) -> str:
    """YAML text (JSON is YAML) of a ruleset with a single rule."""
    rule = {"id": "r1", "description": "d", "condition": condition, "action": action, **extra}
    return json.dumps({"version": "t1", "rules": [rule]})


def fires(condition: str, **changes: Any) -> bool:
    """Whether a one-rule ruleset fires on BASE with `changes` applied."""
    ruleset = parse_ruleset(one_rule(condition), SCHEMA)
    return bool(ruleset.evaluate({**BASE, **changes}).hits)


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("amount > 100", True),
        ("amount > 120", False),
        ("amount >= 120", True),
        ("amount == 120", True),
        ("amount != 120.0", False),
        ("amount < 120.5 && amount <= 120", True),
        ("amount > 1000 || score < 0.5", True),
        ("!(amount > 100)", False),
        ("!!true", True),
        ("-amount < -100", True),
        ("amount - 20 == 100", True),
        ("amount * 2 == 240", True),
        ("amount / 8 == 15", True),
        ("7 / 2 == 3.5", True),
        ("7 % 3 == 1", True),
        ("-7 % 3 == -1", True),
        ("1 + 2 * 3 == 7", True),
        ("(1 + 2) * 3 == 9", True),
        ("10 - 4 - 3 == 3", True),
        ("2 < 3 == true", True),
        ("false && false || true", True),
        ("true || false && false", True),
        ("amount > 3.0 * by_customer.mean_30d", True),
        ("by_customer.count_1h >= 5 && amount > 3.0 * by_customer.mean_30d", True),
        ("country != ip_country && amount > 100", False),
        ("country == ip_country", True),
        ('merchant_category in ["7995", "6051"]', False),
        ('merchant_category in ["5411"]', True),
        ("merchant_category in []", False),
        ('country in ["F" + "R"]', True),
        ("amount in [1, 120]", True),
        ("amount in [1.5, 2]", False),
        ("score > 0.9", False),
        ('amount > 100 ? country == "FR" : false', True),
        ('(amount > 1000 ? "big" : "small") == "small"', True),
        ("size(merchant) == 17", True),
        ("merchant.size() == 17", True),
        ('size(["a", "b"]) == 2', True),
        ('merchant.startsWith("crypto")', True),
        ('merchant.endsWith("-7")', True),
        ('merchant.contains("exchange")', True),
        ('merchant.contains("bank")', False),
        ('merchant.matches("^crypto-[a-z]+-[0-9]$")', True),
        ('merchant.matches("exch")', True),
        ('merchant.matches("^exch")', False),
        ('channel + "/" + country == "online/FR"', True),
        ("'single' == \"single\"", True),
        ('"tab\\there" == "tab\\x09here"', True),
        ("flag == false", True),
        ("!flag", True),
        ("has(by_customer.count_1h)", True),
        ("has(by_customer.amount_ratio_30d)", False),
        ("has(terminal_id)", False),
        ("has(country)", True),
        ("0x10 == 16", True),
        ("1e3 == 1000", True),
        ("amount > 100 // a comment", True),
        ("country == null", False),
        ("country != null", True),
        ("[1, 2] == [1, 2]", True),
        ("[amount, 1] == [120, 1]", True),
        ("country in [ip_country, channel]", True),
        ("amount in [score, 1.0]", False),
    ],
)
def test_language(condition: str, expected: bool) -> None:
    """Each construct of the CEL subset evaluates as CEL defines it (numbers are one type)."""
    assert fires(condition) is expected


@pytest.mark.parametrize(
    ("condition", "changes"),
    [
        ("amount > 1", {"amount": None}),
        ("country != ip_country", {"ip_country": None}),
        ("country != ip_country", {"country": None}),
        ('!(channel == "pos")', {"channel": None}),
        ('merchant_category in ["5411"]', {"merchant_category": None}),
        ("!flag", {"flag": None}),
        ("by_customer.amount_ratio_30d > 5", {}),
        ("!(by_customer.amount_ratio_30d > 5)", {}),
        ("by_customer.amount_ratio_30d == by_customer.amount_ratio_30d", {}),
        ("by_terminal.count_1h >= 0", {}),
        ("by_customer.count_1h >= 0", {"by_customer": None}),
        ("by_customer.count_1h >= 0", {"by_customer": {}}),
        ("amount > 0 && by_customer.amount_ratio_30d > 0", {}),
        ("amount > 0 ? by_customer.amount_ratio_30d > 0 : true", {}),
        ("size(terminal_id) == 0", {}),
        ('terminal_id.startsWith("T")', {}),
        ('terminal_id.matches(".*")', {}),
        ('terminal_id.contains("")', {}),
        ("-score < 0", {"score": None}),
        ("amount / 0 > 1", {}),
        ("amount % 0 > 1", {}),
        ("terminal_id in []", {}),
        ("terminal_id in [country]", {}),
        ("country in [terminal_id]", {}),
        ("[terminal_id] == [terminal_id]", {}),
        ("size([terminal_id]) == 1", {}),
        ("amount > 0 ? terminal_id in [] : true", {}),
    ],
)
def test_touching_a_missing_value_means_the_rule_does_not_fire(
    condition: str, changes: dict[str, Any]
) -> None:
    """Absent fields, None and features an entity lacks make the condition false, not an error."""
    assert fires(condition, **changes) is False
    without = {key: value for key, value in {**BASE, **changes}.items() if value is not None}
    ruleset = parse_ruleset(one_rule(condition), SCHEMA)
    assert ruleset.evaluate(without).hits == ()


@pytest.mark.parametrize(
    ("condition", "changes", "expected"),
    [
        ("!has(by_customer.amount_ratio_30d) || by_customer.amount_ratio_30d > 5", {}, True),
        ("has(by_customer.amount_ratio_30d) && by_customer.amount_ratio_30d > 5", {}, False),
        ("amount > 100 || by_customer.amount_ratio_30d > 5", {}, True),
        ("amount > 1000 && by_customer.amount_ratio_30d > 5", {}, False),
        ("has(terminal_id) ? size(terminal_id) > 3 : true", {}, True),
        ("has(by_customer.seconds_since_last) && by_customer.seconds_since_last < 60", {}, True),
        ("has(by_customer.seconds_since_last)", {"by_customer": {}}, False),
        ("!has(ip_country)", {"ip_country": None}, True),
        ("score > 0.9 || amount > 100", {"score": None}, False),
        ("(has(score) && score > 0.9) || amount > 100", {"score": None}, True),
    ],
)
def test_guarded_access_to_missing_values(
    condition: str, changes: dict[str, Any], expected: bool
) -> None:
    """has() and short-circuit evaluation let a rule test values that may be missing."""
    assert fires(condition, **changes) is expected


def test_values_of_the_wrong_runtime_type_do_not_fire_or_raise() -> None:
    """An activation that breaks the schema makes that rule false instead of crashing."""
    assert fires("amount > 100", amount="lots") is False
    assert fires('merchant.startsWith("c")', merchant=42) is False
    assert fires("by_customer.count_1h > 1", by_customer={"count_1h": [1]}) is False


# ------------------------------------------------------------------------------------------
# Load-time errors


def error_of(text: str, source: str = "rules.yaml") -> str:
    with pytest.raises(RulesError) as caught:
        parse_ruleset(text, SCHEMA, source=source)
    return str(caught.value)


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("by_customer.cnt_1h > 5", 'unknown variable "by_customer.cnt_1h"'),
        ("amout > 5", 'unknown variable "amout"'),
        ("by_customer > 5", '"by_customer" is a map: use one of its fields'),
        ('amount > "5"', "cannot order number > string"),
        ("country == 5", "cannot compare string == number"),
        ("amount", "condition must be a bool, got number"),
        ("amount > ", "syntax error at column 10: expected a value, name or '(', found end"),
        ("amount >> 5", "syntax error at column 9: expected a value, name or '(', found '>'"),
        ("(amount > 5", "syntax error at column 12: expected ')', found end of condition"),
        ("amount > 5 5", "syntax error at column 12: expected an operator or end of condition"),
        ("amount # 5", "syntax error at column 8: unexpected character '#'"),
        ("amount > 5u", "unsigned integer literal 5u is not supported"),
        ('amount in {"a": 1}', "map literals {...} are not supported"),
        ("merchant[0] == 'c'", "index access x[...] is not supported"),
        ('timestamp("2020-01-01T00:00:00Z") > 0', "unsupported function timestamp()"),
        ("[1, 2].exists(x, x > 1)", "unsupported function list.exists()"),
        ("merchant.lowerAscii() == 'a'", "unsupported function merchant.lowerAscii()"),
        ('merchant.matches("(")', "bad regular expression '('"),
        ("merchant.matches(channel)", "matches() needs a literal pattern"),
        ("!amount", "operator ! needs a bool, got number"),
        ("-country == 'x'", "operator - needs a number, got string"),
        ("amount > 1 && 'x'", "operator && needs bools, got bool && string"),
        ("amount * 'x' > 1", "operator * needs numbers, got number * string"),
        ("amount in 5", "right side of 'in' must be a list, got number"),
        ('amount in ["a"]', "cannot look for a number in a list of string"),
        ('[1, "a"] == [1]', "list mixes number and string elements"),
        ("(true ? 1 : 'a') == 1", "branches of ?: have different types: number and string"),
        ("(amount ? 1 : 2) == 1", "condition of ?: must be a bool, got number"),
        ("has(amount > 1)", "has() takes one field"),
        ("size(amount) > 1", "size() needs a string or list, got number"),
        ("merchant.startsWith(1)", "startsWith() needs strings, got string.startsWith(number)"),
        ("'\\q' == 'x'", "unknown escape sequence \\q in string"),
        ("if > 1", "reserved word 'if' cannot be used here"),
        (
            "by_customer.count_1h.x > 1",
            'field access ".x" on by_customer.count_1h is not supported',
        ),
        ("r'x' == 'x'", "r-prefixed string literals are not supported"),
    ],
)
def test_condition_errors_name_file_rule_and_problem(condition: str, message: str) -> None:
    """A bad condition stops the load with `file: rule "id": problem`."""
    text = one_rule(condition).replace('"id": "r1"', '"id": "velocity-1h"')
    assert error_of(text).startswith(f'rules.yaml: rule "velocity-1h": {message}')


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ('__import__("os").system("true")', "unsupported function __import__()"),
        ("amount.__class__ == 1", 'field access "amount.__class__" on number "amount"'),
        ("by_customer.__class__ > 1", 'unknown variable "by_customer.__class__"'),
        ("__builtins__ == 1", 'unknown variable "__builtins__"'),
        ('merchant.format("x") == ""', "unsupported function merchant.format()"),
        ("merchant.__len__() == 1", "unsupported function merchant.__len__()"),
        ('exec("1") == 1', "unsupported function exec()"),
    ],
)
def test_no_way_out_to_python(condition: str, message: str) -> None:
    """Attribute escapes and calls to Python functions are rejected when the file loads."""
    assert message in error_of(one_rule(condition))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: [\n", "rules.yaml: not valid YAML at line 2: "),
        (
            'version: "1"\nrules:\n  - id: a\n    condition: !has(score)\n',
            "rules.yaml: not valid YAML at line 4: could not determine a constructor for the tag"
            " '!has(score)' (quote a condition that starts with ! or contains ': ' or ' #')",
        ),
        (
            'version: "1"\nrules:\n  - id: a\n    condition: score > 1 ? true : false\n',
            "rules.yaml: not valid YAML at line 4: mapping values are not allowed",
        ),
        ("- a\n- b\n", "rules.yaml: must be a mapping with 'version' and 'rules'"),
        ("rules: []\n", "rules.yaml: version: must be a non-empty string, got None"),
        ("version: 2026-11-29\nrules: []\n", "rules.yaml: version: must be a non-empty string, got datetime.date(2026, 11, 29)"),
        ('version: "1"\nrules: {}\n', "rules.yaml: rules: must be a list of rules, got dict"),
        ('version: "1"\nrules: []\nextra: 1\n', "rules.yaml: unknown key 'extra' (expected 'version' and 'rules')"),
        ('version: "1"\nrules: [5]\n', "rules.yaml: rule #1: must be a mapping, got int"),
        (one_rule("amount > 1", action="deny"), "rules.yaml: rule \"r1\": unknown action 'deny' (expected one of block, review, allow)"),
        (one_rule("amount > 1", shadow="maybe"), "rules.yaml: rule \"r1\": shadow: must be true or false, got 'maybe'"),
        (one_rule("amount > 1", owner="me"), "rules.yaml: rule \"r1\": unknown field 'owner'"),
        ('version: "1"\nrules:\n  - {description: d, condition: amount > 1, action: block}\n', "rules.yaml: rule #1: missing field 'id'"),
        ('version: "1"\nrules:\n  - {id: a b, description: d, condition: amount > 1, action: block}\n', "rules.yaml: rule #1: id: must be letters, digits, '_.:-' (at most 100), got 'a b'"),
        ('version: "1"\nrules:\n  - {id: x, condition: amount > 1, action: block}\n', "rules.yaml: rule \"x\": missing field 'description'"),
        ('version: "1"\nrules:\n  - {id: x, description: d, condition: true, action: block}\n', 'rules.yaml: rule "x": condition: must be a string, got True'),
        ('version: "1"\nrules:\n  - {id: x, description: "{amont}", condition: amount > 1, action: block}\n', 'rules.yaml: rule "x": unknown variable "amont"'),
        ('version: "1"\nrules:\n  - {id: x, description: "{1 + 2}", condition: amount > 1, action: block}\n', 'rules.yaml: rule "x": description: placeholder {1 + 2} is not a variable name'),
    ],
)  # fmt: skip
def test_file_errors(text: str, message: str) -> None:
    """Structural problems of the file are reported with the file and rule they are in."""
    assert message in error_of(text)


def test_every_problem_is_reported_at_once_and_nothing_is_applied() -> None:
    """One load reports all bad rules; a file with one bad rule yields no ruleset at all."""
    text = textwrap.dedent(
        """\
        version: "2"
        rules:
          - {id: ok, description: fine, condition: amount > 1, action: block}
          - {id: a, description: d, condition: amount >, action: block}
          - {id: ok, description: d, condition: amount > 2, action: allow}
          - {id: b, description: d, condition: score > 1, action: nope}
        """
    )
    with pytest.raises(RulesError) as caught:
        parse_ruleset(text, SCHEMA, source="r.yaml")
    assert caught.value.problems == (
        "r.yaml: rule \"a\": syntax error at column 9: expected a value, name or '(', found end of condition",
        'r.yaml: rule "ok": duplicate id',
        "r.yaml: rule \"b\": unknown action 'nope' (expected one of block, review, allow)",
    )
    assert isinstance(caught.value, ConfigError)
    assert isinstance(caught.value, ValueError)


def test_unreadable_file_is_a_rules_error(tmp_path: Path) -> None:
    """A missing rules file stops start-up with its path in the message."""
    with pytest.raises(RulesError, match=r"nope\.yaml: cannot read: .*No such file"):
        load_ruleset(tmp_path / "nope.yaml", SCHEMA)


def test_bad_schema_is_a_programming_error() -> None:
    """The schema comes from code; a wrong type name is a ValueError naming the variable."""
    with pytest.raises(ValueError, match=r"schema: by_x\.n: type must be one of"):
        parse_ruleset(one_rule("true"), {"by_x": {"n": "int"}})


# ------------------------------------------------------------------------------------------
# Default ruleset, decisions, shadow, rendering


@pytest.fixture(scope="module")
def default() -> Ruleset:
    """The bundled ruleset, checked against the variables the detector really provides."""
    return load_rules(DetectorConfig(), state_config(None))


@pytest.mark.parametrize(
    ("amount", "decision"),
    [(0.0, "allow"), (999.99, "allow"), (1000.0, "allow"), (1000.01, "block"), (1e9, "block")],
)
def test_default_ruleset_keeps_the_original_behaviour(
    default: Ruleset, amount: float, decision: str
) -> None:
    """amount > 1000 blocks, 1000 itself does not, as the original function did."""
    assert default.evaluate({"amount": amount}).decision == decision


def test_default_ruleset_allows_an_ordinary_lone_transaction(default: Ruleset) -> None:
    """A first transaction with no history and no score is allowed with no reasons."""
    lone = {"amount": 25.0, "country": "FR", "by_customer": {}, "by_terminal": {}}
    assert default.evaluate(lone) == Evaluation("allow", ())


def test_default_ruleset_hit(default: Ruleset) -> None:
    """The blocking hit says which rule, why, and with which values."""
    evaluation = default.evaluate({"amount": 1500.0})
    assert [hit.as_dict() for hit in evaluation.hits] == [
        {
            "rule": "large-amount",
            "action": "block",
            "description": "Amount 1500 is over the limit of 1000",
            "shadow": False,
            "values": {"amount": 1500.0},
        }
    ]
    assert default.version == "2026-12-04.1"
    assert {"amount", "score"} <= default.variables  # score: the model-block and model-review rules


RULES = textwrap.dedent(
    """\
    version: "p1"
    rules:
      - {id: rev, description: r, condition: amount > 10, action: review}
      - {id: trusted, description: t, condition: 'merchant == "trusted"', action: allow}
      - {id: blk, description: b, condition: amount > 100, action: block}
      - {id: shadow-blk, description: s, condition: amount > 50, action: block, shadow: true}
      - {id: shadow-allow, description: a, condition: amount > 0, action: allow, shadow: true}
      - {id: rev2, description: r2, condition: score > 0.5, action: review}
    """
)


@pytest.mark.parametrize(
    ("activation", "decision", "order"),
    [
        ({"amount": 5.0}, "allow", ["shadow-allow"]),
        ({"amount": 20.0}, "review", ["rev", "shadow-allow"]),
        ({"amount": 60.0, "score": 0.7}, "review", ["shadow-blk", "rev", "rev2", "shadow-allow"]),
        ({"amount": 500.0}, "block", ["blk", "shadow-blk", "rev", "shadow-allow"]),
        (
            {"amount": 500.0, "merchant": "trusted"},
            "allow",
            ["blk", "shadow-blk", "rev", "trusted", "shadow-allow"],
        ),
        ({"amount": 0.0}, "allow", []),
    ],
)
def test_precedence_shadow_and_order(
    activation: dict[str, Any], decision: str, order: list[str]
) -> None:
    """Allow-lists win, then block, then review; shadow hits are reported but never decide."""
    evaluation = parse_ruleset(RULES, SCHEMA).evaluate(activation)
    assert evaluation.decision == decision
    assert [hit.rule for hit in evaluation.hits] == order
    assert [hit.shadow for hit in evaluation.hits] == [r.startswith("shadow") for r in order]


@pytest.mark.parametrize(
    ("description", "activation", "rendered"),
    [
        (
            "{by_customer.count_1h} transactions in 1 h, limit 5",
            {"by_customer": {"count_1h": 7.0}},
            "7 transactions in 1 h, limit 5",
        ),
        ("Amount {amount}", {"amount": 1234.5}, "Amount 1234.50"),
        ("Amount { amount }", {"amount": 3}, "Amount 3"),
        ("score {score}", {"score": 0.91234}, "score 0.91"),
        ("{country}/{ip_country}", {"country": "FR", "ip_country": "US"}, "FR/US"),
        ("flag={flag}", {"flag": True}, "flag=true"),
        ("ratio {by_customer.amount_ratio_30d}", {}, "ratio n/a"),
        ("braces {{literal}} and {amount}", {"amount": 2.0}, "braces {literal} and 2"),
        ("no placeholders", {}, "no placeholders"),
    ],
)
def test_descriptions_render_values_at_hit_time(
    description: str, activation: dict[str, Any], rendered: str
) -> None:
    """Placeholders show the values seen, ints without .0 and floats to 2 decimals."""
    text = f'version: "1"\nrules:\n  - id: x\n    description: "{description}"\n    condition: "true"\n    action: review\n'
    hits = parse_ruleset(text, SCHEMA).evaluate(activation).hits
    assert hits[0].description == rendered


def test_hit_values_and_ruleset_variables() -> None:
    """A hit carries every variable its condition reads; the ruleset lists all it needs."""
    text = textwrap.dedent(
        """\
        version: "v"
        rules:
          - id: velocity
            description: "{by_customer.count_1h} in 1 h for {channel}"
            condition: by_customer.count_1h >= 5 && amount > 3.0 * by_customer.mean_30d
            action: review
          - {id: ratio, description: r, condition: "has(by_customer.amount_ratio_30d)", action: review}
        """
    )
    ruleset = parse_ruleset(text, SCHEMA)
    assert ruleset.variables == frozenset(
        {"amount", "by_customer.count_1h", "by_customer.mean_30d", "channel",
         "by_customer.amount_ratio_30d"}
    )  # fmt: skip
    assert ruleset.rules[0].variables == frozenset(
        {"amount", "by_customer.count_1h", "by_customer.mean_30d"}
    )
    (hit,) = ruleset.evaluate(BASE).hits
    assert hit.values == {
        "amount": 120.0,
        "by_customer.count_1h": 7.0,
        "by_customer.mean_30d": 30.0,
    }
    assert hit.description == "7 in 1 h for online"


def test_ruleset_is_frozen(default: Ruleset) -> None:
    """A loaded ruleset cannot be changed after the fact."""
    with pytest.raises(AttributeError):
        default.version = "x"  # type: ignore[misc]


def test_evaluate_does_not_mutate_the_activation(default: Ruleset) -> None:
    """The caller's activation is left as it was."""
    activation = {"amount": 1500.0, "by_customer": {}}
    default.evaluate(activation)
    assert activation == {"amount": 1500.0, "by_customer": {}}


# ------------------------------------------------------------------------------------------
# Property: the compiled evaluator agrees with a straightforward tree-walking interpreter.


class Missing(Exception):
    """A reference-interpreter error: the rule does not fire."""


NUMBER_VARS = ["amount", "score", "by_customer.count_1h", "by_customer.mean_30d"]
STRING_VARS = ["country", "ip_country", "channel"]
STRINGS = ["FR", "US", "online", "", "on"]

numbers = st.one_of(st.integers(-5, 5), st.sampled_from([0.5, -1.5, 2.0, 1e3, 0.0])).map(
    lambda v: ("lit", v)
)
strings = st.sampled_from(STRINGS).map(lambda v: ("lit", v))
num_leaf = st.one_of(numbers, st.sampled_from(NUMBER_VARS).map(lambda v: ("var", v)))
str_leaf = st.one_of(strings, st.sampled_from(STRING_VARS).map(lambda v: ("var", v)))


def num_tree(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.tuples(st.sampled_from(["+", "-", "*", "/", "%"]), children, children).map(
            lambda t: ("op", *t)
        ),
        children.map(lambda c: ("neg", c)),
    )


num_expr = st.recursive(num_leaf, num_tree, max_leaves=4)
str_expr = st.recursive(
    str_leaf, lambda c: st.tuples(st.just("+"), c, c).map(lambda t: ("op", *t)), max_leaves=3
)
bool_leaf = st.one_of(
    st.tuples(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), num_expr, num_expr).map(
        lambda t: ("op", *t)
    ),
    st.tuples(st.sampled_from(["==", "!=", "<"]), str_expr, str_expr).map(lambda t: ("op", *t)),
    st.tuples(str_expr, st.lists(st.sampled_from(STRINGS), max_size=3)).map(lambda t: ("in", *t)),
    st.tuples(num_expr, st.lists(num_expr, max_size=3)).map(lambda t: ("in-exprs", *t)),
    st.sampled_from([*NUMBER_VARS, *STRING_VARS, "flag"]).map(lambda v: ("has", v)),
    st.tuples(st.sampled_from(["startsWith", "endsWith", "contains"]), str_expr, str_expr).map(
        lambda t: ("call", *t)
    ),
    st.tuples(str_expr, st.sampled_from(["^F", "S$", "n"])).map(lambda t: ("matches", *t)),
    st.tuples(str_expr, num_expr).map(lambda t: ("size", *t)),
    st.booleans().map(lambda v: ("lit", v)),
    st.just(("var", "flag")),
)
bool_expr = st.recursive(
    bool_leaf,
    lambda c: st.one_of(
        st.tuples(st.sampled_from(["&&", "||"]), c, c).map(lambda t: ("op", *t)),
        c.map(lambda x: ("not", x)),
        st.tuples(c, c, c).map(lambda t: ("cond", *t)),
    ),
    max_leaves=6,
)


def render(tree: Any) -> str:
    """CEL text of a generated tree, fully parenthesised."""
    kind = tree[0]
    if kind == "lit":
        value = tree[1]
        if isinstance(value, bool):
            return "true" if value else "false"
        return f'"{value}"' if isinstance(value, str) else repr(value)
    if kind == "var":
        return tree[1]
    if kind == "op":
        return f"({render(tree[2])} {tree[1]} {render(tree[3])})"
    if kind == "neg":
        return f"(-{render(tree[1])})"
    if kind == "not":
        return f"(!{render(tree[1])})"
    if kind == "cond":
        return f"({render(tree[1])} ? {render(tree[2])} : {render(tree[3])})"
    if kind == "in":
        items = ", ".join(f'"{s}"' for s in tree[2])
        return f"({render(tree[1])} in [{items}])"
    if kind == "in-exprs":
        return f"({render(tree[1])} in [{', '.join(render(item) for item in tree[2])}])"
    if kind == "has":
        return f"has({tree[1]})"
    if kind == "call":
        return f"{render(tree[2])}.{tree[1]}({render(tree[3])})"
    if kind == "matches":
        return f'{render(tree[1])}.matches("{tree[2]}")'
    assert kind == "size"
    return f"(size({render(tree[1])}) > {render(tree[2])})"


def lookup(activation: dict[str, Any], name: str) -> Any:
    if "." in name:
        top, leaf = name.split(".")
        value = (activation.get(top) or {}).get(leaf)
    else:
        value = activation.get(name)
    return value


def interpret(tree: Any, activation: dict[str, Any]) -> Any:
    """Evaluate a generated tree directly; raise Missing on any CEL error."""
    kind = tree[0]
    if kind == "lit":
        return tree[1]
    if kind == "var":
        value = lookup(activation, tree[1])
        if value is None:
            raise Missing
        return value
    if kind == "has":
        return lookup(activation, tree[1]) is not None
    if kind == "not":
        return not interpret(tree[1], activation)
    if kind == "neg":
        return -interpret(tree[1], activation)
    if kind == "cond":
        branch = tree[2] if interpret(tree[1], activation) else tree[3]
        return interpret(branch, activation)
    if kind == "in":
        return interpret(tree[1], activation) in tree[2]
    if kind == "in-exprs":
        needle = interpret(tree[1], activation)
        return needle in [interpret(item, activation) for item in tree[2]]
    if kind == "matches":
        return re.search(tree[2], interpret(tree[1], activation)) is not None
    if kind == "size":
        return len(interpret(tree[1], activation)) > interpret(tree[2], activation)
    if kind == "call":
        target = interpret(tree[2], activation)
        arg = interpret(tree[3], activation)
        return {
            "startsWith": target.startswith,
            "endsWith": target.endswith,
            "contains": target.__contains__,
        }[tree[1]](arg)
    op, left_tree, right_tree = tree[1], tree[2], tree[3]
    left = interpret(left_tree, activation)
    if op == "&&":
        return left and interpret(right_tree, activation)
    if op == "||":
        return left or interpret(right_tree, activation)
    right = interpret(right_tree, activation)
    try:
        return {
            "+": lambda: left + right,
            "-": lambda: left - right,
            "*": lambda: left * right,
            "/": lambda: left / right,
            "%": lambda: math.fmod(left, right),
            "<": lambda: left < right,
            "<=": lambda: left <= right,
            ">": lambda: left > right,
            ">=": lambda: left >= right,
            "==": lambda: left == right,
            "!=": lambda: left != right,
        }[op]()
    except (ZeroDivisionError, ValueError, OverflowError) as error:
        raise Missing from error


maybe = lambda values: st.one_of(st.none(), values)  # noqa: E731
activations = st.fixed_dictionaries(
    {
        "amount": maybe(st.sampled_from([0.0, 1.0, 2.5, 1000.0, -3.0])),
        "score": maybe(st.sampled_from([0.0, 0.5, 1.0])),
        "country": maybe(st.sampled_from(STRINGS)),
        "ip_country": maybe(st.sampled_from(STRINGS)),
        "channel": maybe(st.sampled_from(STRINGS)),
        "flag": maybe(st.booleans()),
        "by_customer": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {},
                optional={
                    "count_1h": st.sampled_from([0.0, 1.0, 5.0]),
                    "mean_30d": st.sampled_from([0.0, 2.5]),
                },
            ),
        ),
    }
)


@settings(max_examples=400, deadline=None)
@given(tree=bool_expr, activation=activations)
def test_compiled_rules_agree_with_a_reference_interpreter(
    tree: Any, activation: dict[str, Any]
) -> None:
    """For random conditions and activations with missing values, fired == interpreted true."""
    try:
        expected = interpret(tree, activation) is True
    except Missing:
        expected = False
    condition = render(tree)
    ruleset = parse_ruleset(one_rule(condition), SCHEMA)
    assert bool(ruleset.evaluate(activation).hits) is expected, (condition, ruleset.source)


@pytest.mark.parametrize(
    "condition",
    [
        " && ".join(["amount > 1"] * 99),
        "!" * 99 + "true",
        "(" * 40 + "amount > 1" + ")" * 40,
        "1 + " * 98 + "1 > 0",
    ],
)
def test_conditions_up_to_the_depth_limit_load(condition: str) -> None:
    """Long chains and deep nesting up to MAX_DEPTH levels compile and run."""
    parse_ruleset(one_rule(condition), SCHEMA).evaluate(BASE)


@pytest.mark.parametrize(
    "condition",
    [
        " && ".join(["amount > 1"] * 101),
        "!" * 101 + "true",
        "(" * 2000 + "true" + ")" * 2000,
        "-" * 5000 + "amount > 1",
    ],
)
def test_conditions_nested_too_deeply_are_rejected(condition: str) -> None:
    """Deeper conditions are a load error, not a crash of the parser or of Python's compiler."""
    assert "condition is nested too deeply: more than 100 levels" in error_of(one_rule(condition))


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("amount > 1e999", "number literal 1e999 is out of range (not finite)"),
        ("amount > -1e999", "number literal 1e999 is out of range (not finite)"),
        ("amount < " + "9" * 5000, "integer literal of 5000 characters is out of range"),
        ("amount < 0x" + "f" * 5000, "integer literal of 5002 characters is out of range"),
        ("amount < 9223372036854775808", "integer literal 9223372036854775808 is out of range"),
    ],
)
def test_literals_that_cannot_run_are_rejected_naming_the_rule(
    condition: str, message: str
) -> None:
    """Numbers CEL cannot hold (64-bit ints, finite doubles) are load errors, not a crash later."""
    assert error_of(one_rule(condition)).startswith(f'rules.yaml: rule "r1": {message}')


def test_the_largest_integer_literals_load() -> None:
    """The 64-bit range's edges are accepted."""
    assert fires("amount < 9223372036854775807 && amount > -9223372036854775808")


@pytest.mark.parametrize(
    ("description", "message"),
    [
        ("{" + "(" * 150 + "amount" + ")" * 150 + "}", "is not a variable name"),
        ("{" + "(" * 5000 + "amount" + ")" * 5000 + "}", "is not a variable name"),
        ("{" + "!" * 5000 + "amount}", "is not a variable name"),
    ],
)
def test_deep_placeholders_are_rejected_naming_the_rule(description: str, message: str) -> None:
    """A placeholder nested too deeply is a rules error, not a RecursionError."""
    assert message in error_of(one_rule("amount > 1", description=description))


def test_a_description_with_many_placeholders_loads_and_formats() -> None:
    """Thousands of placeholders compile (no expression too deep for Python's compiler)."""
    ruleset = parse_ruleset(one_rule("amount > 1", description="{amount}," * 5000), SCHEMA)
    [hit] = ruleset.evaluate(BASE).hits
    assert hit.description == "120," * 5000


def test_matches_is_linear_time() -> None:
    """RE2 semantics: a pattern that backtracks exponentially in `re` runs in microseconds."""
    import time

    ruleset = parse_ruleset(one_rule('merchant.matches("^(a|aa)+$")'), SCHEMA)
    started = time.perf_counter()
    evaluation = ruleset.evaluate({**BASE, "merchant": "a" * 40 + "b"})
    assert time.perf_counter() - started < 0.05  # `re` takes hours on this input
    assert evaluation.hits == ()
    assert ruleset.evaluate({**BASE, "merchant": "a" * 40}).hits


@pytest.mark.parametrize("pattern", ["(a)\\\\1", "a(?=b)", "a(?!b)", "(?<=a)b", "(?<!a)b"])
def test_patterns_re2_cannot_run_are_rejected(pattern: str) -> None:
    """Backreferences and lookaround (not RE2) are load errors naming the rule and the pattern."""
    error = error_of(one_rule(f'merchant.matches("{pattern}")'))
    assert error.startswith('rules.yaml: rule "r1": bad regular expression ')


def test_empty_ruleset_allows_everything() -> None:
    """A file with no rules is valid and allows every transaction."""
    ruleset = parse_ruleset('version: "empty"\nrules: []\n', SCHEMA)
    assert ruleset.evaluate(BASE) == Evaluation("allow", ())
    assert ruleset.variables == frozenset()


# ------------------------------------------------------------------------------------------
# Agreement with a real CEL implementation (cel-python) where the languages coincide.

CEL_CONDITIONS = [
    "amount > 1000.0",
    "by_customer.count_1h >= 5.0 && amount > 3.0 * by_customer.mean_30d",
    "country != ip_country && amount > 500.0",
    'merchant_category in ["7995", "6051"]',
    "score > 0.9",
    '!(channel == "pos") || score >= 0.5',
    'merchant.startsWith("crypto") && merchant.endsWith("-7")',
    'merchant.contains("exch") ? amount > 100.0 : amount > 10.0',
    'merchant.matches("^crypto-[a-z]+") && size(country) == 2',
    "has(by_customer.seconds_since_last) && by_customer.seconds_since_last < 30.0",
    "(amount - by_customer.mean_30d) / by_customer.mean_30d > 2.5",
    '-amount < -100.0 && country + ip_country == "FRFR"',
]
CEL_ACTIVATIONS = [
    BASE,
    {**BASE, "amount": 1500.0, "ip_country": "US", "score": 0.95, "merchant_category": "7995"},
    {**BASE, "channel": "pos", "merchant": "grocer", "by_customer": {"count_1h": 1.0, "mean_30d": 500.0}},
    {**BASE, "amount": 5.0, "country": "GB", "by_customer": {"count_1h": 9.0, "mean_30d": 1.0}},
]  # fmt: skip


@pytest.mark.parametrize("condition", CEL_CONDITIONS)
def test_agrees_with_cel_python_on_complete_activations(condition: str) -> None:
    """Where every value is present, a rule fires exactly when cel-python says true."""
    celpy = pytest.importorskip("celpy")
    environment = celpy.Environment()
    program = environment.program(environment.compile(condition))
    ruleset = parse_ruleset(one_rule(condition), SCHEMA)
    outcomes = []
    for activation in CEL_ACTIVATIONS:
        present = {key: value for key, value in activation.items() if value is not None}
        expected = program.evaluate(celpy.json_to_cel(present))
        fired = bool(ruleset.evaluate(activation).hits)
        assert fired is (isinstance(expected, celpy.celtypes.BoolType) and bool(expected))
        outcomes.append(fired)
    assert len(set(outcomes)) == 2, "each condition must fire on some activations, not all"
