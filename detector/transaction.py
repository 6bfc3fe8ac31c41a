"""Decoding and validation of transactions: bytes in, a frozen `Transaction` out.

The detector keeps the object it received (the dict `decode` returns) so the verdict can echo the
transaction's fields exactly as sent, including unknown ones; validation only reads it.
"""

from __future__ import annotations

import functools
import math
import re
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, NamedTuple

import orjson

from detector.errors import ConfigError, InvalidJSON, InvalidTransaction
from detector.vocabulary import format_duration

#: Fields a verdict adds; a transaction may not carry them itself.
VERDICT_FIELDS = frozenset(
    {"is_fraud", "decision", "score", "reasons", "rules_version", "message_id", "decided_at"}
)

_DECIMAL = re.compile(r"\s*[0-9]+(\.[0-9]+)?\s*")
_CURRENCY = re.compile(r"[A-Z]{3}")
#: Limit of every text field (`customer_id`, `merchant`...), in characters.
TEXT_MAX = 256
#: Largest amount accepted, in the currency's major unit: far above any real payment, and
#: small enough that sums over a month of an entity's transactions stay exact to the cent.
AMOUNT_MAX = 1e12
_AMOUNT_MAX_TEXT = "1e12"  # as people write it; f"{1e12:g}" gives 1e+12
#: C0 controls, DEL and C1 controls: never part of an id or a name, and a NUL or a newline
#: in one can break every store or log format that joins fields.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
#: The same set as a JSON Schema pattern (whole string free of them).
_NO_CONTROL_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"


#: Characters of a rejected value an error repeats: enough to recognise it, and a 100 KB field
#: gives a short error (in the HTTP 400 body, the dead letter and the logs).
SHOWN_MAX = 100


def _shown(value: Any) -> str:
    """repr(value), cut to SHOWN_MAX characters with its full length said."""
    text = repr(value)
    if len(text) <= SHOWN_MAX:
        return text
    return f"{text[:SHOWN_MAX]}...({len(text)} characters)"


def _amount(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"must be a number or a decimal string, got {_shown(value)}")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            raise ValueError(f"must be a number or a decimal string, got {_shown(value)}")
        try:
            number = float(Decimal(value))
        except InvalidOperation as error:  # pragma: no cover - the pattern rules this out
            raise ValueError(f"must be a decimal string, got {_shown(value)}") from error
    else:
        raise ValueError(f"must be a number or a decimal string, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"must be finite, got {_shown(value)}")
    if number < 0:
        raise ValueError(f"must be >= 0, got {_shown(value)}")
    if number > AMOUNT_MAX:
        raise ValueError(f"must be <= {_AMOUNT_MAX_TEXT}, got {_shown(value)}")
    return number


def _no_control(value: str) -> str:
    """A text field's value if it holds no control character (C0, DEL, C1)."""
    if value.isprintable():  # the usual case, in C; printable text holds no control character
        return value
    found = _CONTROL.search(value)
    if found is not None:
        raise ValueError(
            f"must not contain control characters, got U+{ord(found.group()):04X}"
            f" at position {found.start() + 1}"
        )
    return value


def _timestamp(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"must be an RFC 3339 string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"must be an RFC 3339 date-time, got {_shown(value)}") from None
    if parsed.tzinfo is None:
        raise ValueError(f"must include a UTC offset (RFC 3339), got {_shown(value)}")
    return parsed


class _Fields(NamedTuple):
    """The fields of `Transaction` (a NamedTuple body cannot hold class variables)."""

    amount: float
    customer_id: str
    transaction_id: str | None = None
    currency: str = "USD"
    timestamp: datetime | None = None
    merchant: str | None = None
    card_id: str | None = None
    terminal_id: str | None = None
    merchant_category: str | None = None
    country: str | None = None
    ip_country: str | None = None
    channel: str | None = None


class Transaction(_Fields):
    """A validated payment transaction (build it with `validate`); immutable.

    Only the fields the detector reads are typed here; any other field of the message is
    accepted and travels unchanged in the object as received.

    The pydantic model `schema_model()` defines validity: it writes every error and the JSON
    Schema. It is built on first need, because importing pydantic and building the model
    is a large part of the function's cold start (BENCHMARKS.md, "Cold start"): the usual
    valid transaction is admitted
    by a fast check in `validate` that accepts only what the model accepts (a property test
    holds the two together), so a function that sees only good messages never imports it.
    A NamedTuple rather than a frozen dataclass: it is built once per transaction, and a
    frozen dataclass's ``__init__`` cost more than the whole fast check.
    """

    __slots__ = ()

    #: Field names in declaration order (the order problems are reported in).
    model_fields: ClassVar[tuple[str, ...]] = _Fields._fields

    @classmethod
    def model_json_schema(cls) -> dict[str, Any]:
        """JSON Schema of a transaction, as pydantic generates it from `schema_model`."""
        schema: dict[str, Any] = schema_model().model_json_schema()
        return schema


#: The optional text fields after `timestamp`, in declaration order.
_TEXT_FIELDS = Transaction._fields[5:]
_new = tuple.__new__


@functools.cache
def schema_model() -> Any:
    """The pydantic model of a transaction: what is valid, its errors, its JSON Schema.

    Built on first use (see `Transaction`).
    """
    from typing import Annotated

    from pydantic import (
        AfterValidator,
        BaseModel,
        BeforeValidator,
        ConfigDict,
        Field,
        WithJsonSchema,
    )

    amount_type = Annotated[
        float,
        BeforeValidator(_amount),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "number", "minimum": 0, "maximum": AMOUNT_MAX},
                    {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*$"},
                ],
                "description": "Amount in the currency's major unit: a JSON number or a "
                f"decimal string, at most {_AMOUNT_MAX_TEXT}.",
            }
        ),
    ]
    timestamp_type = Annotated[
        datetime,
        BeforeValidator(_timestamp),
        WithJsonSchema({"type": "string", "format": "date-time", "description": "RFC 3339."}),
    ]
    text = Annotated[
        str,
        Field(
            min_length=1,
            max_length=TEXT_MAX,
            strict=True,
            json_schema_extra={"pattern": _NO_CONTROL_PATTERN},
        ),
        AfterValidator(_no_control),
    ]
    currency_type = Annotated[str, Field(pattern=r"^[A-Z]{3}$", strict=True)]

    class Transaction(BaseModel):
        """A validated payment transaction."""

        model_config = ConfigDict(frozen=True, extra="ignore")

        amount: amount_type
        customer_id: text
        transaction_id: text | None = None
        currency: currency_type = "USD"
        timestamp: timestamp_type | None = None
        merchant: text | None = None
        card_id: text | None = None
        terminal_id: text | None = None
        merchant_category: text | None = None
        country: text | None = None
        ip_country: text | None = None
        channel: text | None = None

    return Transaction


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
        InvalidTransaction: with one (field, problem) pair per invalid field: reserved verdict
            fields first, in input order, then the transaction's fields in declaration order.
    """
    get = raw.get
    amount: Any = get("amount")
    customer_id = get("customer_id")
    transaction_id = get("transaction_id")
    currency = get("currency", "USD")
    timestamp = get("timestamp")
    texts = [get(name) for name in _TEXT_FIELDS]
    # Fast path, the usual transaction: a number amount, valid texts, no reserved field. Any
    # doubt falls through to the complete check, which also writes the problems.
    texts_ok = True
    for value in texts:
        if value is not None and (
            type(value) is not str or not 0 < len(value) <= TEXT_MAX or not value.isprintable()
        ):
            texts_ok = False
            break
    amount_type = type(amount)
    if (
        texts_ok
        and (amount_type is float or amount_type is int)
        and 0 <= amount <= AMOUNT_MAX
        and type(customer_id) is str
        and 0 < len(customer_id) <= TEXT_MAX
        and customer_id.isprintable()
        and (
            transaction_id is None
            or (
                type(transaction_id) is str
                and 0 < len(transaction_id) <= TEXT_MAX
                and transaction_id.isprintable()
            )
        )
        and (currency == "USD" or (type(currency) is str and _CURRENCY.fullmatch(currency)))
        and VERDICT_FIELDS.isdisjoint(raw)
    ):
        if timestamp is not None:
            try:
                timestamp = _timestamp(timestamp)
            except ValueError:
                return _check(raw)
        return _new(
            Transaction,
            (float(amount), customer_id, transaction_id, currency, timestamp, *texts),
        )
    return _check(raw)


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


def _problem(field: str, error: Any) -> str:
    """One pydantic error as "problem, got value" in the project's words."""
    kind = error["type"]
    if kind == "value_error":  # our own validators: their message after pydantic's prefix
        return str(error["ctx"]["error"])
    template = _FIELD_MESSAGES.get((field, kind)) or _MESSAGES.get(kind)
    if template is None:
        return str(error["msg"])
    text = template.format(**error.get("ctx", {}))
    return text if kind == "missing" else f"{text}, got {_shown(error['input'])}"


