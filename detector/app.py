"""Assembles a `Service` from settings: rules, state store, model and sink."""

from __future__ import annotations

import gc
import time
from typing import Any

from detector.engine import ENTITY_VARIABLES, Detector, RiskModel, variable_schema
from detector.rules import Ruleset, default_ruleset_path, load_ruleset
from detector.service import Service
from detector.settings import Settings
from detector.sinks import PubSubSink, Sink
from detector.state import DEFAULT_WINDOWS, StateConfig, StateStore, feature_names, open_store


def load_rules(settings: Settings, config: StateConfig) -> Ruleset:
    """Load and validate the configured ruleset against the variables the detector provides.

    Raises:
        RulesError: the file is missing or invalid; the function must not start.
    """
    entities = {entity: feature_names(config.windows, entity) for entity in ENTITY_VARIABLES}
    return load_ruleset(settings.rules_file or default_ruleset_path(), variable_schema(entities))


def load_risk_model(settings: Settings) -> RiskModel | None:
    """The configured model: MODEL_PATH, the bundled default when unset, None for "none".

    Raises:
        ModelError: the file is missing, unreadable or not a valid artifact; the function
            must not start.
    """
    from detector.model import default_model_path, load_model

    if settings.model_path is not None and settings.model_path.strip().lower() == "none":
        return None
    return load_model(settings.model_path or default_model_path())


def state_config(model: RiskModel | None) -> StateConfig:
    """The default windows plus any window the model's features read (e.g. 8d)."""
    from detector.model import windows_of

    if model is None:
        return StateConfig()
    return StateConfig(windows=(*DEFAULT_WINDOWS, *windows_of(model.variables)))


def build_detector(settings: Settings, store: StateStore | None = None) -> Detector:
    """The detection core as configured: rules, state (memory or Redis) and model.

    A `store` passed in must have been built with `state_config(model)`'s windows.
    """
    model = load_risk_model(settings)
    config = state_config(model)
    rules = load_rules(settings, config)
    if store is None:
        store = open_store(config, settings.redis_url)
    return Detector(rules, store, model)


def build_service(settings: Settings, sink: Sink | None = None) -> Service:
    """Everything a function needs; gRPC and Redis connections open on first use."""
    detector = build_detector(settings)
    return Service(settings, detector, sink or PubSubSink(settings.publish_timeout))


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
    lists), and a full collection walks every one of them: 130-160 ms at 100,000
    transactions (bench/bench_pauses.py), long enough to show in the p99 of every message in
    flight. With `CollectorPolicy` installed they walk only what was allocated since the
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
