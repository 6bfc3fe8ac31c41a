"""Structured logs as Cloud Logging reads them: one JSON object per line on stdout.

Modules log through `logging.getLogger(__name__)`; only entry points call `configure()`.
Extra fields go in `extra={"fields": {...}}` and become top-level keys of the entry.

Whatever a sender chose reaches the logs only through `redact`: the message's arguments and
every string field are cut to `VALUE_MAX` characters and card-like numbers (13 digits or
more, spaces or dashes between them) are masked but for their last 4, at every level. The one field
left unmasked is `message_id`, which Pub/Sub assigns (it is 16 to 17 digits long, so the
copy of it in a message's text is masked).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import IO, Any, Final

import orjson

__all__ = ["VALUE_MAX", "JsonFormatter", "configure", "redact"]

#: Characters of one logged value (a message argument, a field) kept before "...(N characters)".
VALUE_MAX: Final = 200
#: A log message is cut here, after its arguments were (a traceback comes on top).
_MESSAGE_MAX: Final = 4 * VALUE_MAX
#: 13 digits or more, single spaces or dashes between them: a card number, or one glued to
#: other digits (a longer run is masked whole, so no card number hides inside it).
_CARD: Final = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,}")
#: Fields whose value the platform assigns, never the sender.
_TRUSTED_FIELDS: Final = frozenset({"message_id"})


def _mask(match: re.Match[str]) -> str:
    digits = re.sub("[^0-9]", "", match.group())
    return "****" + digits[-4:]


def redact(text: str, limit: int = VALUE_MAX) -> str:
    """`text` with card-like numbers masked (last 4 kept), cut to `limit` characters.

    A cut value ends with "...(N characters)", N its length before the cut.
    """
    if len(text) > limit:
        text = f"{text[:limit]}...({len(text)} characters)"
    return _CARD.sub(_mask, text)


def _arg(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value  # %d and %.2f still work; digits alone are masked in the whole message
    return redact(str(value))


def _field(name: str, value: Any) -> Any:
    if isinstance(value, str):
        return value if name in _TRUSTED_FIELDS else redact(value)
    if isinstance(value, list | tuple):
        return [_field(name, item) for item in value]
    if isinstance(value, dict):
        return {key: _field(str(key), item) for key, item in value.items()}
    return value


_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


class JsonFormatter(logging.Formatter):
    """Format a record as a Cloud Logging structured entry."""

    def format(self, record: logging.LogRecord) -> str:
        message = str(record.msg)
        if record.args:
            args = record.args
            if isinstance(args, dict):
                message = message % {key: _arg(value) for key, value in args.items()}
            else:
                message = message % tuple(_arg(value) for value in args)
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": redact(message, _MESSAGE_MAX),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({str(name): _field(str(name), value) for name, value in fields.items()})
        if record.exc_info:
            entry["message"] += "\n" + redact(self.formatException(record.exc_info), 20_000)
        return orjson.dumps(entry, default=str).decode()


def configure(level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """Send the root logger's records to stream (stdout) as JSON lines (idempotent)."""
    root = logging.getLogger()
    if any(isinstance(handler.formatter, JsonFormatter) for handler in root.handlers):
        return
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
