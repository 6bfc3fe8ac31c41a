"""Decoding and validation of transactions: bytes in, a frozen `Transaction` out.

The detector keeps the object it received (`Transaction.raw`) so the verdict can echo the
transaction's fields exactly as sent, including unknown ones; validation only reads it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema

from detector.errors import InvalidJSON, InvalidTransaction

#: Fields a verdict adds; a transaction may not carry them itself.
VERDICT_FIELDS = frozenset(
    {"is_fraud", "decision", "score", "reasons", "rules_version", "message_id", "decided_at"}
)

_DECIMAL = re.compile(r"\s*[0-9]+(\.[0-9]+)?\s*")


def _amount(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"must be a number or a decimal string, got {value!r}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            raise ValueError(f"must be a number or a decimal string, got {value!r}")
        try:
            number = float(Decimal(value))
        except InvalidOperation as error:  # pragma: no cover - the pattern rules this out
            raise ValueError(f"must be a decimal string, got {value!r}") from error
    else:
        raise ValueError(f"must be a number or a decimal string, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"must be finite, got {value!r}")
    if number < 0:
        raise ValueError(f"must be >= 0, got {value!r}")
    return number


def _timestamp(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"must be an RFC 3339 string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"must be an RFC 3339 date-time, got {value!r}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"must include a UTC offset (RFC 3339), got {value!r}")
    return parsed


Amount = Annotated[
    float,
    BeforeValidator(_amount),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*$"},
            ],
            "description": "Amount in the currency's major unit: a JSON number or a decimal string.",
        }
    ),
]
Timestamp = Annotated[
    datetime,
    BeforeValidator(_timestamp),
    WithJsonSchema({"type": "string", "format": "date-time", "description": "RFC 3339."}),
]
Text = Annotated[str, Field(min_length=1, max_length=256, strict=True)]


class Transaction(BaseModel):
    """A validated payment transaction.

    Only the fields the detector reads are typed here; any other field of the message is
    accepted and travels unchanged in `raw`.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    amount: Amount
    customer_id: Text
    transaction_id: Text | None = None
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$", strict=True)] = "USD"
    timestamp: Timestamp | None = None
    merchant: Text | None = None
    card_id: Text | None = None
    terminal_id: Text | None = None
    merchant_category: Text | None = None
    country: Text | None = None
    ip_country: Text | None = None
    channel: Text | None = None


_MESSAGES = {
    "missing": "is required",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} characters",
    "string_pattern_mismatch": "must match {pattern}",
}
_FIELD_MESSAGES = {
    ("currency", "string_pattern_mismatch"): "must be an ISO 4217 code of 3 capital letters",
}


def _problem(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "value_error":
        # Our own validators: the text after pydantic's "Value error, " prefix.
        return str(error["ctx"]["error"])
    template = _FIELD_MESSAGES.get((_field(error["loc"]), kind)) or _MESSAGES.get(kind)
    if template is None:
        return str(error["msg"])
    text = template.format(**error.get("ctx", {}))
    if kind != "missing":
        text += f", got {error['input']!r}"
    return text


def _field(location: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in location) or "(message)"


def parse_json(data: bytes) -> dict[str, Any]:
    """Parse message data as a UTF-8 JSON object.

    Raises:
        InvalidJSON: not UTF-8, not JSON, or JSON that is not an object.
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise InvalidJSON(f"data: not valid UTF-8 JSON ({error})") from None
    if not isinstance(value, dict):
        raise InvalidJSON(f"data: must be a JSON object, got {type(value).__name__}")
    return value


def validate(raw: dict[str, Any]) -> Transaction:
    """Validate a parsed transaction object, reporting every problem at once.

    Raises:
        InvalidTransaction: with one (field, problem) pair per invalid field.
    """
    problems: list[tuple[str, str]] = [
        (name, "is a verdict field and cannot be set by a transaction")
        for name in raw
        if name in VERDICT_FIELDS
    ]
    try:
        transaction = Transaction.model_validate(raw)
    except ValidationError as error:
        problems.extend((_field(item["loc"]), _problem(item)) for item in error.errors())
        raise InvalidTransaction(problems) from None
    if problems:
        raise InvalidTransaction(problems)
    return transaction


#: Avro type names that wrap a union's value in Avro's JSON encoding: {"string": "XYZ"}.
_AVRO_BRANCHES = frozenset({"string", "double", "float", "long", "int", "boolean", "bytes"})


def unwrap_avro_json(raw: dict[str, Any]) -> dict[str, Any]:
    """Turn a record in Avro's JSON encoding into plain JSON.

    A topic with an Avro schema and JSON encoding requires optional fields as unions, which
    Avro's JSON encoding writes as {"string": "XYZ Corp"}; the detector reads the value.
    """
    plain = {}
    for name, value in raw.items():
        if isinstance(value, dict) and len(value) == 1:
            ((branch, inner),) = value.items()
            if branch in _AVRO_BRANCHES:
                value = inner
        plain[name] = value
    return plain


def decode(data: bytes, *, avro_json: bool = False) -> tuple[dict[str, Any], Transaction]:
    """Parse and validate message data; returns the object as received and its validation.

    Args:
        data: the message data, a UTF-8 JSON object.
        avro_json: the object is in Avro's JSON encoding (the topic has an Avro schema).
    """
    raw = parse_json(data)
    if avro_json:
        raw = unwrap_avro_json(raw)
    return raw, validate(raw)


def rfc3339(moment: datetime) -> str:
    """Format an aware datetime as RFC 3339 in UTC with a Z suffix."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
