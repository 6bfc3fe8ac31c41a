"""Publishing to a real Pub/Sub emulator: what a subscriber of the topics receives."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from google.cloud import pubsub_v1

from publisher.errors import NotAllPublished
from publisher.publish import BatchPublisher, LibraryPublisher, Publisher
from stack import services
from tests.helpers.pubsub import run_publisher

pytestmark = pytest.mark.integration

PROJECT = "fraud-test"
SMALL = ["--seed", "11", "--customers", "200", "--terminals", "400", "--days", "4"]


run = run_publisher


def make_topic(prefix: str) -> tuple[str, str]:
    """A fresh topic with one pull subscription; returns (topic name, subscription path)."""
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = services.unique(prefix)
    topic_path = publisher.topic_path(PROJECT, topic)
    publisher.create_topic(name=topic_path)
    subscription = subscriber.subscription_path(PROJECT, services.unique(prefix + "-sub"))
    subscriber.create_subscription(name=subscription, topic=topic_path)
    return topic, subscription


def pull_all(
    subscription: str, expected: int, timeout: float = 30.0
) -> list[tuple[bytes, dict[str, str]]]:
    """Pull and ack until at least `expected` messages arrived (or the timeout passed)."""
    subscriber = pubsub_v1.SubscriberClient()
    received: list[tuple[bytes, dict[str, str]]] = []
    deadline = time.monotonic() + timeout
    while len(received) < expected and time.monotonic() < deadline:
        response = subscriber.pull(subscription=subscription, max_messages=1000, timeout=5)
        for item in response.received_messages:
            received.append((item.message.data, dict(item.message.attributes)))
        if response.received_messages:
            subscriber.acknowledge(
                subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages]
            )
    return received


@pytest.mark.parametrize("publisher", ["batch", "library"])
def test_simulate_publishes_what_the_file_holds(
    pubsub_env: dict[str, str], tmp_path: Path, publisher: str
) -> None:
    """A live run delivers exactly the transactions --out writes, with ids as attributes."""
    topic, subscription = make_topic("tx")
    out = tmp_path / "out.jsonl"
    assert run("simulate", *SMALL, "--out", str(out), env=pubsub_env).returncode == 0
    expected = out.read_bytes().splitlines()
    result = run("simulate", *SMALL, "--topic", topic, "--publisher", publisher, env=pubsub_env)
    assert result.returncode == 0, result.stderr
    assert f"published {len(expected):,} messages" in result.stderr
    received = pull_all(subscription, len(expected))
    assert sorted(data for data, _ in received) == sorted(expected)
    for data, attributes in received:
        assert attributes == {"transaction_id": orjson.loads(data)["transaction_id"]}


def test_feedback_follows_the_label_delay(pubsub_env: dict[str, str], tmp_path: Path) -> None:
    """With a 1-day delay over 4 days, labels of about the first 3 days reach the feedback topic."""
    topic, transactions = make_topic("tx")
    feedback_topic, feedback = make_topic("feedback")
    labels = tmp_path / "labels.jsonl"
    result = run(
        "simulate", *SMALL, "--topic", topic, "--feedback-topic", feedback_topic,
        "--label-delay", "1d", "--labels", str(labels), env=pubsub_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    truth = [orjson.loads(line) for line in labels.read_bytes().splitlines()]
    sent = pull_all(transactions, len(truth))
    event_time = {
        orjson.loads(data)["transaction_id"]: dt.datetime.fromisoformat(
            orjson.loads(data)["timestamp"]
        )
        for data, _ in sent
    }
    last = max(event_time.values())
    # A label is due once a transaction a day younger has been sent.
    due = [x for x in truth if event_time[x["transaction_id"]] + dt.timedelta(days=1) <= last]
    got = pull_all(feedback, len(due))
    bodies = [orjson.loads(data) for data, _ in got]
    assert 0.6 * len(truth) < len(due) < 0.8 * len(truth)
    assert sorted(b["transaction_id"] for b in bodies) == [x["transaction_id"] for x in due]
    truth_by_id = {x["transaction_id"]: x["is_fraud"] for x in truth}
    assert all(set(b) == {"transaction_id", "is_fraud"} for b in bodies)
    assert all(truth_by_id[b["transaction_id"]] == b["is_fraud"] for b in bodies)
    assert f"{len(truth) - len(due):,} not yet due" in result.stderr


def test_count_and_zero_delay_send_every_label(pubsub_env: dict[str, str]) -> None:
    """--count 300 --label-delay 0 publishes 300 transactions and their 300 labels."""
    topic, transactions = make_topic("tx")
    feedback_topic, feedback = make_topic("feedback")
    result = run(
        "simulate", *SMALL, "--count", "300", "--topic", topic,
        "--feedback-topic", feedback_topic, "--label-delay", "0", env=pubsub_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(pull_all(transactions, 300)) == 300
    assert len(pull_all(feedback, 300)) == 300


def test_republish_publishes_a_recorded_file(pubsub_env: dict[str, str], tmp_path: Path) -> None:
    """republish sends each line of the file as one message, at the requested rate."""
    topic, subscription = make_topic("republish")
    recorded = tmp_path / "recorded.jsonl"
    assert (
        run("simulate", *SMALL, "--count", "200", "--out", str(recorded), env=pubsub_env).returncode
        == 0
    )
    started = time.monotonic()
    result = run("republish", str(recorded), "--topic", topic, "--rate", "400", env=pubsub_env)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 0.45  # 200 messages at 400/s take >= 0.5 s
    received = pull_all(subscription, 200)
    assert sorted(d for d, _ in received) == sorted(recorded.read_bytes().splitlines())


def test_speedup_paces_by_event_time(pubsub_env: dict[str, str], tmp_path: Path) -> None:
    """--speedup 86400 plays a day of event time in about a second of wall time."""
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    result = run(
        "simulate", "--customers", "50", "--terminals", "100", "--days", "2",
        "--speedup", "86400", "--out", str(out), env=pubsub_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = out.read_bytes().splitlines()
    first, last = orjson.loads(lines[0])["timestamp"], orjson.loads(lines[-1])["timestamp"]
    assert first.startswith("2018-04-01") and last.startswith("2018-04-02")
    assert time.monotonic() - started > 1.0  # at least the day boundary's worth of waiting


@pytest.fixture(params=["batch", "library"])
def publisher_kind(
    request: pytest.FixtureRequest, pubsub_env: dict[str, str]
) -> Iterator[Publisher]:
    """Each Publisher implementation, pointed at the emulator."""
    publisher: Publisher
    if request.param == "batch":
        publisher = BatchPublisher(PROJECT, pubsub_env["PUBSUB_EMULATOR_HOST"])
    else:
        publisher = LibraryPublisher(PROJECT, pubsub_env["PUBSUB_EMULATOR_HOST"])
    yield publisher
    publisher.close()


def test_publishers_deliver_and_count(publisher_kind: Publisher) -> None:
    """Both publishers deliver every message and count them as published."""
    topic, subscription = make_topic("pub")
    sink = publisher_kind.topic(topic)
    for i in range(2500):
        sink.send(b'{"n":%d}' % i, {"n": str(i)})
    publisher_kind.wait()
    assert (publisher_kind.sent, publisher_kind.published, publisher_kind.failed) == (2500, 2500, 0)
    received = pull_all(subscription, 2500)
    assert sorted(int(a["n"]) for _, a in received) == list(range(2500))


def test_publishers_count_failures(publisher_kind: Publisher) -> None:
    """Messages to a topic that does not exist are counted as failed and wait() raises."""
    sink = publisher_kind.topic(services.unique("absent"))
    for i in range(10):
        sink.send(b"{}", {"n": str(i)})
    with pytest.raises(NotAllPublished, match=r"10 of 10 messages were not published.*NotFound"):
        publisher_kind.wait(timeout=60)
