"""Decoding and validation of transaction messages."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from detector.errors import InvalidJSON, InvalidTransaction
from detector.transaction import (
    AMOUNT_MAX,
    VERDICT_FIELDS,
    check_clock_skew,
    decode,
    unwrap_avro_json,
)

BLOG = {"amount": 1200, "merchant": "XYZ Corp", "customer_id": "12345"}


def test_blog_example_is_accepted_as_is() -> None:
    """The original example decodes, and the object as received is kept unchanged."""
    raw, transaction = decode(orjson.dumps(BLOG))
    assert raw == BLOG
    assert transaction.amount == 1200.0
    assert transaction.customer_id == "12345"
    assert transaction.merchant == "XYZ Corp"
    assert transaction.currency == "USD"
    assert transaction.timestamp is None


@pytest.mark.parametrize(
    ("amount", "expected"),
    [(0, 0.0), (12.5, 12.5), ("12.50", 12.5), ("1000", 1000.0), (10**9, 1e9)],
)
def test_amount_accepts_numbers_and_decimal_strings(amount: object, expected: float) -> None:
    """Amounts may be JSON numbers or decimal strings."""
    _, transaction = decode(orjson.dumps({"amount": amount, "customer_id": "c"}))
    assert transaction.amount == expected


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"amount": -5, "customer_id": "c"}, "amount: must be >= 0, got -5"),
        (
            {"amount": "1e5", "customer_id": "c"},
            "amount: must be a number or a decimal string, got '1e5'",
        ),
        (
            {"amount": "NaN", "customer_id": "c"},
            "amount: must be a number or a decimal string, got 'NaN'",
        ),
        (
            {"amount": True, "customer_id": "c"},
            "amount: must be a number or a decimal string, got True",
        ),
        (
            {"amount": None, "customer_id": "c"},
            "amount: must be a number or a decimal string, got NoneType",
        ),
        ({"customer_id": "c"}, "amount: is required"),
        ({"amount": 1}, "customer_id: is required"),
        ({"amount": 1, "customer_id": ""}, "customer_id: must not be empty, got ''"),
        ({"amount": 1, "customer_id": 12345}, "customer_id: must be a string, got 12345"),
        (
            {"amount": 1, "customer_id": "c", "currency": "usd"},
            "currency: must be an ISO 4217 code of 3 capital letters, got 'usd'",
        ),
        (
            {"amount": 1, "customer_id": "c", "timestamp": "yesterday"},
            "timestamp: must be an RFC 3339 date-time, got 'yesterday'",
        ),
        (
            {"amount": 1, "customer_id": "c", "timestamp": "2024-01-01T10:00:00"},
            "timestamp: must include a UTC offset (RFC 3339), got '2024-01-01T10:00:00'",
        ),
        (
            {"amount": 1, "customer_id": "c", "timestamp": 1700000000},
            "timestamp: must be an RFC 3339 string, got int",
        ),
        ({"amount": 1, "customer_id": "c", "merchant": 7}, "merchant: must be a string, got 7"),
        (
            {"amount": 1e303, "customer_id": "c"},
            "amount: must be <= 1e12, got 1e+303",
        ),
        (
            {"amount": "10000000000000.5", "customer_id": "c"},
            "amount: must be <= 1e12, got '10000000000000.5'",
        ),
        (
            {"amount": 1, "customer_id": "c", "transaction_id": "t\x00x"},
            "transaction_id: must not contain control characters, got U+0000 at position 2",
        ),
        (
            {"amount": 1, "customer_id": "c\x7f"},
            "customer_id: must not contain control characters, got U+007F at position 2",
        ),
        (
            {"amount": 1, "customer_id": "c", "merchant": "a\x85b"},
            "merchant: must not contain control characters, got U+0085 at position 2",
        ),
        (
            {"amount": 1, "customer_id": "c", "card_id": "k" * 257},
            "card_id: must be at most 256 characters, got '" + "k" * 99 + "...(259 characters)",
        ),
        (
            {"amount": 1, "customer_id": "c", "is_fraud": False},
            "is_fraud: is a verdict field and cannot be set by a transaction",
        ),
    ],
)
def test_invalid_transactions_name_the_field_and_problem(
    payload: dict[str, object], message: str
) -> None:
    """Each invalid field is reported with its name, its problem and the value."""
    with pytest.raises(InvalidTransaction) as caught:
        decode(orjson.dumps(payload))
    assert str(caught.value) == message


def test_every_problem_is_reported_at_once() -> None:
    """Validation collects every invalid field of a message, not just the first."""
    with pytest.raises(InvalidTransaction) as caught:
        decode(orjson.dumps({"amount": -1, "customer_id": "", "decision": "allow"}))
    fields = [field for field, _ in caught.value.problems]
    assert fields == ["decision", "amount", "customer_id"]


@pytest.mark.parametrize("name", sorted(VERDICT_FIELDS))
def test_each_verdict_field_is_reserved(name: str) -> None:
    """A transaction cannot smuggle in any verdict-only field."""
    with pytest.raises(InvalidTransaction, match=f"^{name}: is a verdict field"):
        decode(orjson.dumps({"amount": 1, "customer_id": "c", name: None}))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "data: not valid UTF-8 JSON"),
        (b"\xff\xfe", "data: not valid UTF-8 JSON"),
        (b"", "data: not valid UTF-8 JSON"),
        (b"[1, 2]", "data: must be a JSON object, got list"),
        (b"42", "data: must be a JSON object, got int"),
    ],
)
def test_data_that_is_not_a_json_object_is_invalid_json(data: bytes, message: str) -> None:
    """Bytes that are not one UTF-8 JSON object fail as invalid_json."""
    with pytest.raises(InvalidJSON, match=f"^{message}"):
        decode(data)


def test_unknown_fields_pass_through() -> None:
    """Fields the detector does not know are kept in the object as received."""
    raw, _ = decode(b'{"amount": 1, "customer_id": "c", "loyalty": {"tier": "gold"}}')
    assert raw["loyalty"] == {"tier": "gold"}


def test_avro_json_unions_are_unwrapped() -> None:
    """A record in Avro's JSON encoding reads like the plain one."""
    wrapped = {
        "amount": 1200.0,
        "customer_id": "12345",
        "merchant": {"string": "XYZ Corp"},
        "card_id": None,
    }
    assert unwrap_avro_json(wrapped) == {
        "amount": 1200.0,
        "customer_id": "12345",
        "merchant": "XYZ Corp",
        "card_id": None,
    }
    _, transaction = decode(orjson.dumps(wrapped), avro_json=True)
    assert transaction.merchant == "XYZ Corp"


