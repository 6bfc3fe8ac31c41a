"""Every error the detector raises on purpose, in one tree; the branch says what happens next.

    DetectorError
    ├── ConfigError            settings, rules, model, state or tool input unusable: stop
    │   │                      start-up, or end a command with `error: ...` (ValueError)
    │   ├── RulesError           a rules file with problems, each naming the rule
    │   ├── ModelError           a model artifact that cannot be scored
    │   ├── StateConfigError     a state setting (windows, lateness, REDIS_URL) out of range
    │   └── InputError           an offline tool's file, option or label line
    ├── MessageError           one message can never succeed: dead-lettered, then acked
    │   │                      (ValueError; `error_type` goes into the dead letter)
    │   ├── InvalidMessage       not a Pub/Sub message envelope at all
    │   ├── InvalidJSON          data is not UTF-8 JSON, or not an object
    │   ├── InvalidTransaction   fails validation; lists every field and problem
    │   └── InvalidLabel         a feedback message that is not a label
    └── TransientError         may pass: the message is redelivered (RuntimeError)
        ├── PublishFailed        a verdict or dead letter was not published in time
        └── StoreUnavailable     the state store cannot be reached (also ConnectionError)

Each error carries the fields a caller needs to act without parsing its text: `setting` on
configuration errors, `error_type` and `problems` on message errors, `resource` on transient
ones.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DetectorError",
    "InputError",
    "InvalidJSON",
    "InvalidLabel",
    "InvalidMessage",
    "InvalidTransaction",
    "MessageError",
    "ModelError",
    "PublishFailed",
    "RulesError",
    "StateConfigError",
    "StoreUnavailable",
    "TransientError",
]


class DetectorError(Exception):
    """Root of every error the detector raises on purpose."""


# --------------------------------------------------------------------------------------------
# Configuration: raised at start-up (or by an offline command), never per message.


class ConfigError(DetectorError, ValueError):
    """Settings, rules, model or a tool's input are unusable.

    Messages read ``SETTING: problem, got VALUE``.

    Attributes:
        setting: what is wrong (an environment variable, option or file), by default the text
            before the message's first colon.
    """

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting if setting is not None else message.partition(":")[0]


class RulesError(ConfigError):
    """A rules file is unusable: unreadable, bad YAML, or rules with problems.

    Attributes:
        source: the file name used in the messages.
        problems: one line per problem, each naming the file, the rule and the problem.
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems), setting=source)


class ModelError(ConfigError):
    """A model artifact is unreadable or malformed; the message names the file and the part."""


class StateConfigError(ConfigError):
    """Invalid state configuration: names the setting, the problem and the limit."""


class InputError(ConfigError):
    """Unusable input of an offline tool (a file, a label line, an option)."""


# --------------------------------------------------------------------------------------------
# Messages that can never succeed: dead-lettered with `error_type`, then acked.


class MessageError(DetectorError, ValueError):
    """The message can never be processed; it goes to the dead-letter topic.

    Attributes:
        error_type: the dead letter's ``error_type`` attribute.
        problems: (field, problem) pairs; one pair naming the whole message where no field is
            to blame.
    """

    error_type = "invalid_message"

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [("message", message)]


class InvalidMessage(MessageError):
    """The CloudEvent does not carry a Pub/Sub message."""

    error_type = "invalid_message"


class InvalidJSON(MessageError):
    """The message data is not a UTF-8 JSON object."""

    error_type = "invalid_json"


class InvalidTransaction(MessageError):
    """The JSON object is not a valid transaction; `problems` lists every field, input order."""

    error_type = "invalid_transaction"

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {problem}" for field, problem in problems), problems)


class InvalidLabel(MessageError):
    """A feedback message that is not a valid label."""

    error_type = "invalid_label"


# --------------------------------------------------------------------------------------------
# Failures that may pass: the message is redelivered.


class TransientError(DetectorError, RuntimeError):
    """A failure that may succeed on redelivery.

    Attributes:
        resource: what failed (a topic path, a redacted store URL).
        error_type: the dead letter's ``error_type`` when it fails the last delivery attempt.
    """

    error_type = "transient_exhausted"

    def __init__(self, message: str, *, resource: str = "") -> None:
        super().__init__(message)
        self.resource = resource


class PublishFailed(TransientError):
    """Publishing to a topic failed or did not finish in time."""


class StoreUnavailable(TransientError, ConnectionError):
    """The state store cannot be reached; nothing was recorded, the message must be retried."""
