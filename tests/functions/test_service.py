"""The functions' behaviour in process: verdicts, dead letters, HTTP errors, labels."""

from __future__ import annotations

import base64
import functools
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector import schemas
from detector.config import DetectorConfig, build_detector
from detector.errors import (
    ConfigError,
    InvalidJSON,
    StateConfigError,
    StoreUnavailable,
    TransientError,
)
from detector.functions import build_service
from detector.functions.runtime import CollectorPolicy, bound_collector_pauses
from detector.functions.service import Message, Service, dead_letter_attributes
from detector.functions.settings import Settings
from detector.functions.sinks import MemoryVerdictSink
from detector.state import Event, TiledMemoryStore
from stack.services import free_port

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
PUBLISHED = "2026-11-29T11:59:59.5Z"
RESULTS = "projects/fraud-test/topics/fraud-verdicts"
DEAD = "projects/fraud-test/topics/transactions-dead-letter"


def envelope(
    data: bytes, message_id: str = "m-1", attributes: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "message": {
            "data": base64.b64encode(data).decode(),
            "attributes": attributes or {},
            "messageId": message_id,
            "publishTime": PUBLISHED,
        },
        "subscription": "projects/fraud-test/subscriptions/s",
    }


@pytest.fixture()
def sink() -> MemoryVerdictSink:
    return MemoryVerdictSink()


@pytest.fixture()
def service(sink: MemoryVerdictSink) -> Service:
    service = build_service(
        Settings(project="fraud-test", detector=DetectorConfig(model_path="none")), sink
    )
    service.clock = lambda: NOW
    return service


@pytest.mark.parametrize(
    ("amount", "is_fraud"), [(1200, True), (1000.01, True), (1000, False), (50, False)]
)
def test_original_rule_blocks_amounts_over_1000(
    service: Service, sink: MemoryVerdictSink, amount: float, is_fraud: bool
) -> None:
    """The blog example's rule: amount > 1000 is fraud, 1000 itself is not."""
    data = orjson.dumps({"amount": amount, "merchant": "XYZ Corp", "customer_id": "12345"})
    service.on_transaction(envelope(data))
    [(topic, body, attributes)] = sink.messages
    verdict = orjson.loads(body)
    assert topic == RESULTS
    assert verdict["is_fraud"] is is_fraud
    assert verdict["decision"] == ("block" if is_fraud else "allow")
    assert attributes["is_fraud"] == ("true" if is_fraud else "false")


def test_verdict_echoes_the_transaction_and_follows_the_schema(
    service: Service, sink: MemoryVerdictSink
) -> None:
    """The verdict is the transaction as received plus every verdict field, per verdict.schema.json."""
    sent = {
        "amount": 1200,
        "merchant": "XYZ Corp",
        "customer_id": "12345",
        "loyalty": {"tier": "gold"},
    }
    service.on_transaction(envelope(orjson.dumps(sent), message_id="42"))
    [(_, body, attributes)] = sink.messages
    verdict = orjson.loads(body)
    jsonschema.validate(verdict, schemas.verdict_json_schema())
    assert {k: verdict[k] for k in sent} == sent
    assert isinstance(verdict["amount"], int)
    assert verdict["transaction_id"] == "42"
    assert verdict["message_id"] == "42"
    assert verdict["decided_at"] == "2026-11-29T12:00:00Z"
    assert verdict["rules_version"]
    assert verdict["reasons"][0]["rule"] == "large-amount"
    assert verdict["reasons"][0]["action"] == "block"
    assert "1200" in verdict["reasons"][0]["description"]
    assert attributes == {
        "transaction_id": "42",
        "decision": "block",
        "is_fraud": "true",
        "rules_version": verdict["rules_version"],
        "source_publish_time": "2026-11-29T11:59:59.500000Z",
    }


def test_transaction_id_is_kept_when_given(service: Service, sink: MemoryVerdictSink) -> None:
    """A transaction's own ID wins over the message ID."""
    service.on_transaction(envelope(b'{"amount": 5, "customer_id": "c", "transaction_id": "tx-9"}'))
    verdict = orjson.loads(sink.messages[0][1])
    assert verdict["transaction_id"] == "tx-9"
    assert verdict["message_id"] == "m-1"


