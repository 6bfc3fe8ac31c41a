"""Publisher -> Pub/Sub emulator -> detect_fraud (functions-framework, push) -> watcher."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from google.cloud import pubsub_v1

from stack import services
from tests.helpers.pubsub import run_publisher

pytestmark = pytest.mark.integration

PROJECT = "fraud-test"
COUNT = 300


run = run_publisher


def test_simulated_stream_comes_back_as_verdicts(
    pubsub_env: dict[str, str], tmp_path: Path
) -> None:
    """Every simulated transaction gets one verdict, with a measured delay and a known label."""
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    names = {key: services.unique(key) for key in ("tx", "verdicts", "dead", "feedback")}
    for name in names.values():
        publisher.create_topic(name=publisher.topic_path(PROJECT, name))
    watched = services.unique("watch")
    subscriber.create_subscription(
        name=subscriber.subscription_path(PROJECT, watched),
        topic=publisher.topic_path(PROJECT, names["verdicts"]),
    )
    env = {
        **pubsub_env,
        "RESULTS_TOPIC": names["verdicts"],
        "DEAD_LETTER_TOPIC": names["dead"],
        "FEEDBACK_TOPIC": names["feedback"],
    }
    labels = tmp_path / "labels.jsonl"
    with services.function_server("detect_fraud", "cloudevent", env, tmp_path) as url:
        subscriber.create_subscription(
            request={
                "name": subscriber.subscription_path(PROJECT, services.unique("push")),
                "topic": publisher.topic_path(PROJECT, names["tx"]),
                "push_config": {"push_endpoint": f"{url}/projects/{PROJECT}/topics/{names['tx']}"},
            }
        )
        sent = run(
            "simulate", "--seed", "3", "--customers", "300", "--terminals", "600",
            "--count", str(COUNT), "--topic", names["tx"], "--labels", str(labels), env=env,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        watched_run = run(
            "watch", "--subscription", watched, "--labels", str(labels),
            "--count", str(COUNT), "--idle-timeout", "30", "--json", env=env,
        )  # fmt: skip
    assert watched_run.returncode == 0, watched_run.stderr
    report = orjson.loads(watched_run.stdout)
    assert report["verdicts"] == COUNT
    assert sum(report["decisions"].values()) == COUNT
    assert set(report["decisions"]) == {"allow", "review", "block"}
    assert report["delay_ms"]["count"] == COUNT
    assert 0 < report["delay_ms"]["p50"] <= report["delay_ms"]["p99"] < 60_000
    assert report["labelled"] == COUNT and report["unlabelled"] == 0
    assert sum(s["frauds"] for s in report["by_scenario"].values()) == report["frauds"]
