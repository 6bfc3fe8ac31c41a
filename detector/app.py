"""Assembles a `Service` from settings: rules, state store, model and sink."""

from __future__ import annotations

import gc
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


def _freeze_survivors(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


def bound_collector_pauses() -> None:
    """Keep the cyclic garbage collector's pauses short in a long-running function.

    The memory state store holds hundreds of thousands of container objects (each entity's
    lists), and a full collection walks every one of them: 150-180 ms at 100,000
    transactions, long enough to show in the p99 of every message in flight. Right after a
    full collection everything left is alive, so moving it to the permanent generation
    (`gc.freeze`) loses nothing the collector could free then, and each later full
    collection walks only what was allocated since (a few ms). Objects frozen this way are
    freed by reference counting as usual; only a cycle formed among them afterwards would
    stay, and the store makes none. Idempotent.
    """
    if _freeze_survivors not in gc.callbacks:
        gc.collect()
        gc.freeze()
        gc.callbacks.append(_freeze_survivors)