@pytest.mark.parametrize(
    ("data", "error_type", "error"),
    [
        (b"{not json", "invalid_json", "data: not valid UTF-8 JSON"),
        (b'"a string"', "invalid_json", "data: must be a JSON object, got str"),
        (
            b'{"amount": -5, "customer_id": "c"}',
            "invalid_transaction",
            "amount: must be >= 0, got -5",
        ),
        (b'{"amount": 5}', "invalid_transaction", "customer_id: is required"),
        (
            b'{"amount": 5, "customer_id": "c", "score": 0}',
            "invalid_transaction",
            "score: is a verdict field",
        ),
    ],
)
def test_bad_messages_are_dead_lettered_unchanged(
    service: Service, sink: MemoryVerdictSink, data: bytes, error_type: str, error: str
) -> None:
    """Bad input goes to the dead-letter topic with its data and attributes, and why."""
    assert service.on_transaction(envelope(data, attributes={"origin": "pos-7"})) is None
    [(topic, body, attributes)] = sink.messages
    assert topic == DEAD
    assert body == data
    assert attributes["origin"] == "pos-7"
    assert attributes["error_type"] == error_type
    assert attributes["error"].startswith(error)
    assert attributes["message_id"] == "m-1"


def test_an_event_without_a_message_is_dead_lettered(
    service: Service, sink: MemoryVerdictSink
) -> None:
    """Even an envelope with no Pub/Sub message is kept, not dropped."""
    service.on_transaction({"unexpected": True})
    [(topic, body, attributes)] = sink.messages
    assert topic == DEAD
    assert orjson.loads(body) == {"unexpected": True}
    assert attributes["error_type"] == "invalid_message"


def test_http_returns_the_same_decision(service: Service) -> None:
    """The HTTP path decides exactly like the Pub/Sub path and generates a transaction ID."""
    status, body = service.on_request(
        b'{"amount": 1200, "merchant": "XYZ Corp", "customer_id": "12345"}'
    )
    assert status == 200
    assert body["is_fraud"] is True
    assert body["message_id"] is None
    assert len(body["transaction_id"]) == 32


def test_http_rejects_invalid_transactions_with_the_field(service: Service) -> None:
    """HTTP callers get 400 and a JSON error naming each field."""
    status, body = service.on_request(b'{"amount": "abc"}')
    assert status == 400
    assert body["error"]["type"] == "invalid_transaction"
    assert body["error"]["fields"] == [
        {"field": "amount", "problem": "must be a number or a decimal string, got 'abc'"},
        {"field": "customer_id", "problem": "is required"},
    ]


def test_invalid_labels_are_dead_lettered(service: Service, sink: MemoryVerdictSink) -> None:
    """A feedback message that is not a label goes to the labels' own dead-letter topic."""
    assert service.on_label(envelope(b'{"transaction_id": "t1", "is_fraud": "yes"}')) is None
    [(topic, _, attributes)] = sink.messages
    assert topic == "projects/fraud-test/topics/fraud-feedback-dead-letter"
    assert attributes["error_type"] == "invalid_label"
    assert "is_fraud" in attributes["error"]


