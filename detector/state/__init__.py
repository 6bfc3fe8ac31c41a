"""Per-entity stream state: the store contract, its memory and Redis stores, and the chooser.

`open_store` picks the store from the configuration; the rest of the detector sees only the
`StateStore` protocol of `detector.state.base`.
"""

from __future__ import annotations

from detector.state.base import (
    DEFAULT_WINDOWS,
    Event,
    Features,
    LabelOutcome,
    StateConfig,
    StateStore,
    feature_names,
    window_name,
)
from detector.state.memory import NATIVE_HISTORIES, MemoryStore

__all__ = [
    "DEFAULT_WINDOWS",
    "NATIVE_HISTORIES",
    "Event",
    "Features",
    "LabelOutcome",
    "MemoryStore",
    "StateConfig",
    "StateStore",
    "feature_names",
    "open_store",
    "window_name",
]


def open_store(config: StateConfig, redis_url: str | None) -> StateStore:
    """The configured store: Redis when redis_url is set, else process memory.

    Connections open on first use, so this is safe to call before a fork.

    Raises:
        StateConfigError: redis_url is not a Redis URL.
    """
    if redis_url is None:
        return MemoryStore(config)
    # Imported here: redis-py and the store's scripts cost cold-start time that a function
    # with state in memory never needs (BENCHMARKS.md, "Cold start").
    from detector.state.redis_store import RedisStore

    return RedisStore(config, redis_url)
