"""Cloud Functions entry points: adapt CloudEvents and HTTP requests to `detector.functions`.

    functions-framework --source detector/main.py --target detect_fraud --signature-type cloudevent
    functions-framework --source detector/main.py --target score_transaction --signature-type http
    functions-framework --source detector/main.py --target record_feedback --signature-type cloudevent

Settings, rules and model load at import, so a bad configuration stops the function from
starting instead of failing every message. Network clients are created on first use.
"""

from __future__ import annotations

import sys
from pathlib import Path

# functions-framework loads this file by path with only its own folder on sys.path; make the
# `detector` package importable from the repository root (in a deployed upload the root is
# already the working directory, and this is a no-op).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import flask  # noqa: E402
import functions_framework  # noqa: E402
import orjson  # noqa: E402
from cloudevents.http import CloudEvent  # noqa: E402

from detector import logs  # noqa: E402
from detector.functions import Settings, bound_collector_pauses, build_service  # noqa: E402

logs.configure()
service = build_service(Settings.from_env())
bound_collector_pauses()


@functions_framework.cloud_event
def detect_fraud(cloud_event: CloudEvent) -> None:
    """Decide on a transaction published to Pub/Sub and publish the verdict.

    Invalid messages are dead-lettered and acked; a failed publish or state store raises,
    so Pub/Sub delivers the message again.
    """
    service.on_transaction(cloud_event.data, cloud_event.get("source"))


@functions_framework.http
def score_transaction(request: flask.Request) -> flask.Response:
    """Decide on a transaction posted as JSON and return the verdict (400 if invalid).

    An `Idempotency-Key` header makes retries of a body without `transaction_id` count once.
    """
    if request.method != "POST":
        error = {"error": {"type": "method_not_allowed", "message": "use POST"}}
        return flask.Response(orjson.dumps(error), 405, mimetype="application/json")
    status, body = service.on_request(request.get_data(), request.headers.get("Idempotency-Key"))
    return flask.Response(orjson.dumps(body), status, mimetype="application/json")


@functions_framework.cloud_event
def record_feedback(cloud_event: CloudEvent) -> None:
    """Record a fraud label from the feedback topic in the state store."""
    service.on_label(cloud_event.data, cloud_event.get("source"))