def test_a_label_with_its_transactions_time_and_parties_goes_to_them(
    service: Service, sink: MemoryVerdictSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chargeback that names the transaction's time and entities reaches them without the
    label index (here forgotten), and the terminal's next transaction counts the fraud; one
    naming only the id needs the index."""
    tx = b'{"transaction_id": "x1", "amount": 5, "customer_id": "c1", "terminal_id": "t1", '
    tx += b'"timestamp": "2026-11-29T11:50:00Z"}'
    service.on_transaction(envelope(tx))
    store = service.detector.store
    assert isinstance(store, TiledMemoryStore)
    monkeypatch.setattr(store, "_index", {})  # as if the index had let the id go
    assert service.on_label(envelope(b'{"transaction_id": "x1", "is_fraud": true}')) == "unknown"
    chargeback = {
        "transaction_id": "x1",
        "is_fraud": True,
        "timestamp": "2026-11-29T11:50:00Z",
        "customer_id": "c1",
        "terminal_id": "t1",
    }
    assert service.on_label(envelope(orjson.dumps(chargeback))) == "applied"
    assert service.on_label(envelope(orjson.dumps(chargeback))) == "duplicate"
    later = datetime(2026, 11, 29, 11, 55, tzinfo=UTC).timestamp()
    features = store.observe(Event("x2", later, 1.0, "c1", terminal="t1"))
    assert features["terminal"]["fraud_count_30d"] == 1.0  # what the default rules read
    for field, value in [("timestamp", "2026-11-29T11:50:00"), ("customer_id", 7)]:
        sink.messages.clear()
        bad = {**chargeback, field: value}  # no time zone; not a string
        assert service.on_label(envelope(orjson.dumps(bad))) is None
        [(_, _, attributes)] = sink.messages
        assert attributes["error_type"] == "invalid_label"
        assert field in attributes["error"]


def test_unreachable_redis_fails_the_message_so_it_is_redelivered(
    sink: MemoryVerdictSink, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis down the message raises (Pub/Sub redelivers), nothing is published, the log says why."""
    config = DetectorConfig(model_path="none", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    # Built past the start-up check, as if Redis went down after the function started.
    service = Service(Settings(project="fraud-test"), build_detector(config), sink)
    with pytest.raises(StoreUnavailable) as caught:
        service.on_transaction(envelope(b'{"amount": 5, "customer_id": "c"}'))
    assert isinstance(caught.value, TransientError)
    assert "unreachable" in str(caught.value)
    assert sink.messages == []
    assert any("will be redelivered" in record.getMessage() for record in caplog.records)
    status, body = service.on_request(b'{"amount": 5, "customer_id": "c"}')
    assert status == 503
    assert body["error"]["type"] == "unavailable"


def test_an_unreachable_store_stops_start_up() -> None:
    """REDIS_URL naming no server fails when the function starts, naming the variable."""
    config = DetectorConfig(model_path="none", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreUnavailable, match=r"^REDIS_URL: cannot reach redis://127\.0\.0\.1:"):
        build_service(Settings(project="fraud-test", detector=config), MemoryVerdictSink())


@pytest.mark.parametrize(
    "url", ["localhost:6379", "http://127.0.0.1:6379/0", "redis://h:notaport/0"]
)
def test_a_malformed_redis_url_stops_start_up(url: str) -> None:
    """A REDIS_URL that is not a Redis URL is a configuration error at start, not per message."""
    with pytest.raises(StateConfigError, match=r"^REDIS_URL: ") as caught:
        build_service(
            Settings(project="fraud-test", detector=DetectorConfig(redis_url=url)),
            MemoryVerdictSink(),
        )
    assert caught.value.setting == "REDIS_URL"


def test_start_up_needs_a_project_to_name_the_topics() -> None:
    """Without GOOGLE_CLOUD_PROJECT the function does not start, instead of failing per message."""
    with pytest.raises(ConfigError, match=r"^GOOGLE_CLOUD_PROJECT: "):
        build_service(Settings(project=""), MemoryVerdictSink())


@functools.cache
def _default_service() -> Service:
    return build_service(Settings(project="fraud-test"), MemoryVerdictSink())


@given(
    amount=st.floats(min_value=0, max_value=1000),
    country=st.sampled_from([None, "FR", "US"]),
    ip_country=st.sampled_from([None, "FR", "BR"]),
)
@settings(max_examples=200, deadline=None)
def test_default_rules_never_block_an_ordinary_lone_transaction(
    amount: float, country: str | None, ip_country: str | None
) -> None:
    """With the bundled rules and model, only amount > 1000 blocks a first transaction."""
    service = _default_service()
    lone = uuid.uuid4().hex  # a customer, card and terminal with no history
    transaction = {"amount": amount, "customer_id": lone, "card_id": lone, "terminal_id": lone}
    transaction |= {k: v for k, v in (("country", country), ("ip_country", ip_country)) if v}
    status, verdict = service.on_request(orjson.dumps(transaction))
    assert status == 200
    assert verdict["decision"] != "block"
    assert verdict["is_fraud"] is False


def test_full_collections_freeze_what_survives_them() -> None:
    """The function's collector policy: after a full collection its survivors are frozen, so
    the next full collection walks only newer objects (and a store's history is not rescanned);
    once a period has passed, a full collection walks the frozen objects too and frees a cycle
    that was frozen while still in use."""
    import gc
    import weakref

    class Node:
        partner: object = None

    now = [0.0]
    policy = CollectorPolicy(every=600.0, clock=lambda: now[0])
    gc.callbacks.append(policy)
    try:
        assert bound_collector_pauses() is policy  # idempotent: the installed one
        survivors = [[i] for i in range(1000)]
        in_use = Node()
        in_use.partner = Node()
        in_use.partner.partner = in_use  # a cycle, like werkzeug's request and environ
        probe = weakref.ref(in_use)
        before = gc.get_freeze_count()
        gc.collect(1)
        assert gc.get_freeze_count() == before  # young collections freeze nothing
        gc.collect()
        assert gc.get_freeze_count() >= before + len(survivors)
        assert all(obj is not survivors for obj in gc.get_objects(generation=2))
        del in_use
        gc.collect()
        assert probe() is not None  # frozen: the collector no longer looks at it
        now[0] = 600.0
        gc.collect()
        assert probe() is None  # the periodic full walk freed it
        assert policy.full_walks == 1
        assert gc.get_freeze_count() >= len(survivors)  # and froze the survivors again
    finally:
        gc.callbacks.remove(policy)
        gc.unfreeze()


def test_a_transaction_dated_after_its_publish_time_is_dead_lettered(
    service: Service, sink: MemoryVerdictSink
) -> None:
    """Beyond MAX_CLOCK_SKEW after the publish time: invalid_transaction naming timestamp."""
    data = b'{"amount": 5, "customer_id": "c", "timestamp": "2027-11-29T12:00:00Z"}'
    assert service.on_transaction(envelope(data)) is None
    [(topic, body, attributes)] = sink.messages
    assert topic == DEAD
    assert body == data
    assert attributes["error_type"] == "invalid_transaction"
    assert attributes["error"].startswith("timestamp: must be at most 5m after the publish time")
    # Within the skew (the publish time is 11:59:59.5) it is decided as usual.
    on_time = b'{"amount": 5, "customer_id": "c", "timestamp": "2026-11-29T12:04:59Z"}'
    assert service.on_transaction(envelope(on_time)) is not None


def test_http_rejects_a_transaction_dated_after_its_receive_time(service: Service) -> None:
    """Over HTTP the reference is the receive time; the 400 names timestamp."""
    status, body = service.on_request(
        b'{"amount": 5, "customer_id": "c", "timestamp": "2026-11-29T12:05:01Z"}'
    )
    assert status == 400
    assert body["error"]["type"] == "invalid_transaction"
    [problem] = body["error"]["fields"]
    assert problem["field"] == "timestamp"
    assert problem["problem"].startswith("must be at most 5m after the receive time")


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, 300.0), ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0)]
)
def test_max_clock_skew_is_read_as_a_duration(value: str | None, seconds: float) -> None:
    """MAX_CLOCK_SKEW takes the project's durations, 5 minutes by default."""
    env = {"GOOGLE_CLOUD_PROJECT": "p", **({"MAX_CLOCK_SKEW": value} if value else {})}
    assert Settings.from_env(env).max_clock_skew == seconds


