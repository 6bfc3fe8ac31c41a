"""Pass-through function: the end-to-end benchmark's baseline for the detector.

    functions-framework --source bench/passthrough/main.py --target passthrough \
        --signature-type cloudevent

Decodes the Pub/Sub message in the CloudEvent and republishes its data unchanged to
RESULTS_TOPIC, with the same `source_publish_time` attribute the detector sets. No detection.
Publishing goes through the detector's own `PubSubVerdictSink` (same client, retry and timeout
settings, same wait for the result), so the only difference from `detect_fraud` is the
detection itself.
"""

from __future__ import annotations

import base64
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

# functions-framework puts only this file's folder on sys.path; the sink lives in `detector`.
_ROOT = str(Path(__file__).resolve().parent.parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import functions_framework  # noqa: E402

from detector.functions.settings import Settings  # noqa: E402
from detector.functions.sinks import PubSubVerdictSink  # noqa: E402
from detector.transaction import rfc3339  # noqa: E402

settings = Settings.from_env()
sink = PubSubVerdictSink(settings.publish_timeout)


@functions_framework.cloud_event
def passthrough(cloud_event: Any) -> None:
    """Republish the message's data unchanged, stamped with its publish time."""
    message = cloud_event.data["message"]
    data = base64.b64decode(message.get("data") or "")
    attributes = {}
    published = message.get("publishTime")
    if published:
        attributes["source_publish_time"] = rfc3339(datetime.fromisoformat(published))
    sink.publish(settings.topic_path(settings.results_topic), data, attributes)
