"""The functions' behaviour, independent of how requests arrive.

`Service` turns a Pub/Sub push envelope or an HTTP body into a verdict, a dead letter or a
recorded label. `detector/main.py` only adapts CloudEvents and Flask requests to it.
"""

from __future__ import annotations

import binascii
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from detector.engine import Detector, Verdict
from detector.errors import (
    InvalidLabel,
    InvalidMessage,
    InvalidTransaction,
    MessageError,
    TransientError,
)
from detector.functions.settings import Settings
from detector.functions.sinks import VerdictSink
from detector.transaction import decode, rfc3339

__all__ = [
    "Message",
    "Service",
    "dead_letter_attributes",
    "error_body",
    "label_model",
    "parse_envelope",
    "verdict_attributes",
]

log = logging.getLogger(__name__)

#: Pub/Sub limits an attribute value to 1024 bytes.
_ATTRIBUTE_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class Message:
    """A Pub/Sub message as delivered in a push envelope or CloudEvent."""

    data: bytes
    attributes: Mapping[str, str] = field(default_factory=dict)
    message_id: str | None = None
    publish_time: datetime | None = None


def parse_envelope(envelope: Any) -> Message:
    """Read the Pub/Sub message out of a CloudEvent's data (or a raw push body).

    Both spellings are read: camelCase (push) and snake_case (Eventarc adds it).

    Raises:
        InvalidMessage: the envelope holds no message, or its data is not base64.
    """
    # `type(...) is dict` first: the usual case, and the ABC check costs more than the rest.
    is_mapping = type(envelope) is dict or isinstance(envelope, Mapping)
    message = envelope.get("message") if is_mapping else None
    if type(message) is not dict and not isinstance(message, Mapping):
        raise InvalidMessage("message: the event carries no Pub/Sub message")
    encoded = message.get("data") or ""
    try:
        # What base64.b64decode(validate=True) calls, without its argument conversion.
        data = binascii.a2b_base64(encoded, strict_mode=True)
    except (binascii.Error, TypeError, ValueError):
        raise InvalidMessage("message.data: not valid base64") from None
    attributes = message.get("attributes") or {}
    message_id = message.get("messageId") or message.get("message_id")
    published = message.get("publishTime") or message.get("publish_time")
    publish_time = None
    if isinstance(published, str):
        try:
            publish_time = datetime.fromisoformat(published)
        except ValueError:
            publish_time = None
    return Message(
        data=data,
        attributes={str(k): str(v) for k, v in attributes.items()} if attributes else {},
        message_id=str(message_id) if message_id else None,
        publish_time=publish_time,
    )


@functools.cache
def label_model() -> Any:
    """The pydantic model of a fraud label (chargeback, analyst decision), built on first use.

    pydantic is imported here, not at module level: it is a measurable part of every
    function's cold start (BENCHMARKS.md, "Cold start"), and only `record_feedback` reads
    labels.
    """
    from pydantic import BaseModel, ConfigDict, Field

    class Label(BaseModel):
        """A fraud label for a transaction seen earlier."""

        model_config = ConfigDict(frozen=True, extra="ignore")

        transaction_id: str = Field(min_length=1, strict=True)
        is_fraud: bool = Field(strict=True)

    return Label


def _now() -> datetime:
    return datetime.now(UTC)


def _clip(text: str) -> str:
    encoded = text.encode()
    if len(encoded) <= _ATTRIBUTE_LIMIT:
        return text
    return encoded[: _ATTRIBUTE_LIMIT - 3].decode(errors="ignore") + "..."


def error_body(error: MessageError) -> dict[str, Any]:
    """The JSON an HTTP caller gets for a message that can never succeed."""
    body: dict[str, Any] = {"type": error.error_type, "message": str(error)}
    if isinstance(error, InvalidTransaction):
        body["fields"] = [{"field": name, "problem": problem} for name, problem in error.problems]
    return {"error": body}


