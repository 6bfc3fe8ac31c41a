"""Structured logs: one JSON object per line, as Cloud Logging reads them."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from detector import logs


@pytest.fixture()
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    root.handlers.clear()
    output = io.StringIO()
    logs.configure(stream=output)
    yield output
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_each_record_is_one_json_line_with_severity(stream: io.StringIO) -> None:
    """Records become JSON lines with severity, message and the extra fields at top level."""
    log = logging.getLogger("detector.test")
    log.warning("dead-lettered %s", "m-1", extra={"fields": {"error_type": "invalid_json"}})
    log.info(
        "block transaction %s",
        "t-1",
        extra={"fields": {"transaction_id": "t-1", "decision": "block"}},
    )
    entries = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert entries[0] == {
        "severity": "WARNING",
        "message": "dead-lettered m-1",
        "logger": "detector.test",
        "error_type": "invalid_json",
    }
    assert entries[1]["severity"] == "INFO"
    assert entries[1]["transaction_id"] == "t-1"
    assert entries[1]["decision"] == "block"


def test_configure_is_idempotent(stream: io.StringIO) -> None:
    """Configuring twice does not print every record twice."""
    logs.configure()
    logging.getLogger("detector.test").info("once")
    assert len(stream.getvalue().splitlines()) == 1


def test_exceptions_stay_inside_one_entry(stream: io.StringIO) -> None:
    """A traceback is part of the message, not extra lines Cloud Logging would split."""
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("detector.test").exception("failed")
    [line] = stream.getvalue().splitlines()
    entry = orjson.loads(line)
    assert entry["severity"] == "ERROR"
    assert "ValueError: boom" in entry["message"]


CARD = "4111 1111 1111 1111"
CARD_FORMS = [CARD, "4111111111111111", "4111-1111-1111-1111", "5500 0000 0000 0004"]


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR])
@pytest.mark.parametrize("card", CARD_FORMS)
def test_card_numbers_are_masked_at_every_level(stream: io.StringIO, level: int, card: str) -> None:
    """In the message, its arguments and the extra fields, a card number keeps its last 4."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    log = logging.getLogger("detector.test")
    log.log(level, "card %s in " + card, card, extra={"fields": {"card_id": card, "n": [card]}})
    [line] = stream.getvalue().splitlines()
    digits = card.replace(" ", "").replace("-", "")
    assert digits not in line.replace(" ", "").replace("-", "")
    assert digits[:6] not in line
    entry = orjson.loads(line)
    assert entry["message"] == f"card ****{digits[-4:]} in ****{digits[-4:]}"
    assert entry["card_id"] == f"****{digits[-4:]}"


def test_numbers_that_are_not_card_numbers_stay(stream: io.StringIO) -> None:
    """Numbers under 13 digits, amounts, dates, and the message_id field are not masked."""
    log = logging.getLogger("detector.test")
    text = "amount 1200.50 at 2026-11-29T12:00:00Z, 1234 5678, 123456789012"
    log.warning(text, extra={"fields": {"message_id": "4111111111111111"}})
    entry = orjson.loads(stream.getvalue())
    assert entry["message"] == text
    assert entry["message_id"] == "4111111111111111"


def test_long_values_are_truncated(stream: io.StringIO) -> None:
    """A 100 KB value gives a short line that says how long the value was."""
    huge = "x" * 100_000
    logging.getLogger("detector.test").warning(
        "rejected: %s", f"customer_id: got {huge!r}", extra={"fields": {"value": huge}}
    )
    [line] = stream.getvalue().splitlines()
    assert len(line) < 1000
    entry = orjson.loads(line)
    assert entry["message"].startswith("rejected: customer_id: got 'xxx")
    assert "(100019 characters)" in entry["message"]
    assert "(100000 characters)" in entry["value"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("card 4111 1111 1111 1111 declined", "card ****1111 declined"),
        ("4111-1111-1111-1111", "****1111"),
        ("id 12345678901234567890123", "id ****0123"),  # a card could hide in a longer run
        ("x" * 300, "x" * 200 + "...(300 characters)"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    """The one function every log value and dead-letter reason goes through."""
    assert logs.redact(text) == expected
