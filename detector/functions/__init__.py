"""The Cloud Functions' behaviour: settings, the service, verdict sinks and the runtime."""

from __future__ import annotations

from detector.functions.runtime import bound_collector_pauses, build_service
from detector.functions.service import (
    DEAD_LETTER_KEYS,
    Message,
    Service,
    dead_letter_attributes,
    parse_envelope,
    topic_of_source,
)
from detector.functions.settings import Settings
from detector.functions.sinks import MemoryVerdictSink, PubSubVerdictSink, VerdictSink

__all__ = [
    "DEAD_LETTER_KEYS",
    "MemoryVerdictSink",
    "Message",
    "PubSubVerdictSink",
    "Service",
    "Settings",
    "VerdictSink",
    "bound_collector_pauses",
    "build_service",
    "dead_letter_attributes",
    "parse_envelope",
    "topic_of_source",
]
