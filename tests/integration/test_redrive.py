"""Dead letters through the real emulator: written by the service, redriven by the command."""

from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from google.cloud import pubsub_v1

from detector.config import DetectorConfig, build_detector
from detector.functions import DEAD_LETTER_KEYS, PubSubVerdictSink, Service, Settings
from stack import services
from stack.services import ROOT, free_port
from tests.helpers.pubsub import PROJECT, create_subscription, create_topic, pull, topic_path

pytestmark = pytest.mark.integration


def envelope(data: bytes, message_id: str, attempt: int | None = None) -> dict[str, object]:
    message = {
        "data": base64.b64encode(data).decode(),
        "attributes": {"origin": "pos-7"},
        "messageId": message_id,
        "publishTime": "2026-11-29T12:00:00Z",
    }
    return {"message": message, **({"deliveryAttempt": attempt} if attempt else {})}


def redrive(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detector", "redrive", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_dead_letters_go_back_to_their_source_topic(pubsub_env: dict[str, str]) -> None:
    """Invalid and exhausted messages are dead-lettered with a reason and a source topic; a dry
    run only counts; a filtered redrive republishes those, without our attributes, and acks."""
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    source, dead = services.unique("payments"), services.unique("payments-dead")
    create_topic(publisher, source)
    create_topic(publisher, dead)
    source_sub = create_subscription(subscriber, services.unique("payments-sub"), source)
    dry, filtered, everything = (
        create_subscription(subscriber, services.unique(f"dead-{name}"), dead)
        for name in ("dry", "filtered", "all")
    )
    # A store that is down: decisions fail transiently, the last attempt is dead-lettered.
    config = DetectorConfig(model_path="none", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    settings = Settings(project=PROJECT, dead_letter_topic=dead, max_delivery_attempts=5)
    service = Service(settings, build_detector(config), PubSubVerdictSink(10.0))
    origin = f"//pubsub.googleapis.com/{topic_path(source)}"
    service.on_transaction(envelope(b"{not json", "m1"), origin)
    service.on_transaction(envelope(b"[]", "m2"), origin)
    service.on_transaction(envelope(b'{"amount": -1, "customer_id": "c"}', "m3"), origin)
    for n in (4, 5):
        body = b'{"amount": %d, "customer_id": "c"}' % n
        service.on_transaction(envelope(body, f"m{n}", attempt=5), origin)

    counts = redrive("--subscription", dry, "--dry-run", env=pubsub_env)
    assert counts.returncode == 0, counts.stderr
    assert counts.stdout.splitlines() == [
        "would redrive 5",
        "  invalid_json: 2",
        "  invalid_transaction: 1",
        "  transient_exhausted: 2",
    ]
    assert pull(subscriber, source_sub, 1, timeout=3) == []

    short = filtered.rpartition("/")[2]  # a short name, with GOOGLE_CLOUD_PROJECT
    done = redrive(
        "--subscription", short, "--filter", "error_type=transient_exhausted", env=pubsub_env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["redriven 2", "  transient_exhausted: 2"]
    back = pull(subscriber, source_sub, 2)
    assert sorted(m.data for m in back) == [
        b'{"amount": 4, "customer_id": "c"}',
        b'{"amount": 5, "customer_id": "c"}',
    ]
    assert all(m.attributes == {"origin": "pos-7"} for m in back)
    assert not set(DEAD_LETTER_KEYS) & {k for m in back for k in m.attributes}

    capped = redrive("--subscription", everything, "--max", "3", env=pubsub_env)
    assert capped.stdout.splitlines()[0] == "redriven 3"
    assert len(pull(subscriber, source_sub, 3)) == 3


def test_messages_the_policy_forwarded_go_back_to_the_topic_they_left(
    pubsub_env: dict[str, str],
) -> None:
    """A message delivered five times without an ack is forwarded by the subscription's
    dead-letter policy; redrive counts it as delivery_exhausted and republishes it to the topic
    of the subscription it left, without Pub/Sub's dead-letter attributes."""
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    source, dead = services.unique("payments"), services.unique("payments-dead")
    create_topic(publisher, source)
    create_topic(publisher, dead)
    keep = create_subscription(subscriber, services.unique("dead-keep"), dead)
    arrived = create_subscription(subscriber, services.unique("dead-seen"), dead)
    failing = f"projects/{PROJECT}/subscriptions/{services.unique('failing')}"
    subscriber.create_subscription(
        request={
            "name": failing,
            "topic": topic_path(source),
            "dead_letter_policy": {
                "dead_letter_topic": topic_path(dead),
                "max_delivery_attempts": 5,
            },
        }
    )
    publisher.publish(topic_path(source), b'{"amount": 7}', origin="pos-9").result(30)
    attempts = 0
    while attempts < 5:  # as a function that keeps failing: every delivery is refused
        for received in subscriber.pull(
            request={"subscription": failing, "max_messages": 10}, timeout=10
        ).received_messages:
            attempts += 1
            subscriber.modify_ack_deadline(
                request={
                    "subscription": failing,
                    "ack_ids": [received.ack_id],
                    "ack_deadline_seconds": 0,
                }
            )
    # The emulator forwards when it would deliver a sixth time: on the next pull.
    subscriber.pull(request={"subscription": failing, "max_messages": 10}, timeout=10)
    [forwarded] = pull(subscriber, arrived, 1)
    assert forwarded.attributes["CloudPubSubDeadLetterSourceDeliveryCount"] == "5"
    back_sub = create_subscription(subscriber, services.unique("payments-back"), source)
    counts = redrive("--subscription", keep, env=pubsub_env)
    assert counts.returncode == 0, counts.stderr
    assert counts.stdout.splitlines() == ["redriven 1", "  delivery_exhausted: 1"]
    [back] = pull(subscriber, back_sub, 1)
    assert back.data == b'{"amount": 7}'
    assert back.attributes == {"origin": "pos-9"}


def test_a_filter_that_is_not_key_value_is_one_line_error(pubsub_env: dict[str, str]) -> None:
    """User mistakes end as `error: ...`, exit 2, no traceback."""
    result = redrive("--subscription", "s", "--filter", "error_type", env=pubsub_env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --filter: must be KEY=VALUE")
