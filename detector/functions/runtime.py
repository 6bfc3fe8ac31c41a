"""A function process's runtime: the service built from settings, and the collector policy."""

from __future__ import annotations

import gc
import time
from typing import Any

from detector.config import build_detector
from detector.functions.service import Service
from detector.functions.settings import Settings
from detector.functions.sinks import PubSubVerdictSink, VerdictSink

__all__ = ["CollectorPolicy", "bound_collector_pauses", "build_service"]


def build_service(settings: Settings, sink: VerdictSink | None = None) -> Service:
    """Everything a function needs, checked now so a bad configuration stops start-up.

    Rules, model and REDIS_URL's syntax are checked, topic names resolved, and a Redis store
    is reached once; gRPC and the Redis connections used per message open on first use,
    after any fork.

    Raises:
        ConfigError: a setting is unusable.
        StoreUnavailable: the configured state store cannot be reached.
    """
    for topic in (
        settings.results_topic,
        settings.dead_letter_topic,
        settings.feedback_dead_letter_topic,
    ):
        settings.topic_path(topic)
    detector = build_detector(settings.detector)
    if detector.store is not None:
        detector.store.check()
    return Service(settings, detector, sink or PubSubVerdictSink(settings.publish_timeout))


#: Seconds between full collections that walk the frozen objects too (see `CollectorPolicy`).
FULL_WALK_EVERY = 600.0


class CollectorPolicy:
    """A gc callback: freeze what survives each full collection; now and then, walk it all.

    After a full collection everything left is alive then, so freezing it (`gc.freeze`) loses
    nothing the collector could free at that moment, and later full collections walk only
    what was allocated since. But objects alive only for a while, such as a request in flight
    on another thread (werkzeug's request and its environ refer to each other), are frozen too,
    and a cycle among frozen objects is never examined again. So once `every` seconds have
    passed, the next full collection starts by unfreezing everything (`gc.unfreeze`) and walks
    it all: one long collection per period bounds what such cycles can hold.
    """

    def __init__(self, every: float = FULL_WALK_EVERY, clock: Any = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self.last_full_walk = clock()
        self.full_walks = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            now = self.clock()
            if now - self.last_full_walk >= self.every:
                gc.unfreeze()  # this collection walks everything
                self.last_full_walk = now
                self.full_walks += 1
        else:
            gc.freeze()


def bound_collector_pauses(every: float = FULL_WALK_EVERY) -> CollectorPolicy:
    """Keep the cyclic garbage collector's pauses short in a long-running function.

    The memory state store holds hundreds of thousands of container objects (each entity's
    lists), and a full collection walks every one of them, long enough to show in the p99 of
    every message in flight (BENCHMARKS.md, "Stalls in process"). With `CollectorPolicy` installed they walk only what was allocated since the
    previous one, except one full walk every `every` seconds. What is alive at start-up
    (modules, rules, model) is frozen at once. Idempotent: returns the installed policy.
    """
    for callback in gc.callbacks:
        if isinstance(callback, CollectorPolicy):
            return callback
    policy = CollectorPolicy(every)
    gc.freeze()
    gc.callbacks.append(policy)
    return policy
