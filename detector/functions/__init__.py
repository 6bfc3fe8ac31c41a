"""The Cloud Functions' behaviour: settings, the service, verdict sinks and the runtime."""

from __future__ import annotations

from detector.functions.runtime import bound_collector_pauses, build_service
from detector.functions.service import Message, Service, parse_envelope
from detector.functions.settings import Settings
from detector.functions.sinks import MemoryVerdictSink, PubSubVerdictSink, VerdictSink

__all__ = [
    "MemoryVerdictSink",
    "Message",
    "PubSubVerdictSink",
    "Service",
    "Settings",
    "VerdictSink",
    "bound_collector_pauses",
    "build_service",
    "parse_envelope",
]