class Service:
    """Runs the detector on delivered messages and publishes what comes out."""

    def __init__(
        self,
        settings: Settings,
        detector: Detector,
        sink: VerdictSink,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.settings = settings
        self.detector = detector
        self.sink = sink
        self.clock = clock

    def on_transaction(self, envelope: Any) -> Verdict | None:
        """Decide on one delivered transaction and publish the verdict.

        Returns the verdict, or None when the message was dead-lettered.

        Raises:
            TransientError: publishing failed; the message must be redelivered.
            TransientError: the state store or a publish failed; the message must be redelivered.
        """
        try:
            message = parse_envelope(envelope)
            avro_json = message.attributes.get("googclient_schemaencoding") == "JSON"
            raw, transaction = decode(message.data, avro_json=avro_json)
        except InvalidMessage as error:
            fallback = Message(data=orjson.dumps(envelope, default=str))
            self.dead_letter(fallback, error)
            return None
        except MessageError as error:
            self.dead_letter(message, error)
            return None
        now = self.clock()
        try:
            verdict = self.detector.decide(
                raw,
                transaction,
                message_id=message.message_id,
                default_time=message.publish_time or now,
                decided_at=now,
            )
            self.sink.publish(
                self.settings.topic_path(self.settings.results_topic),
                verdict.encode(),
                verdict_attributes(verdict, message.publish_time),
            )
        except TransientError as error:
            log.error(
                "message %s failed and will be redelivered: %s",
                message.message_id,
                error,
                extra={
                    "fields": {"message_id": message.message_id, "error_type": type(error).__name__}
                },
            )
            raise
        self._log_verdict(verdict)
        return verdict

    def on_request(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Decide on a transaction posted over HTTP; returns (status, JSON body)."""
        try:
            raw, transaction = decode(body)
        except MessageError as error:
            log.info(
                "rejected HTTP transaction: %s",
                error,
                extra={"fields": {"error_type": error.error_type}},
            )
            return 400, error_body(error)
        now = self.clock()
        try:
            verdict = self.detector.decide(
                raw, transaction, message_id=None, default_time=now, decided_at=now
            )
        except TransientError as error:
            log.error("HTTP transaction failed: %s", error)
            return 503, {"error": {"type": "unavailable", "message": str(error)}}
        self._log_verdict(verdict)
        return 200, dict(verdict.body)

    def on_label(self, envelope: Any) -> str | None:
        """Record one fraud label from the feedback topic; returns what the store did.

        Invalid labels are dead-lettered and None is returned.
        """
        try:
            message = parse_envelope(envelope)
        except InvalidMessage as error:
            self.dead_letter(
                Message(data=orjson.dumps(envelope, default=str)),
                error,
                self.settings.feedback_dead_letter_topic,
            )
            return None
        from pydantic import ValidationError

        try:
            label = label_model().model_validate_json(message.data)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, item['loc'])) or 'data'}: {item['msg']}"
                for item in error.errors()
            )
            self.dead_letter(
                message, InvalidLabel(problems), self.settings.feedback_dead_letter_topic
            )
            return None
        recorded = self.detector.record_label(label.transaction_id, label.is_fraud)
        if recorded is None:
            log.warning("label for %s ignored: no state store", label.transaction_id)
            return "ignored"
        outcome = str(recorded)
        log.info(
            "label %s for %s: %s",
            "fraud" if label.is_fraud else "genuine",
            label.transaction_id,
            outcome,
            extra={"fields": {"transaction_id": label.transaction_id, "outcome": outcome}},
        )
        return outcome

    def dead_letter(self, message: Message, error: MessageError, topic: str | None = None) -> None:
        """Publish a message that can never succeed, unchanged, with why it failed.

        Args:
            topic: the dead-letter topic; the transactions' (DEAD_LETTER_TOPIC) by default.
        """
        self.sink.publish(
            self.settings.topic_path(topic or self.settings.dead_letter_topic),
            message.data,
            dead_letter_attributes(message, error),
        )
        log.warning(
            "dead-lettered message %s: %s",
            message.message_id,
            error,
            extra={"fields": {"error_type": error.error_type, "message_id": message.message_id}},
        )

    @staticmethod
    def _log_verdict(verdict: Verdict) -> None:
        # Allowed transactions are the bulk of traffic: logging each would cost more than
        # deciding it, so they are logged at DEBUG only.
        level = logging.DEBUG if verdict.decision == "allow" else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "%s transaction %s",
                verdict.decision,
                verdict.transaction_id,
                extra={
                    "fields": {
                        "transaction_id": verdict.transaction_id,
                        "decision": verdict.decision,
                        "score": verdict.score,
                        "rules": [reason["rule"] for reason in verdict.body["reasons"]],
                    }
                },
            )


# --------------------------------------------------------------------------------------------
# What a verdict and a dead letter carry, apart from publishing them: the functions publish one
# at a time through a `VerdictSink`, the streaming-pull worker (detector/worker/) in batches.


def verdict_attributes(verdict: Verdict, publish_time: datetime | None) -> dict[str, str]:
    """A verdict message's attributes: `Verdict.attributes` plus ``source_publish_time``.

    Args:
        publish_time: when the transaction's message was published, if known.
    """
    attributes = verdict.attributes()
    if publish_time is not None:
        attributes["source_publish_time"] = rfc3339(publish_time)
    return attributes


def dead_letter_attributes(message: Message, error: MessageError) -> dict[str, str]:
    """A dead letter's attributes: the message's own plus ``error_type``, ``error``, ``message_id``.

    ``error`` is clipped to Pub/Sub's limit of 1024 bytes per attribute value.
    """
    attributes = dict(message.attributes)
    attributes.update(
        error_type=error.error_type,
        error=_clip(str(error)),
        message_id=message.message_id or "",
    )
    return attributes
