"""Declarative rules: CEL conditions in YAML, checked and compiled once, then evaluated."""

from __future__ import annotations

from detector.rules.compiler import Schema
from detector.rules.ruleset import (
    ACTIONS,
    Evaluation,
    Hit,
    Rule,
    Ruleset,
    default_ruleset_path,
    load_ruleset,
    parse_ruleset,
)

__all__ = [
    "ACTIONS",
    "Evaluation",
    "Hit",
    "Rule",
    "Ruleset",
    "Schema",
    "default_ruleset_path",
    "load_ruleset",
    "parse_ruleset",
]