def _check(raw: dict[str, Any]) -> Transaction:
    """`validate` by the pydantic model, collecting every problem.

    The fast path in `validate` only admits what this accepts (a property test holds them
    together); anything it doubts, and every invalid message, comes here.
    """
    from pydantic import ValidationError

    problems: list[tuple[str, str]] = [
        (name, "is a verdict field and cannot be set by a transaction")
        for name in raw
        if name in VERDICT_FIELDS
    ]
    try:
        model = schema_model().model_validate(raw)
    except ValidationError as error:
        for item in error.errors():
            field = ".".join(str(part) for part in item["loc"])
            problems.append((field, _problem(field, item)))
        raise InvalidTransaction(problems) from None
    if problems:
        raise InvalidTransaction(problems)
    return _new(Transaction, tuple(getattr(model, name) for name in Transaction._fields))


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


#: Default of MAX_CLOCK_SKEW, in seconds.
DEFAULT_MAX_CLOCK_SKEW = 300.0


def check_clock_skew(
    transaction: Transaction,
    reference: datetime,
    max_skew: float,
    *,
    reference_name: str = "publish time",
) -> None:
    """Refuse a transaction dated more than `max_skew` seconds after `reference`.

    Event time comes from the sender; one transaction dated next year would otherwise move the
    state's notion of "now" and make every later transaction look late. The reference is a time
    the sender does not choose: the message's publish time, or the receive time over HTTP.
    A transaction without `timestamp` takes the reference as its time and always passes.

    Args:
        max_skew: seconds a sender's clock may run ahead (MAX_CLOCK_SKEW).
        reference_name: how the error names `reference` ("publish time", "receive time").

    Raises:
        InvalidTransaction: naming `timestamp`, the limit and the value.
    """
    moment = transaction.timestamp
    if moment is None or (moment - reference).total_seconds() <= max_skew:
        return
    try:
        limit = format_duration(max_skew)
    except ConfigError:  # not whole seconds
        limit = f"{max_skew:g}s"
    raise InvalidTransaction(
        [
            (
                "timestamp",
                f"must be at most {limit} after the {reference_name} {rfc3339(reference)},"
                f" got {moment.isoformat().replace('+00:00', 'Z')!r}",
            )
        ]
    )


def rfc3339(moment: datetime) -> str:
    """Format an aware datetime as RFC 3339 in UTC with a Z suffix."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return moment.isoformat().replace("+00:00", "Z")
