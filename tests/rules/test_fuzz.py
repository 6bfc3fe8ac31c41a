"""Rule files from a fuzzer: each is refused with a RulesError or runs on any activation."""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.errors import RulesError
from detector.rules import ACTIONS, parse_ruleset

SCHEMA: dict[str, Any] = {
    "amount": "number",
    "score": "number",
    "merchant": "string",
    "country": "string",
    "flag": "bool",
    "by_card": {"count_1h": "number", "mean_30d": "number"},
}
NAMES = ["amount", "score", "merchant", "country", "flag", "by_card.count_1h", "by_card.mean_30d"]

#: Pieces of conditions: names, every operator, literals at the edges of what is valid.
TOKENS = st.sampled_from(
    [
        *NAMES, "by_card", "nope", "has", "size", ".size()", ".matches", ".contains",
        ".startsWith", "(", ")", "[", "]", ",", "?", ":", "!", "-", "+", "*", "/", "%",
        "&&", "||", "==", "!=", "<", "<=", ">", ">=", " in ", "true", "false", "null", "0",
        "1", "2.5", "1e308", "1e999", "9223372036854775807", "9223372036854775808",
        "0xFFFFFFFFFFFFFFFF", "9" * 30, '"a"', '"^(a|aa)+$"', '"(a)\\\\1"', '"a(?=b)"',
        '"["', "'x'", '"\\q"', "if", "{", "}",
    ]
)  # fmt: skip
SOUP = st.lists(TOKENS, min_size=1, max_size=25).map(" ".join)

NUMBER = st.one_of(
    st.sampled_from(NAMES[:2] + NAMES[5:]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(-(2**63), 2**63 - 1).map(str),
)
STRING = st.one_of(
    st.sampled_from(["merchant", "country"]),
    st.text(alphabet="ab^$|()+*?.", max_size=8).map(lambda t: '"' + t.replace('"', "") + '"'),
)


@st.composite
def conditions(draw: st.DrawFn, depth: int = 0) -> str:
    """A condition that is often well typed, sometimes deep, sometimes nonsense."""
    if draw(st.integers(0, 39)) == 7:
        return draw(SOUP)
    if depth > 3:
        return f"{draw(NUMBER)} > {draw(NUMBER)}"
    kind = draw(st.sampled_from(["cmp", "and", "or", "not", "cond", "str", "has", "in", "deep"]))
    if kind == "cmp":
        op = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
        left, right = draw(NUMBER), draw(NUMBER)
        arith = draw(st.sampled_from(["", " + 1", " * 1e300", " / 0", " % 0", " - amount"]))
        return f"{left}{arith} {op} {right}"
    if kind in ("and", "or"):
        joiner = " && " if kind == "and" else " || "
        return joiner.join([draw(conditions(depth + 1)) for _ in range(draw(st.integers(2, 3)))])
    if kind == "not":
        return f"!({draw(conditions(depth + 1))})"
    if kind == "cond":
        return (
            f"({draw(conditions(depth + 1))}) ? ({draw(conditions(depth + 1))})"
            f" : ({draw(conditions(depth + 1))})"
        )
    if kind == "str":
        method = draw(st.sampled_from(["matches", "contains", "startsWith", "endsWith"]))
        return f"{draw(STRING)}.{method}({draw(STRING)})"
    if kind == "has":
        return f"has({draw(st.sampled_from(NAMES))})"
    if kind == "in":
        items = draw(st.lists(NUMBER, max_size=3))
        return f"{draw(NUMBER)} in [{', '.join(items)}]"
    levels = draw(st.integers(90, 110))
    return "(" * levels + "amount > 1" + ")" * levels


DESCRIPTIONS = st.lists(
    st.one_of(
        st.text(max_size=5),
        st.sampled_from(["{amount}", "{by_card.count_1h}", "{{", "}}", "{", "}", "{nope}"]),
        st.integers(1, 300).map(lambda n: "{" + "(" * n + "amount" + ")" * n + "}"),
        st.integers(1, 3000).map(lambda n: "{score}" * n),
    ),
    max_size=4,
).map("".join)

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=2),
)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` nineteen times in twenty, so most files get as far as running."""
    return st.integers(0, 19).flatmap(lambda n: bad if n == 7 else good)


@st.composite
def rules(draw: st.DrawFn) -> list[dict[str, Any]]:
    entries = []
    for number in range(draw(st.integers(0, 4))):
        entry = {
            "id": draw(mostly(st.just(f"r{number}"), st.one_of(st.just("r0"), ANY_VALUE))),
            "description": draw(mostly(DESCRIPTIONS, ANY_VALUE)),
            "condition": draw(mostly(conditions(), ANY_VALUE)),
            "action": draw(mostly(st.sampled_from(ACTIONS), st.text(max_size=3))),
        }
        if draw(st.booleans()):
            entry["shadow"] = draw(mostly(st.booleans(), ANY_VALUE))
        if draw(st.integers(0, 19)) == 7:
            entry[draw(st.text(max_size=3))] = draw(ANY_VALUE)
        entries.append(entry)
    return entries


DOCUMENTS = mostly(
    st.fixed_dictionaries({"version": mostly(st.just("v1"), ANY_VALUE), "rules": rules()}),
    st.one_of(ANY_VALUE, st.fixed_dictionaries({"other": ANY_VALUE})),
)
TEXTS = mostly(
    DOCUMENTS.map(lambda document: yaml.safe_dump(document, allow_unicode=True)),
    st.text(max_size=60),
)

NUMBER_VALUE = st.one_of(st.none(), st.floats(), st.integers(-(10**6), 10**6))
STRING_VALUE = st.one_of(st.none(), st.text(max_size=50))
ACTIVATIONS = st.fixed_dictionaries(
    {},
    optional={
        "amount": NUMBER_VALUE,
        "score": NUMBER_VALUE,
        "merchant": STRING_VALUE,
        "country": STRING_VALUE,
        "flag": st.one_of(st.none(), st.booleans()),
        "by_card": st.fixed_dictionaries(
            {}, optional={"count_1h": NUMBER_VALUE, "mean_30d": NUMBER_VALUE}
        ),
    },
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(text=TEXTS, data=st.data())
def test_every_rule_file_is_refused_by_name_or_runs_everywhere(
    text: str, data: st.DataObject
) -> None:
    """Either a RulesError (each problem naming the file) or a ruleset that never raises."""
    try:
        ruleset = parse_ruleset(text, SCHEMA, source="fuzz.yaml")
    except RulesError as error:
        assert error.problems
        assert all(problem.startswith("fuzz.yaml: ") for problem in error.problems)
        return
    for _ in range(5):
        activation = data.draw(ACTIVATIONS)
        started = time.perf_counter()
        evaluation = ruleset.evaluate(activation)
        assert time.perf_counter() - started < 1.0
        assert evaluation.decision in ACTIONS


@pytest.mark.parametrize(
    "text",
    [
        # A few kilobytes of YAML whose aliases expand to 10**9 values if printed in full.
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n"
            for i in range(8)
        )
        + "version: v1\nrules:\n- id: r1\n  description: *i\n  condition: *i\n  action: *i\n",
    ],
)
def test_an_alias_bomb_is_refused_quickly(text: str) -> None:
    """Errors show a bounded part of a bad value, so a small file cannot make a huge message."""
    started = time.perf_counter()
    with pytest.raises(RulesError) as caught:
        parse_ruleset(text, SCHEMA, source="bomb.yaml")
    assert time.perf_counter() - started < 1.0
    assert len(str(caught.value)) < 2000
