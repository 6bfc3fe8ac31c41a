"""The functions under functions-framework, fed by the real Pub/Sub emulator over push."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import requests
from google.cloud import pubsub_v1

from stack import services
from tests.helpers.functions import startup_error
from tests.helpers.pubsub import PROJECT, create_subscription, create_topic, pull, topic_path

pytestmark = pytest.mark.integration

BLOG = {"amount": 1200, "merchant": "XYZ Corp", "customer_id": "12345"}


@dataclass
class Pipeline:
    """Topics, subscriptions and a running detect_fraud function wired by push."""

    publisher: pubsub_v1.PublisherClient
    subscriber: pubsub_v1.SubscriberClient
    transactions: str
    results_topic: str
    results: str
    dead_letters: str
    url: str

    def send(self, data: bytes, **attributes: str) -> str:
        return str(
            self.publisher.publish(topic_path(self.transactions), data, **attributes).result(30)
        )

    def verdicts(self, count: int, timeout: float = 30) -> list[dict[str, object]]:
        return [orjson.loads(m.data) for m in pull(self.subscriber, self.results, count, timeout)]


def wire(
    pubsub_env: dict[str, str], workdir: Path, *, create_results: bool = True
) -> Iterator[Pipeline]:
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    transactions, results, dead = (services.unique(n) for n in ("tx", "verdicts", "dead"))
    for name in (transactions, dead) + ((results,) if create_results else ()):
        create_topic(publisher, name)
    dead_sub = create_subscription(subscriber, services.unique("dead-keep"), dead)
    results_sub = (
        create_subscription(subscriber, services.unique("verdicts-watch"), results)
        if create_results
        else ""
    )
    env = {
        **pubsub_env,
        "RESULTS_TOPIC": results,
        "DEAD_LETTER_TOPIC": dead,
        "PUBLISH_TIMEOUT": "5",
    }
    with services.function_server("detect_fraud", "cloudevent", env, workdir) as url:
        create_subscription(
            subscriber,
            services.unique("detect-push"),
            transactions,
            push_endpoint=f"{url}/projects/{PROJECT}/topics/{transactions}",
        )
        yield Pipeline(publisher, subscriber, transactions, results, results_sub, dead_sub, url)
    publisher.transport.close()
    subscriber.close()


@pytest.fixture()
def pipeline(pubsub_env: dict[str, str], workdir: Path) -> Iterator[Pipeline]:
    yield from wire(pubsub_env, workdir)


def test_blog_example_end_to_end(pipeline: Pipeline) -> None:
    """Through Pub/Sub: the original example is fraud; 50 and 1000 are not."""
    ids = {
        pipeline.send(orjson.dumps(BLOG)): True,
        pipeline.send(orjson.dumps({**BLOG, "amount": 50})): False,
        pipeline.send(orjson.dumps({**BLOG, "amount": 1000})): False,
    }
    verdicts = pipeline.verdicts(3)
    assert {v["message_id"]: v["is_fraud"] for v in verdicts} == ids
    assert all(v["merchant"] == "XYZ Corp" for v in verdicts)


@pytest.mark.parametrize(
    ("data", "error_type", "error"),
    [
        (b"{{{", "invalid_json", "data: not valid UTF-8 JSON"),
        (b"[]", "invalid_json", "data: must be a JSON object, got list"),
        (
            b'{"amount": "lots", "customer_id": "c"}',
            "invalid_transaction",
            "amount: must be a number",
        ),
        (
            b'{"amount": 5, "customer_id": "c", "decision": "allow"}',
            "invalid_transaction",
            "decision: is a verdict field",
        ),
    ],
)
def test_bad_input_is_dead_lettered_and_the_function_keeps_serving(
    pipeline: Pipeline, data: bytes, error_type: str, error: str
) -> None:
    """Bad input lands in the dead-letter topic, unchanged and explained; good input still works."""
    bad_id = pipeline.send(data, source="till-3")
    good_id = pipeline.send(orjson.dumps(BLOG))
    [dead] = pull(pipeline.subscriber, pipeline.dead_letters, 1)
    assert dead.data == data
    assert dead.attributes["error_type"] == error_type
    assert dead.attributes["error"].startswith(error)
    assert dead.attributes["message_id"] == bad_id
    assert dead.attributes["source"] == "till-3"
    [verdict] = pipeline.verdicts(1)
    assert verdict["message_id"] == good_id
    assert verdict["is_fraud"] is True


def test_verdict_attributes_let_subscribers_filter(pipeline: Pipeline) -> None:
    """Verdict messages carry transaction_id, decision, is_fraud and rules_version attributes."""
    message_id = pipeline.send(orjson.dumps({**BLOG, "transaction_id": "tx-77"}))
    [message] = pull(pipeline.subscriber, pipeline.results, 1)
    verdict = orjson.loads(message.data)
    assert message.attributes["transaction_id"] == "tx-77"
    assert message.attributes["decision"] == "block"
    assert message.attributes["is_fraud"] == "true"
    assert message.attributes["rules_version"] == verdict["rules_version"]
    assert verdict["message_id"] == message_id
    assert "source_publish_time" in message.attributes


def test_failed_verdict_publish_is_redelivered_not_lost(
    pubsub_env: dict[str, str], workdir: Path
) -> None:
    """While the results topic is missing the message is retried; once it exists the verdict arrives."""
    for pipeline in wire(pubsub_env, workdir, create_results=False):
        message_id = pipeline.send(orjson.dumps(BLOG))
        time.sleep(3)  # several failed deliveries: each raises, so Pub/Sub redelivers
        create_topic(pipeline.publisher, pipeline.results_topic)
        results = create_subscription(
            pipeline.subscriber, services.unique("late-watch"), pipeline.results_topic
        )
        received = pull(pipeline.subscriber, results, 1, timeout=30)
        assert [orjson.loads(m.data)["message_id"] for m in received] == [message_id]


def test_a_bad_rules_file_stops_the_function_from_starting(workdir: Path) -> None:
    """An invalid ruleset fails start-up with the rule and the problem, instead of failing every message."""
    rules = workdir / "rules.yaml"
    rules.write_text(
        "version: '1'\nrules:\n"
        "  - {id: typo, description: d, condition: ammount > 5, action: block}\n"
        "  - {id: big, description: d, condition: amount > 5, action: blok}\n"
    )
    error = startup_error({"GOOGLE_CLOUD_PROJECT": PROJECT, "RULES_FILE": str(rules)}, workdir)
    assert 'rule "typo"' in error
    assert "ammount" in error
    assert 'rule "big"' in error


@pytest.fixture()
def http_url(workdir: Path) -> Iterator[str]:
    env = {"GOOGLE_CLOUD_PROJECT": PROJECT}
    with services.function_server("score_transaction", "http", env, workdir) as url:
        yield url


def test_http_function_answers_like_the_blog_post(http_url: str) -> None:
    """requests.post(url, json=data).json() gives the verdict, as in the original example."""
    assert requests.post(http_url, json=BLOG, timeout=30).json()["is_fraud"] is True
    assert (
        requests.post(http_url, json={**BLOG, "amount": 50}, timeout=30).json()["is_fraud"] is False
    )
    verdict = requests.post(http_url, json={**BLOG, "amount": 1000}, timeout=30).json()
    assert verdict["is_fraud"] is False
    assert verdict["decision"] != "block"


def test_http_function_rejects_bad_input_with_400(http_url: str) -> None:
    """Invalid transactions get 400 and a JSON error naming the field; GET gets 405."""
    response = requests.post(http_url, json={"amount": -1, "customer_id": "c"}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["fields"] == [
        {"field": "amount", "problem": "must be >= 0, got -1"}
    ]
    response = requests.post(http_url, data=b"nope", timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_json"
    assert requests.get(http_url, timeout=30).status_code == 405


def test_http_retries_with_an_idempotency_key_get_one_verdict(http_url: str) -> None:
    """Over real HTTP: the same Idempotency-Key twice gives the same transaction and verdict;
    a bad key is a 400 naming the header."""
    body = {"amount": 1500, "customer_id": "idem-http", "card_id": "idem-http-card"}
    headers = {"Idempotency-Key": "3f1c9a0e-5b7d-4c2e-9a61-0d8e2f4b6c11"}
    first = requests.post(http_url, json=body, headers=headers, timeout=30).json()
    again = requests.post(http_url, json=body, headers=headers, timeout=30).json()
    same = ("transaction_id", "decision", "score", "reasons")
    assert first["transaction_id"].startswith("idem-")
    assert {k: again[k] for k in same} == {k: first[k] for k in same}
    bad = requests.post(http_url, json=body, headers={"Idempotency-Key": "a b"}, timeout=30)
    assert bad.status_code == 400
    assert bad.json()["error"]["fields"][0]["field"] == "Idempotency-Key"