@given(
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**13), max_value=10**13)
)
def test_amount_is_accepted_exactly_when_finite_and_in_range(amount: float) -> None:
    """Any number is accepted if and only if it is finite, >= 0 and <= AMOUNT_MAX."""
    data = (
        orjson.dumps({"amount": amount, "customer_id": "c"})
        if math.isfinite(amount)
        else (b'{"amount": ' + str(amount).encode() + b', "customer_id": "c"}')
    )
    valid = math.isfinite(amount) and 0 <= amount <= AMOUNT_MAX
    try:
        _, transaction = decode(data)
    except (InvalidTransaction, InvalidJSON):
        assert not valid
    else:
        assert valid
        assert transaction.amount == float(amount)


@pytest.mark.parametrize("name", ["customer_id", "transaction_id", "merchant", "channel"])
@pytest.mark.parametrize("control", ["\x00", "\x1f", "\x7f", "\x9f", "\n"])
def test_text_fields_reject_control_characters(name: str, control: str) -> None:
    """C0, DEL and C1 characters in an id or text field are invalid, naming the field."""
    payload = {"amount": 1, "customer_id": "c", name: f"ab{control}"}
    with pytest.raises(InvalidTransaction) as caught:
        decode(orjson.dumps(payload))
    assert caught.value.problems == [
        (name, f"must not contain control characters, got U+{ord(control):04X} at position 3")
    ]


def test_other_unicode_text_is_accepted() -> None:
    """Letters, spaces and symbols beyond ASCII are not control characters."""
    _, transaction = decode(orjson.dumps({"amount": 1, "customer_id": "Zoë\u00a0Ωmega 東京"}))
    assert transaction.customer_id == "Zoë\u00a0Ωmega 東京"


PUBLISHED_AT = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("timestamp", "valid"),
    [
        ("2026-11-29T12:05:00Z", True),  # exactly the allowed skew
        ("2026-11-29T12:05:00.001Z", False),
        ("2027-11-29T12:00:00Z", False),
        ("2026-11-29T14:04:00+02:00", True),  # offsets compare as instants
        ("2018-01-01T00:00:00Z", True),  # the past is lateness, judged by the store
    ],
)
def test_a_transaction_dated_too_far_after_its_publish_time_is_invalid(
    timestamp: str, valid: bool
) -> None:
    """More than max_skew after the reference time names `timestamp`, the limit and the value."""
    _, transaction = decode(orjson.dumps({"amount": 1, "customer_id": "c", "timestamp": timestamp}))
    if valid:
        check_clock_skew(transaction, PUBLISHED_AT, 300.0)
        return
    with pytest.raises(InvalidTransaction) as caught:
        check_clock_skew(transaction, PUBLISHED_AT, 300.0)
    assert caught.value.error_type == "invalid_transaction"
    sent = datetime.fromisoformat(timestamp).isoformat().replace("+00:00", "Z")
    assert str(caught.value) == (
        f"timestamp: must be at most 5m after the publish time 2026-11-29T12:00:00Z, got {sent!r}"
    )


def test_clock_skew_names_the_receive_time_and_ignores_undated_transactions() -> None:
    """The HTTP path's reference is named as such; a transaction without timestamp passes."""
    _, undated = decode(b'{"amount": 1, "customer_id": "c"}')
    check_clock_skew(undated, PUBLISHED_AT, 0.0)
    _, dated = decode(b'{"amount": 1, "customer_id": "c", "timestamp": "2026-11-29T12:01:31Z"}')
    with pytest.raises(
        InvalidTransaction, match=r"^timestamp: must be at most 90s after the receive time "
    ):
        check_clock_skew(dated, PUBLISHED_AT, 90.0, reference_name="receive time")
