"""What the detection core is built from, for the functions and the offline tools alike.

`DetectorConfig` names the ruleset, the model and the state store; `build_detector` loads and
checks them, so a bad configuration fails here, at start-up, with a `ConfigError` naming the
setting, and never per message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from detector.engine import Detector, RiskModel
from detector.errors import ConfigError
from detector.model import default_model_path, load_model, windows_of
from detector.rules import Ruleset, default_ruleset_path, load_ruleset
from detector.state import DEFAULT_WINDOWS, StateConfig, StateStore, feature_names, open_store
from detector.vocabulary import ENTITIES, variable_schema

__all__ = [
    "DetectorConfig",
    "build_detector",
    "load_risk_model",
    "load_rules",
    "state_config",
]


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """The detection core's configuration.

    Attributes:
        rules_file: ruleset to load (RULES_FILE); None means the bundled default.
        model_path: risk model artifact (MODEL_PATH); None means the bundled default,
            "none" disables the model.
        redis_url: state store (REDIS_URL); None keeps state in process memory.
        record_all: STATE_RECORD=all: state records every entity and attribute, not only
            those rules and model read (`read`, the default; `detector.engine.recorded`),
            so that a rule added later finds their history.
    """

    rules_file: Path | None = None
    model_path: str | None = None
    redis_url: str | None = None
    record_all: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DetectorConfig:
        """Read RULES_FILE, MODEL_PATH, REDIS_URL and STATE_RECORD from environ (default
        os.environ).

        Raises:
            ConfigError: STATE_RECORD is neither `read` nor `all`.
        """
        env = os.environ if environ is None else environ
        rules = env.get("RULES_FILE")
        given = env.get("STATE_RECORD") or "read"
        record = given.strip().lower()
        if record not in ("read", "all"):
            raise ConfigError(f"STATE_RECORD: must be 'read' or 'all', got {given!r}")
        return cls(
            rules_file=Path(rules) if rules else None,
            model_path=env.get("MODEL_PATH") or None,
            redis_url=env.get("REDIS_URL") or None,
            record_all=record == "all",
        )


def load_risk_model(config: DetectorConfig) -> RiskModel | None:
    """The configured model: MODEL_PATH, the bundled default when unset, None for "none".

    Raises:
        ModelError: the file is missing, unreadable or not a valid artifact.
    """
    if config.model_path is not None and config.model_path.strip().lower() == "none":
        return None
    return load_model(config.model_path or default_model_path())


def state_config(model: RiskModel | None) -> StateConfig:
    """The default windows plus any window the model's features read (e.g. 8d), tiled unless
    the model was trained on exact windows."""
    if model is None:
        return StateConfig()
    return StateConfig(
        windows=(*DEFAULT_WINDOWS, *windows_of(model.variables)), tiled=model.state == "tiled"
    )


def load_rules(config: DetectorConfig, state: StateConfig) -> Ruleset:
    """Load and check the configured ruleset against the variables the detector provides.

    Raises:
        RulesError: the file is missing or invalid.
    """
    entities = {entity: feature_names(state.windows, entity) for entity in ENTITIES}
    return load_ruleset(config.rules_file or default_ruleset_path(), variable_schema(entities))


def build_detector(config: DetectorConfig, store: StateStore | None = None) -> Detector:
    """The detection core as configured: rules, state (memory or Redis) and model.

    A `store` passed in must have been built with `state_config(model)`'s windows; without
    one, the store `config` names is opened (connections open on first use).

    Raises:
        ConfigError: rules, model or state settings are unusable.
    """
    model = load_risk_model(config)
    state = state_config(model)
    rules = load_rules(config, state)
    if store is None:
        store = open_store(state, config.redis_url)
    return Detector(rules, store, model, record_all=config.record_all)
