"""The hand-written transaction validation agrees with the pydantic model of the schema."""

from __future__ import annotations

from typing import Any

import pydantic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.errors import InvalidTransaction
from detector.transaction import TEXT_MAX, Transaction, schema_model, validate

#: Built once here: the first build takes a few hundred milliseconds.
MODEL = schema_model()
TEXTS = st.one_of(
    st.text(max_size=4),
    st.sampled_from(["", " ", "x" * TEXT_MAX, "x" * (TEXT_MAX + 1), "USD", "usd", "USD\n"]),
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
GOOD = {
    "amount": st.one_of(st.floats(min_value=0, max_value=1e6), st.sampled_from(["12.50"])),
    "customer_id": st.text(min_size=1, max_size=4),
    "currency": st.sampled_from(["USD", "EUR"]),
    "timestamp": st.sampled_from(["2024-01-01T10:00:00Z", "2024-01-01T10:00:00+02:00"]),
}
RECORDS = st.fixed_dictionaries(
    {},
    optional={
        name: st.one_of(GOOD.get(name, TEXTS), VALUES)
        for name in (*Transaction.model_fields, "loyalty", "decision")
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(RECORDS)
def test_validate_agrees_with_the_schema_model(raw: dict[str, Any]) -> None:
    """Same acceptance, same fields in error (in order), same values as the pydantic model."""
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
