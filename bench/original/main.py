"""The blog post's original function, kept as the baseline of the benchmarks.

    functions-framework --source bench/original/main.py --target detect_fraud \
        --signature-type cloudevent

Written the way the blog post wrote it: the Pub/Sub client is imported and created at import,
the message is decoded with `json.loads`, one hard-coded rule (`amount > 1000`) decides, and
the result goes back out with `json.dumps`. No validation, no state, no dead letters: a
malformed message raises and Pub/Sub redelivers it forever. Only for measuring against.

`score_transaction` is the HTTP form (the blog's curl example posts
``{"amount": 1200, "merchant": "XYZ Corp", "customer_id": "12345"}``).
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import functions_framework
from google.cloud import pubsub_v1

publisher = pubsub_v1.PublisherClient()
PROJECT = os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("GCP_PROJECT") or ""
RESULTS_TOPIC = os.environ.get("RESULTS_TOPIC", "fraud-verdicts")


def check(data: bytes) -> bytes:
    """The whole detection of the original: decode, one rule, encode."""
    transaction = json.loads(data)
    is_fraud = transaction["amount"] > 1000
    result = {**transaction, "is_fraud": is_fraud}
    return json.dumps(result).encode("utf-8")


def handle(envelope: dict[str, Any]) -> bytes:
    """What the Pub/Sub function computes for one message, publishing left out."""
    return check(base64.b64decode(envelope["message"]["data"]))


@functions_framework.cloud_event
def detect_fraud(cloud_event: Any) -> None:
    """Decide on a transaction from Pub/Sub and publish the result."""
    result = handle(cloud_event.data)
    topic_path = publisher.topic_path(PROJECT, RESULTS_TOPIC)
    publisher.publish(topic_path, result).result()


@functions_framework.http
def score_transaction(request: Any) -> Any:
    """Decide on a transaction posted as JSON and return the result."""
    return check(request.get_data()), 200, {"Content-Type": "application/json"}
