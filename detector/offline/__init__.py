"""Offline tools over recorded streams: replay (backtest), parallel shards, training, metrics."""

from __future__ import annotations

__all__ = ["commands", "evaluate", "labels", "parallel", "replay", "train"]
