"""The detector's words, defined once: entity kinds, transaction variables and durations.

Rules, model, state, schemas and every command line derive their names from here, so a new
entity kind or variable is added in one place.

Durations are written one way everywhere (rules' window suffixes, `--label-delay`, CLI
flags, settings): a non-negative number and an optional unit, ``d``, ``h``, ``m`` or ``s``
(seconds when absent): ``7d``, ``12h``, ``1.5h``, ``90s``, ``0``. `format_duration` writes
whole seconds in the largest unit that divides them, which is how window features are named
(``count_1h``, ``mean_30d``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from detector.errors import ConfigError

__all__ = [
    "DAY",
    "DURATION_UNITS",
    "ENTITIES",
    "ENTITY_VARIABLES",
    "HOUR",
    "MINUTE",
    "TRANSACTION_VARIABLES",
    "format_duration",
    "parse_duration",
    "variable_schema",
]

MINUTE: Final = 60
HOUR: Final = 3600
DAY: Final = 86400

#: Seconds per unit, largest first.
DURATION_UNITS: Final = {"d": DAY, "h": HOUR, "m": MINUTE, "s": 1}

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([dhms]?)")

#: Entity kinds a transaction can name, in the order features are returned.
ENTITIES: Final = ("customer", "card", "terminal", "merchant")

#: The transaction field naming each entity kind.
ENTITY_FIELDS: Final = {
    "customer": "customer_id",
    "card": "card_id",
    "terminal": "terminal_id",
    "merchant": "merchant",
}

#: Name of each entity's aggregates in rule conditions and model features.
#: (`merchant` is already the transaction's merchant field, hence the `by_` prefix.)
ENTITY_VARIABLES: Final = {kind: f"by_{kind}" for kind in ENTITIES}

#: Transaction fields that rule conditions and the model can read, with their types.
TRANSACTION_VARIABLES: Final[Mapping[str, str]] = {
    "amount": "number",
    "customer_id": "string",
    "transaction_id": "string",
    "currency": "string",
    "merchant": "string",
    "card_id": "string",
    "terminal_id": "string",
    "merchant_category": "string",
    "country": "string",
    "ip_country": "string",
    "channel": "string",
    "hour": "number",
    "weekday": "number",
}


def parse_duration(text: str, *, setting: str = "duration") -> float:
    """Seconds of a duration: "7d" -> 604800.0, "1.5h" -> 5400.0, "90" -> 90.0.

    Raises:
        ConfigError: not a non-negative number with an optional unit; names `setting`.
    """
    match = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ConfigError(
            f"{setting}: expected a number and one of d, h, m, s (e.g. 7d), got {text!r}",
            setting=setting,
        )
    return float(match.group(1)) * DURATION_UNITS.get(match.group(2), 1)


def format_duration(seconds: float, *, setting: str = "duration") -> str:
    """Whole positive seconds in the largest unit that divides them: 3600 -> "1h", 90 -> "90s".

    Raises:
        ConfigError: seconds is not a positive whole number; names `setting`.
    """
    if seconds != int(seconds) or seconds <= 0:
        raise ConfigError(
            f"{setting}: must be positive whole seconds, got {seconds!r}", setting=setting
        )
    whole = int(seconds)
    for suffix, unit in DURATION_UNITS.items():
        if whole % unit == 0:
            return f"{whole // unit}{suffix}"
    raise AssertionError("unreachable: 1 s divides every whole number")


def window_of(feature: str) -> int | None:
    """The window of a feature name written with `format_duration`'s suffix, else None.

    ``count_1h`` -> 3600, ``by_card.mean_30d`` -> 2592000, ``seconds_since_last`` -> None.
    """
    _, underscore, suffix = feature.rpartition("_")
    match = _DURATION.fullmatch(suffix) if underscore else None
    if match is None or not match.group(2) or "." in match.group(1):
        return None
    seconds = int(match.group(1)) * DURATION_UNITS[match.group(2)]
    return seconds if seconds > 0 else None


def variable_schema(entity_features: Mapping[str, frozenset[str]]) -> dict[str, Any]:
    """The names rule conditions may use: transaction fields, entity aggregates, score."""
    schema: dict[str, Any] = dict(TRANSACTION_VARIABLES)
    for entity, variable in ENTITY_VARIABLES.items():
        schema[variable] = dict.fromkeys(sorted(entity_features.get(entity, ())), "number")
    schema["score"] = "number"
    return schema