@pytest.mark.parametrize("value", ["soon", "-5m", "0"])
def test_an_unusable_max_clock_skew_stops_start_up(value: str) -> None:
    """A skew that is not a positive duration names the variable."""
    with pytest.raises(ConfigError, match=r"^MAX_CLOCK_SKEW: "):
        Settings.from_env({"GOOGLE_CLOUD_PROJECT": "p", "MAX_CLOCK_SKEW": value})


CARD = "4111 1111 1111 1111"


@pytest.mark.parametrize(
    "payload",
    [
        {"amount": 5, "customer_id": "c", "card_id": CARD + "\x00"},
        {"amount": 5, "customer_id": "c", "card_id": CARD + "x" * 100_000},
        {"amount": 5, "customer_id": CARD.replace(" ", "-") * 20},
    ],
    ids=["control character", "100 KB", "long"],
)
def test_rejected_values_reach_logs_and_dead_letters_short_and_masked(
    service: Service,
    sink: MemoryVerdictSink,
    caplog: pytest.LogCaptureFixture,
    payload: dict[str, str],
) -> None:
    """A card number in a rejected field never appears in a log line, a dead letter's
    attributes or an HTTP 400's log; a 100 KB field gives a short line."""
    import io

    from detector import logs

    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(logs.JsonFormatter())
    logging.getLogger().addHandler(handler)
    caplog.set_level(logging.DEBUG)
    try:
        service.on_transaction(envelope(orjson.dumps(payload)))
        status, body = service.on_request(orjson.dumps(payload))
    finally:
        logging.getLogger().removeHandler(handler)
    assert status == 400
    [(_, _, attributes)] = sink.messages
    digits = CARD.replace(" ", "")
    lines = output.getvalue().splitlines()
    assert len(lines) == 2  # the dead letter's WARNING, the HTTP rejection's INFO
    for text in [*lines, *attributes.values()]:
        assert digits not in text.replace(" ", "").replace("-", "")
        assert len(text) < 2000
    if "control" not in attributes["error"]:  # that problem does not repeat the value
        assert "****" in attributes["error"]
    assert len(orjson.dumps(body)) < 2000  # the caller's own value, but bounded


