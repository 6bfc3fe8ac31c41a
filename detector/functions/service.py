"""The functions' behaviour, independent of how requests arrive.

`Service` turns a Pub/Sub push envelope or an HTTP body into a verdict, a dead letter or a
recorded label. `detector/main.py` only adapts CloudEvents and Flask requests to it.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import json
import logging
import re
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
from detector.logs import redact
from detector.state import LabelPlace
from detector.transaction import TEXT_MAX, check_clock_skew, decode, rfc3339
from detector.vocabulary import ENTITIES

__all__ = [
    "DEAD_LETTER_KEYS",
    "Message",
    "Service",
    "dead_letter_attributes",
    "error_body",
    "idempotent_transaction_id",
    "label_model",
    "parse_envelope",
    "topic_of_source",
    "verdict_attributes",
]

log = logging.getLogger(__name__)

#: Pub/Sub limits an attribute value to 1024 bytes, a key to 256, a message to 100 of them.
_ATTRIBUTE_LIMIT = 1024
_KEY_LIMIT = 256
_ATTRIBUTES_MAX = 100
#: The attributes a dead letter gets from us; `redrive` removes them before republishing.
DEAD_LETTER_KEYS = ("error_type", "error", "message_id", "source_topic", "attributes_dropped")
#: An HTTP caller's Idempotency-Key: what payment APIs accept (UUIDs, order ids with / or :).
_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:/-]{1,255}")
#: The CloudEvent source of a Pub/Sub message (Eventarc): //pubsub.googleapis.com/<topic>.
_PUBSUB_SOURCE = "//pubsub.googleapis.com/"


@dataclass(frozen=True, slots=True)
class Message:
    """A Pub/Sub message as delivered in a push envelope or CloudEvent."""

    data: bytes
    attributes: Mapping[str, str] = field(default_factory=dict)
    message_id: str | None = None
    publish_time: datetime | None = None
    #: The topic's full name, when the delivery says it (see `topic_of_source`).
    source_topic: str | None = None
    #: Pub/Sub's count of deliveries, set only on subscriptions with a dead-letter policy.
    delivery_attempt: int | None = None


def topic_of_source(source: object) -> str | None:
    """The topic named by a CloudEvent's source, "//pubsub.googleapis.com/projects/P/topics/T".

    A push subscription whose URL does not name the topic gives functions-framework nothing
    to put there (the emulator's pushes in the tests): then None.
    """
    if isinstance(source, str) and source.startswith(_PUBSUB_SOURCE):
        topic = source[len(_PUBSUB_SOURCE) :]
        if topic.startswith("projects/") and "/topics/" in topic:
            return topic
    return None


def _clip_key(key: str) -> str:
    encoded = key.encode()
    return key if len(encoded) <= _KEY_LIMIT else encoded[:_KEY_LIMIT].decode(errors="ignore")


def dead_letter_attributes(
    message: Message, error: MessageError | TransientError
) -> dict[str, str]:
    """The attributes of `message`'s dead letter: its own, then why and where from.

    The message's attributes are copied (ours from an earlier dead letter replaced) as far
    as Pub/Sub's limits allow: 100 attributes, keys of 256 bytes, values of 1024 bytes. Added:
    ``error_type`` (the error's, ``transient_exhausted`` for a failure that outlived its
    delivery attempts), ``error`` (field and problem, redacted as logs are), ``message_id``,
    ``source_topic`` (where `redrive` sends it back; empty when unknown) and, when some of the
    message's attributes did not fit, ``attributes_dropped`` (how many).
    """
    own = [(key, value) for key, value in message.attributes.items() if key not in DEAD_LETTER_KEYS]
    room = _ATTRIBUTES_MAX - len(DEAD_LETTER_KEYS)
    attributes = {_clip_key(key): _clip(value) for key, value in own[:room]}
    attributes.update(
        error_type=error.error_type,
        error=_clip(redact(str(error), _ATTRIBUTE_LIMIT)),
        message_id=message.message_id or "",
        source_topic=message.source_topic or "",
    )
    if len(own) > room:
        attributes["attributes_dropped"] = str(len(own) - room)
    return attributes


def parse_envelope(envelope: Any, source_topic: str | None = None) -> Message:
    """Read the Pub/Sub message out of a CloudEvent's data (or a raw push body).

    Both spellings are read: camelCase (push) and snake_case (Eventarc adds it).

    Args:
        source_topic: the topic the delivery came from, if known (`topic_of_source`).

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
    if not isinstance(attributes, Mapping):
        kind = type(attributes).__name__
        raise InvalidMessage(f"message.attributes: must be an object of strings, got {kind}")
    message_id = message.get("messageId") or message.get("message_id")
    published = message.get("publishTime") or message.get("publish_time")
    publish_time = None
    if isinstance(published, str):
        try:
            publish_time = datetime.fromisoformat(published)
        except ValueError:
            publish_time = None
    attempt = envelope.get("deliveryAttempt") or envelope.get("delivery_attempt")
    return Message(
        data=data,
        attributes={str(k): str(v) for k, v in attributes.items()} if attributes else {},
        message_id=str(message_id) if message_id else None,
        publish_time=publish_time,
        source_topic=source_topic,
        delivery_attempt=attempt if type(attempt) is int else None,
    )


@functools.cache
def label_model() -> Any:
    """The pydantic model of a fraud label (chargeback, analyst decision), built on first use.

    pydantic is imported here, not at module level: it is a measurable part of every
    function's cold start (BENCHMARKS.md, "Cold start"), and only `record_feedback` reads
    labels.
    """
    from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

    text = Field(default=None, min_length=1, max_length=TEXT_MAX, strict=True)

    class Label(BaseModel):
        """A fraud label for a transaction seen earlier.

        A chargeback file also gives the transaction's time and parties: with `timestamp`
        and at least one of the ids, the label goes to those entities directly
        (`detector.state.LabelPlace`) instead of through the label index.
        """

        model_config = ConfigDict(frozen=True, extra="ignore")

        transaction_id: str = Field(min_length=1, strict=True)
        is_fraud: bool = Field(strict=True)
        timestamp: AwareDatetime | None = None
        customer_id: str | None = text
        card_id: str | None = text
        terminal_id: str | None = text
        merchant: str | None = text

        def place(self) -> LabelPlace | None:
            """Where the transaction was recorded, when the label says."""
            if self.timestamp is None:
                return None
            ids = (self.customer_id, self.card_id, self.terminal_id, self.merchant)
            entities = tuple(
                (kind, ident) for kind, ident in zip(ENTITIES, ids, strict=True) if ident
            )
            return LabelPlace(self.timestamp.timestamp(), entities) if entities else None

    return Label


def _as_json(envelope: Any) -> bytes:
    """An envelope that holds no message, as JSON to keep in its dead letter."""
    try:
        return orjson.dumps(envelope, default=str)
    except TypeError:  # integers beyond 64 bits, which Python's json (Flask's) reads
        return json.dumps(envelope, default=str).encode()


def _now() -> datetime:
    return datetime.now(UTC)


def _clip(text: str) -> str:
    encoded = text.encode()
    if len(encoded) <= _ATTRIBUTE_LIMIT:
        return text
    return encoded[: _ATTRIBUTE_LIMIT - 3].decode(errors="ignore") + "..."


def idempotent_transaction_id(key: str) -> str:
    """The transaction_id of an HTTP transaction sent with `Idempotency-Key: key`.

    A digest, so the id is short and free of the key's characters, and the same key always
    gives the same id: retries count once in state and get the same verdict.

    Raises:
        InvalidTransaction: naming the header, when the key is not 1 to 255 characters of
            letters, digits and ``. _ : / -``.
    """
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        shown = repr(key) if len(key) <= 60 else f"{key[:60]!r}...({len(key)} characters)"
        raise InvalidTransaction(
            [
                (
                    "Idempotency-Key",
                    f"must be 1 to 255 characters of letters, digits and . _ : / -, got {shown}",
                )
            ]
        )
    return "idem-" + hashlib.sha256(key.encode()).hexdigest()[:32]


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

    def on_transaction(self, envelope: Any, source: str | None = None) -> Verdict | None:
        """Decide on one delivered transaction and publish the verdict.

        Returns the verdict, or None when the message was dead-lettered.

        Args:
            source: the CloudEvent's source, naming the topic the message came from.

        Raises:
            TransientError: the state store or a publish failed; the message must be
                redelivered. Not on its last delivery attempt (MAX_DELIVERY_ATTEMPTS): then
                it is dead-lettered with error_type ``transient_exhausted`` and the error.
        """
        now = self.clock()
        topic = self._source_topic(source, "transactions")
        try:
            message = parse_envelope(envelope, topic)
            avro_json = message.attributes.get("googclient_schemaencoding") == "JSON"
            raw, transaction = decode(message.data, avro_json=avro_json)
            check_clock_skew(transaction, message.publish_time or now, self.settings.max_clock_skew)
        except InvalidMessage as error:
            fallback = Message(data=_as_json(envelope), source_topic=topic)
            self.dead_letter(fallback, error)
            return None
        except MessageError as error:
            self.dead_letter(message, error)
            return None
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
            self._transient(message, error, self.settings.dead_letter_topic)
            return None
        self._log_verdict(verdict)
        return verdict

    def _source_topic(self, source: str | None, default: str) -> str | None:
        topic = topic_of_source(source)
        if topic is None and self.settings.project:
            topic = self.settings.topic_path(default)  # the deployed input topic's name
        return topic

    def _transient(self, message: Message, error: TransientError, topic: str) -> None:
        """Raise `error` for redelivery, unless this is the message's last delivery attempt:
        then dead-letter it with the reason (the subscription's policy would forward it
        without any) and return, so it is acked.
        """
        attempt = message.delivery_attempt
        if attempt is None or attempt < self.settings.max_delivery_attempts:
            log.error(
                "message %s failed and will be redelivered: %s",
                message.message_id,
                error,
                extra={
                    "fields": {"message_id": message.message_id, "error_type": type(error).__name__}
                },
            )
            raise error
        self.dead_letter(message, error, topic)

    def on_request(
        self, body: bytes, idempotency_key: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Decide on a transaction posted over HTTP; returns (status, JSON body).

        Args:
            idempotency_key: the request's Idempotency-Key header. A body without
                `transaction_id` gets `idempotent_transaction_id(key)` as its id, so a retry
                counts once and gets the same verdict; a body with one keeps its own.
        """
        now = self.clock()
        try:
            raw, transaction = decode(body)
            if idempotency_key is not None:
                derived = idempotent_transaction_id(idempotency_key)
                if transaction.transaction_id is None:
                    transaction = transaction._replace(transaction_id=derived)
            check_clock_skew(
                transaction, now, self.settings.max_clock_skew, reference_name="receive time"
            )
        except MessageError as error:
            log.info(
                "rejected HTTP transaction: %s",
                error,
                extra={"fields": {"error_type": error.error_type}},
            )
            return 400, error_body(error)
        try:
            verdict = self.detector.decide(
                raw, transaction, message_id=None, default_time=now, decided_at=now
            )
        except TransientError as error:
            log.error("HTTP transaction failed: %s", error)
            return 503, {"error": {"type": "unavailable", "message": str(error)}}
        self._log_verdict(verdict)
        return 200, dict(verdict.body)

    def on_label(self, envelope: Any, source: str | None = None) -> str | None:
        """Record one fraud label from the feedback topic; returns what the store did.

        Invalid labels are dead-lettered and None is returned; a transient failure is handled
        as in `on_transaction`, with the labels' dead-letter topic.
        """
        topic = self._source_topic(source, "fraud-feedback")
        try:
            message = parse_envelope(envelope, topic)
        except InvalidMessage as error:
            self.dead_letter(
                Message(data=_as_json(envelope), source_topic=topic),
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
        try:
            recorded = self.detector.record_label(
                label.transaction_id, label.is_fraud, label.place()
            )
        except TransientError as error:
            self._transient(message, error, self.settings.feedback_dead_letter_topic)
            return None
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

    def dead_letter(
        self, message: Message, error: MessageError | TransientError, topic: str | None = None
    ) -> None:
        """Publish a message that cannot succeed here, unchanged, with why (`dead_letter_attributes`).

        Args:
            topic: the dead-letter topic; the transactions' (DEAD_LETTER_TOPIC) by default.

        Raises:
            PublishFailed: the dead letter was not published; the message must be redelivered.
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
# What a verdict carries, apart from publishing it (`dead_letter_attributes` above says what a
# dead letter carries): the functions publish one at a time through a `VerdictSink`, the
# streaming-pull worker (detector/worker/) in batches.


def verdict_attributes(verdict: Verdict, publish_time: datetime | None) -> dict[str, str]:
    """A verdict message's attributes: `Verdict.attributes` plus ``source_publish_time``.

    Args:
        publish_time: when the transaction's message was published, if known.
    """
    attributes = verdict.attributes()
    if publish_time is not None:
        attributes["source_publish_time"] = rfc3339(publish_time)
    return attributes
