"""Any input through the real entry points ends as a verdict or a dead letter with a reason.

Hypothesis drives functions-framework's own app (CloudEvent and HTTP) with the real Service,
the bundled rules and model, memory state and a memory sink. FUZZ_EXAMPLES sets the number of
cases per path (300 in the suite); FUZZ_REPORT names a JSON file for the counts of a long run
(RELIABILITY.md).
"""

from __future__ import annotations

import base64
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detector.functions import Service
from tests.helpers.functions import app

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
ENV = {"GOOGLE_CLOUD_PROJECT": "fraud-test"}
FIELDS = [
    "amount", "customer_id", "transaction_id", "currency", "timestamp", "merchant", "card_id",
    "terminal_id", "merchant_category", "country", "ip_country", "channel", "decision", "extra",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(
        [
            "", "12.50", "1e303", "-0", "NaN", "USD", "usd", "2026-11-29T12:00:00Z",
            "9999-12-31T23:59:59Z", "0001-01-01T00:00:00+14:00", "2026-11-29T12:00:00",
            "4111 1111 1111 1111", "a\x00b", "\x85", "x" * 300, "\ud7ff", "😀" * 80,
        ]
    ),
)  # fmt: skip
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
#: A valid value of each field, to keep most transactions valid enough to reach a verdict.
VALID = {
    "amount": st.one_of(st.floats(0, 1e6), st.integers(0, 10**6), st.just("12.50")),
    "currency": st.sampled_from(["USD", "EUR"]),
    "timestamp": st.sampled_from(["2026-11-29T11:59:00Z", "2018-04-01T08:00:00+02:00"]),
}
TEXT = st.text(min_size=1, max_size=12)


def field_value(name: str) -> st.SearchStrategy[Any]:
    """Nine times in ten a valid value; else anything JSON can hold."""
    valid = VALID.get(name, TEXT)
    return st.integers(0, 9).flatmap(lambda n: JSON if n == 7 else valid)


TRANSACTIONS = st.fixed_dictionaries(
    {"amount": field_value("amount"), "customer_id": field_value("customer_id")},
    optional={name: field_value(name) for name in FIELDS[2:]},
)
DATA = st.integers(0, 9).flatmap(
    lambda n: (
        st.one_of(JSON.map(lambda value: json.dumps(value).encode()), st.binary(max_size=64))
        if n == 7
        else TRANSACTIONS.map(lambda value: json.dumps(value).encode())
    )
)
ATTRIBUTES = st.integers(0, 9).flatmap(
    lambda n: (
        st.one_of(st.just({"googclient_schemaencoding": "JSON"}), JSON)
        if n == 7
        else st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4)
    )
)


@st.composite
def envelopes(draw: st.DrawFn) -> Any:
    """Push envelopes, mostly well formed, with any message data; sometimes any JSON at all."""
    if draw(st.integers(0, 19)) == 7:
        return draw(JSON)
    message: dict[str, Any] = {
        "data": draw(
            st.integers(0, 9).flatmap(
                lambda n: (
                    st.one_of(st.sampled_from(["", "not base64!", "QQ"]), JSON)
                    if n == 7
                    else DATA.map(lambda data: base64.b64encode(data).decode())
                )
            )
        ),
        "attributes": draw(ATTRIBUTES),
        "messageId": draw(st.one_of(st.text(min_size=1, max_size=10), JSON)),
        "publishTime": draw(st.one_of(st.just("2026-11-29T12:00:00Z"), st.just("yesterday"), JSON)),
    }
    envelope: dict[str, Any] = {"message": message, "subscription": "projects/p/subscriptions/s"}
    if draw(st.booleans()):
        envelope["deliveryAttempt"] = draw(st.one_of(st.integers(-5, 200), JSON))
    return envelope


OUTCOMES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def detect() -> Iterator[tuple[Any, Service]]:
    with app("detect_fraud", "cloudevent", ENV) as pair:
        yield pair


@pytest.fixture(scope="module")
def score() -> Iterator[tuple[Any, Service]]:
    with app("score_transaction", "http", ENV) as pair:
        yield pair


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    target = os.environ.get("FUZZ_REPORT")
    if target:
        Path(target).write_bytes(orjson.dumps(dict(OUTCOMES), option=orjson.OPT_INDENT_2))


CE_HEADERS = {
    "ce-id": "1",
    "ce-specversion": "1.0",
    "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
    "ce-source": "//pubsub.googleapis.com/projects/fraud-test/topics/transactions",
    "Content-Type": "application/json",
}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(envelope=envelopes())
def test_every_pub_sub_delivery_ends_as_a_verdict_or_a_dead_letter(
    detect: tuple[Any, Service], envelope: Any
) -> None:
    """detect_fraud acks every delivery (2xx) after publishing exactly one message: a verdict,
    or a dead letter whose error_type and error say why."""
    client, service = detect
    sink = service.sink
    before = len(sink.messages)  # type: ignore[attr-defined]
    # Python's json, as a sender could write it: integers beyond 64 bits, NaN.
    response = client.post("/", data=json.dumps(envelope), headers=CE_HEADERS)
    assert response.status_code < 300, response.data[:500]
    published = sink.messages[before:]  # type: ignore[attr-defined]
    assert len(published) == 1
    topic, _, attributes = published[0]
    OUTCOMES["pubsub inputs"] += 1
    if topic.endswith("/fraud-verdicts"):
        OUTCOMES["pubsub verdicts"] += 1
        assert attributes["decision"] in ("allow", "review", "block")
    else:
        assert topic.endswith("/transactions-dead-letter")
        assert attributes["error_type"] and attributes["error"]
        OUTCOMES[f"pubsub dead letters: {attributes['error_type']}"] += 1


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    body=DATA,
    key=st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["order-1", "a" * 300])),
)
def test_every_http_request_ends_as_a_verdict_or_a_400_with_a_reason(
    score: tuple[Any, Service], body: bytes, key: str | None
) -> None:
    """score_transaction answers 200 with a verdict or 400 naming the problem, nothing else."""
    client, _ = score
    headers = {"Idempotency-Key": key} if key is not None and key.isprintable() else {}
    try:
        headers_ok = all(value.encode("latin-1") for value in headers.values())
    except UnicodeEncodeError:
        headers_ok = False
    response = client.post("/", data=body, headers=headers if headers_ok else {})
    answer = orjson.loads(response.data)
    OUTCOMES["http inputs"] += 1
    if response.status_code == 200:
        assert answer["decision"] in ("allow", "review", "block")
        OUTCOMES["http verdicts"] += 1
    else:
        assert response.status_code == 400, answer
        assert answer["error"]["type"] and answer["error"]["message"]
        OUTCOMES[f"http 400: {answer['error']['type']}"] += 1