def test_dead_letter_attributes_stay_within_pub_sub_limits() -> None:
    """At most 100 attributes and 1024 bytes a value; ours always present; the count dropped said."""
    many = {f"k{i:03}": "v" * 2000 for i in range(150)}
    message = Message(
        data=b"{}", attributes=many, message_id="m-1", source_topic="projects/p/topics/transactions"
    )
    attributes = dead_letter_attributes(message, InvalidJSON("data: must be a JSON object"))
    assert len(attributes) == 100
    assert all(len(value.encode()) <= 1024 for value in attributes.values())
    assert attributes["error_type"] == "invalid_json"
    assert attributes["error"] == "data: must be a JSON object"
    assert attributes["message_id"] == "m-1"
    assert attributes["source_topic"] == "projects/p/topics/transactions"
    assert attributes["attributes_dropped"] == "55"
    assert attributes["k000"] == "v" * 1021 + "..."


def test_dead_letter_attributes_replace_ours_from_an_earlier_dead_letter() -> None:
    """A redriven message that fails again carries this failure, not the last one."""
    message = Message(
        data=b"{}",
        attributes={"error_type": "old", "error": "old", "origin": "pos-7"},
        message_id="m-2",
    )
    attributes = dead_letter_attributes(message, StoreUnavailable("redis: unreachable"))
    assert attributes == {
        "origin": "pos-7",
        "error_type": "transient_exhausted",
        "error": "redis: unreachable",
        "message_id": "m-2",
        "source_topic": "",
    }


def test_the_source_topic_comes_from_the_cloud_event(
    service: Service, sink: MemoryVerdictSink
) -> None:
    """Where a dead letter came from, so redrive knows where to send it back."""
    source = "//pubsub.googleapis.com/projects/fraud-test/topics/payments"
    service.on_transaction(envelope(b"[]"), source=source)
    service.on_transaction(envelope(b"[]"))  # a push without the topic in its path
    assert [a["source_topic"] for _, _, a in sink.messages] == [
        "projects/fraud-test/topics/payments",
        "projects/fraud-test/topics/transactions",
    ]


class FailingDetector:
    """A detector whose store is down: every decision raises StoreUnavailable."""

    store = None

    def decide(self, *args: object, **kwargs: object) -> None:
        raise StoreUnavailable("REDIS_URL: redis://h:6379/0 unreachable")

    def record_label(self, *args: object) -> None:
        raise StoreUnavailable("REDIS_URL: redis://h:6379/0 unreachable")


@pytest.mark.parametrize(
    ("attempt", "dead_lettered"), [(None, False), (1, False), (9, False), (10, True), (11, True)]
)
def test_the_last_delivery_attempt_dead_letters_a_transient_failure_with_its_reason(
    sink: MemoryVerdictSink, attempt: int | None, dead_lettered: bool
) -> None:
    """Before the last attempt a transient failure raises (redelivery); on it, the function
    dead-letters the message itself with error_type transient_exhausted, and acks."""
    settings = Settings(project="fraud-test", max_delivery_attempts=10)
    service = Service(settings, FailingDetector(), sink)  # type: ignore[arg-type]
    event = envelope(b'{"amount": 5, "customer_id": "c"}', attributes={"origin": "pos-7"})
    if attempt is not None:
        event["deliveryAttempt"] = attempt
    if not dead_lettered:
        with pytest.raises(StoreUnavailable):
            service.on_transaction(event)
        assert sink.messages == []
        return
    assert service.on_transaction(event) is None
    [(topic, body, attributes)] = sink.messages
    assert topic == DEAD
    assert body == b'{"amount": 5, "customer_id": "c"}'
    assert attributes["origin"] == "pos-7"
    assert attributes["error_type"] == "transient_exhausted"
    assert attributes["error"] == "REDIS_URL: redis://h:6379/0 unreachable"
    label = envelope(b'{"transaction_id": "t", "is_fraud": true}')
    label["deliveryAttempt"] = attempt
    assert service.on_label(label) is None
    assert sink.messages[-1][0] == "projects/fraud-test/topics/fraud-feedback-dead-letter"
    assert sink.messages[-1][2]["error_type"] == "transient_exhausted"


@pytest.mark.parametrize("value", ["4", "101", "ten"])
def test_an_unusable_max_delivery_attempts_stops_start_up(value: str) -> None:
    """MAX_DELIVERY_ATTEMPTS takes Pub/Sub's bounds of a dead-letter policy, 5 to 100."""
    with pytest.raises(
        ConfigError, match=r"^MAX_DELIVERY_ATTEMPTS: must be a whole number from 5 to 100"
    ):
        Settings.from_env({"GOOGLE_CLOUD_PROJECT": "p", "MAX_DELIVERY_ATTEMPTS": value})
