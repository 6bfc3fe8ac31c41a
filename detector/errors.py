"""Exceptions of the detector package.

    DetectorError
    ├── MessageError            a message that can never succeed: dead-lettered, then acked
    │   ├── InvalidMessage        not a Pub/Sub message envelope at all (ValueError)
    │   ├── InvalidJSON           data is not UTF-8 JSON, or not an object (ValueError)
    │   └── InvalidTransaction    fails validation; lists every field and problem (ValueError)
    ├── ConfigError             bad settings, rules or model: the function must not start (ValueError)
    └── TransientError          worth retrying: Pub/Sub redelivers the message (RuntimeError)
        └── PublishFailed         a verdict or dead letter could not be published in time

Other modules add leaves under these roots (rules, state, model).
"""

from __future__ import annotations


class DetectorError(Exception):
    """Root of every error the detector raises on purpose."""


class MessageError(DetectorError, ValueError):
    """The message can never be processed; it goes to the dead-letter topic."""

    error_type = "invalid_message"


class InvalidMessage(MessageError):
    """The CloudEvent does not carry a Pub/Sub message."""

    error_type = "invalid_message"


class InvalidJSON(MessageError):
    """The message data is not a UTF-8 JSON object."""

    error_type = "invalid_json"


class InvalidTransaction(MessageError):
    """The JSON object is not a valid transaction.

    Attributes:
        problems: (field, problem) pairs, one per invalid field, in input order.
    """

    error_type = "invalid_transaction"

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{field}: {problem}" for field, problem in problems))


class ConfigError(DetectorError, ValueError):
    """Settings, rules or model are unusable; raised at start-up, never per message."""


class TransientError(DetectorError, RuntimeError):
    """A failure that may succeed on redelivery."""


class PublishFailed(TransientError):
    """Publishing to a topic failed or did not finish in time."""
