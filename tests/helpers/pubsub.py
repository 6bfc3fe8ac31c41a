"""Small Pub/Sub helpers for tests: create fresh topics and subscriptions, pull messages."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from google.cloud import pubsub_v1

from stack.services import ROOT

#: The project every test's topics and subscriptions live in.
PROJECT = "fraud-test"


@dataclass(frozen=True)
class Received:
    data: bytes
    attributes: dict[str, str]
    message_id: str
    publish_time: Any


def topic_path(name: str) -> str:
    return f"projects/{PROJECT}/topics/{name}"


def subscription_path(name: str) -> str:
    return f"projects/{PROJECT}/subscriptions/{name}"


def create_topic(publisher: pubsub_v1.PublisherClient, name: str) -> str:
    return str(publisher.create_topic(name=topic_path(name)).name)


def create_subscription(
    subscriber: pubsub_v1.SubscriberClient,
    name: str,
    topic: str,
    push_endpoint: str | None = None,
    **extra: Any,
) -> str:
    request: dict[str, Any] = {"name": subscription_path(name), "topic": topic_path(topic), **extra}
    if push_endpoint:
        request["push_config"] = {"push_endpoint": push_endpoint}
    return str(subscriber.create_subscription(request=request).name)


def pull(
    subscriber: pubsub_v1.SubscriberClient, subscription: str, count: int, timeout: float = 30.0
) -> list[Received]:
    """Pull and ack until `count` messages arrived or `timeout` passed; returns what came."""
    received: list[Received] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        response = subscriber.pull(
            request={"subscription": subscription, "max_messages": 100}, timeout=5
        )
        if not response.received_messages:
            time.sleep(0.1)
            continue
        subscriber.acknowledge(
            request={
                "subscription": subscription,
                "ack_ids": [m.ack_id for m in response.received_messages],
            }
        )
        received.extend(
            Received(
                m.message.data,
                dict(m.message.attributes),
                m.message.message_id,
                m.message.publish_time,
            )
            for m in response.received_messages
        )
    return received


def run_publisher(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run `python -m publisher ARGS` as a user would, from the project root."""
    return subprocess.run(
        [sys.executable, "-m", "publisher", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
