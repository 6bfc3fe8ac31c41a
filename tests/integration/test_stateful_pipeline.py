"""Stream state through the real pipeline: emulator push, functions-framework, redis-server."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from google.cloud import pubsub_v1

from stack import services
from tests.helpers.pubsub import PROJECT, create_subscription, create_topic, pull, topic_path

pytestmark = pytest.mark.integration

RULES = """
version: "stateful-test"
rules:
  - id: terminal-reported
    description: "{by_terminal.fraud_count_30d} reported frauds at this terminal in 30 days"
    condition: by_terminal.fraud_count_30d >= 1
    action: block
  - id: customer-history
    description: "{by_customer.count_1d} earlier transactions of this customer in 1 day"
    condition: by_customer.count_1d >= 0
    action: review
    shadow: true
"""


def transaction(tx_id: str, customer: str, terminal: str, timestamp: str) -> bytes:
    return orjson.dumps(
        {
            "transaction_id": tx_id,
            "amount": 25.0,
            "customer_id": customer,
            "terminal_id": terminal,
            "timestamp": timestamp,
        }
    )


def reason(verdict: dict[str, object], rule: str) -> dict[str, object] | None:
    reasons = verdict["reasons"]
    assert isinstance(reasons, list)
    return next((r for r in reasons if r["rule"] == rule), None)


def wait_for_log(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged in {path} within {timeout} s")


@pytest.fixture()
def clients() -> tuple[pubsub_v1.PublisherClient, pubsub_v1.SubscriberClient]:
    return pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()


def test_redelivered_transaction_is_counted_once(
    pubsub_env: dict[str, str],
    redis_url: str,
    workdir: Path,
    clients: tuple[pubsub_v1.PublisherClient, pubsub_v1.SubscriberClient],
) -> None:
    """A transaction delivered several times (its verdict publish failed) updates state once."""
    publisher, subscriber = clients
    tx, results, dead = (services.unique(n) for n in ("tx", "verdicts", "dead"))
    create_topic(publisher, tx)
    create_topic(publisher, dead)
    (workdir / "rules.yaml").write_text(RULES)
    env = {
        **pubsub_env,
        "REDIS_URL": redis_url,
        "RESULTS_TOPIC": results,
        "DEAD_LETTER_TOPIC": dead,
        "RULES_FILE": str(workdir / "rules.yaml"),
        "PUBLISH_TIMEOUT": "5",
        "MODEL_PATH": "none",
    }
    customer, terminal = services.unique("cust"), services.unique("term")
    with services.function_server("detect_fraud", "cloudevent", env, workdir) as url:
        create_subscription(
            subscriber,
            services.unique("push"),
            tx,
            push_endpoint=f"{url}/projects/{PROJECT}/topics/{tx}",
        )
        publisher.publish(
            topic_path(tx), transaction("r-1", customer, terminal, "2024-05-01T10:00:00Z")
        ).result(30)
        time.sleep(
            3
        )  # the results topic is missing: every delivery observes, fails, is redelivered
        create_topic(publisher, results)
        watch = create_subscription(subscriber, services.unique("watch"), results)
        [first] = [orjson.loads(m.data) for m in pull(subscriber, watch, 1)]
        publisher.publish(
            topic_path(tx), transaction("r-2", customer, terminal, "2024-05-01T10:05:00Z")
        ).result(30)
        [second] = [orjson.loads(m.data) for m in pull(subscriber, watch, 1)]
    log = next(workdir.glob("detect_fraud-*.log")).read_text()
    assert log.count("publish failed") + log.count("NotFound") >= 1, (
        "the first delivery did not fail"
    )
    assert first["transaction_id"] == "r-1"
    assert reason(first, "customer-history")["values"] == {"by_customer.count_1d": 0}
    assert second["transaction_id"] == "r-2"
    assert reason(second, "customer-history")["values"] == {"by_customer.count_1d": 1}


def test_feedback_changes_a_later_verdict(
    pubsub_env: dict[str, str],
    redis_url: str,
    workdir: Path,
    clients: tuple[pubsub_v1.PublisherClient, pubsub_v1.SubscriberClient],
) -> None:
    """A chargeback reported through record_feedback makes the next transaction at that terminal block."""
    publisher, subscriber = clients
    tx, results, dead, feedback = (
        services.unique(n) for n in ("tx", "verdicts", "dead", "feedback")
    )
    for name in (tx, results, dead, feedback):
        create_topic(publisher, name)
    watch = create_subscription(subscriber, services.unique("watch"), results)
    (workdir / "rules.yaml").write_text(RULES)
    env = {
        **pubsub_env,
        "REDIS_URL": redis_url,
        "RESULTS_TOPIC": results,
        "DEAD_LETTER_TOPIC": dead,
        "RULES_FILE": str(workdir / "rules.yaml"),
        "MODEL_PATH": "none",
    }
    customer, terminal = services.unique("cust"), services.unique("term")
    with (
        services.function_server("detect_fraud", "cloudevent", env, workdir) as detect,
        services.function_server("record_feedback", "cloudevent", env, workdir) as record,
    ):
        create_subscription(
            subscriber,
            services.unique("push"),
            tx,
            push_endpoint=f"{detect}/projects/{PROJECT}/topics/{tx}",
        )
        create_subscription(
            subscriber,
            services.unique("push-fb"),
            feedback,
            push_endpoint=f"{record}/projects/{PROJECT}/topics/{feedback}",
        )
        publisher.publish(
            topic_path(tx), transaction("f-1", customer, terminal, "2024-05-01T10:00:00Z")
        ).result(30)
        [before] = [orjson.loads(m.data) for m in pull(subscriber, watch, 1)]
        label = orjson.dumps({"transaction_id": "f-1", "is_fraud": True})
        publisher.publish(topic_path(feedback), label).result(30)
        wait_for_log(next(workdir.glob("record_feedback-*.log")), "label fraud for f-1")
        other = services.unique("cust")
        publisher.publish(
            topic_path(tx), transaction("f-2", other, terminal, "2024-05-02T09:00:00Z")
        ).result(30)
        [after] = [orjson.loads(m.data) for m in pull(subscriber, watch, 1)]
    assert before["decision"] == "allow"
    assert after["transaction_id"] == "f-2"
    assert after["decision"] == "block"
    assert (
        reason(after, "terminal-reported")["description"]
        == "1 reported frauds at this terminal in 30 days"
    )
