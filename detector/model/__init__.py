"""The risk model at run time: a tree ensemble read from JSON and scored, optionally in C."""

from __future__ import annotations

from detector.model.trees import (
    FORMAT,
    Factor,
    Tree,
    TreeModel,
    default_model_path,
    load_model,
    parse_model,
    vector,
    windows_of,
)

__all__ = [
    "FORMAT",
    "Factor",
    "Tree",
    "TreeModel",
    "default_model_path",
    "load_model",
    "parse_model",
    "vector",
    "windows_of",
]
