"""The fast check in `validate` admits only what the pydantic model accepts, with the same values."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.errors import InvalidTransaction
from detector.transaction import TEXT_MAX, Transaction, schema_model, validate

#: Built once here: the first build takes a few hundred milliseconds.
MODEL = schema_model()
TEXTS = st.one_of(
    st.text(max_size=4),
    st.sampled_from(
        [
            "",
            " ",
            "x" * TEXT_MAX,
            "x" * (TEXT_MAX + 1),
            "USD",
            "usd",
            "USD\n",
            "a\x00",
            "\x9f",
            "\u00a0",
        ]
    ),
)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXTS,
    st.sampled_from(
        [
            "12.50", " 7 ", "1e5", "-3", "NaN",
            "2024-01-01T10:00:00Z", "2024-01-01T10:00:00", "2024-01-01", "yesterday",
            "2024-02-30T10:00:00+01:00",
        ]
    ),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)  # fmt: skip
VALID_TEXT = st.text(min_size=1, max_size=4)
GOOD = {
    "amount": st.one_of(
        st.floats(min_value=0, max_value=1e6), st.integers(0, 10**6), st.just("12.50")
    ),
    "customer_id": VALID_TEXT,
    "currency": st.sampled_from(["USD", "EUR"]),
    "timestamp": st.sampled_from(["2024-01-01T10:00:00Z", "2024-01-01T10:00:00+02:00"]),
}
#: Values at the edges of what is valid.
EDGE_VALUES = [
    "", "x" * TEXT_MAX, "x" * (TEXT_MAX + 1), float("inf"), float("-inf"), float("nan"),
    -0.0, -1, 0, 1.7976931348623157e308, 1e12, 1e12 + 1, "1000000000000.01", 1e303, True,
    False, None, "USD\n", "usd", "EURO", 7, "a\x00b", "\x7f", "a\x85", "x" * (TEXT_MAX - 1) + "\x01",
]  # fmt: skip
EDGES = st.sampled_from(EDGE_VALUES)
#: A transaction with every field set and valid.
FULL = {
    "amount": 12.5, "customer_id": "c", "transaction_id": "t", "currency": "EUR",
    "timestamp": "2024-01-01T10:00:00Z", "merchant": "m", "card_id": "k", "terminal_id": "p",
    "merchant_category": "5411", "country": "FR", "ip_country": "FR", "channel": "pos",
}  # fmt: skip
#: Valid transactions...
VALID = st.fixed_dictionaries(
    {"amount": GOOD["amount"], "customer_id": GOOD["customer_id"]},
    optional={name: GOOD.get(name, VALID_TEXT) for name in Transaction.model_fields[2:]},
)
#: ...with up to two fields added, replaced or removed.
CHANGES = st.dictionaries(
    st.sampled_from([*Transaction.model_fields, "loyalty", "decision"]),
    st.one_of(st.just(DELETE := object()), EDGES, VALUES),
    max_size=2,
)


def changed(record: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    result = {**record, **changes}
    return {name: value for name, value in result.items() if value is not DELETE}


RECORDS = st.builds(changed, VALID, CHANGES)


def assert_agree(raw: dict[str, Any]) -> None:
    reserved = [name for name in raw if name == "decision"]
    try:
        expected = MODEL.model_validate(raw)
        expected_fields = reserved
    except pydantic.ValidationError as error:
        expected = None
        expected_fields = reserved + [str(item["loc"][0]) for item in error.errors()]
    try:
        got = validate(raw)
    except InvalidTransaction as error:
        assert [name for name, _ in error.problems] == expected_fields
        return
    assert expected_fields == []
    assert expected is not None
    for name in Transaction.model_fields:
        assert getattr(got, name) == getattr(expected, name), name


@pytest.mark.parametrize("name", [*Transaction.model_fields, "decision"])
@pytest.mark.parametrize("value", EDGE_VALUES, ids=repr)
def test_each_field_at_each_edge_agrees(name: str, value: object) -> None:
    """One field of a full, valid transaction set to an edge value: same outcome both ways."""
    assert_agree({**FULL, name: value})
    assert_agree({"amount": 1, "customer_id": "c", name: value})


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(RECORDS)
def test_validate_agrees_with_the_schema_model(raw: dict[str, Any]) -> None:
    """Same acceptance, same fields in error (in order), same values as the pydantic model."""
    assert_agree(raw)
