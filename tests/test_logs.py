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
