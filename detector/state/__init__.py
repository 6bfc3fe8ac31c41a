"""Per-entity stream state: the store contract, its memory and Redis stores, and the chooser.

`open_store` picks the store from the configuration (tiled or exact windows, memory or
Redis); the rest of the detector sees only the `StateStore` protocol of `detector.state.base`.
"""

from __future__ import annotations

from detector.state.base import (
    DEFAULT_WINDOWS,
    Event,
    Features,
    LabelOutcome,
    LabelPlace,
    StateConfig,
    StateStore,
    feature_names,
    window_name,
)
from detector.state.memory import NATIVE_HISTORIES, MemoryStore
from detector.state.memory_tiled import TiledMemoryStore

__all__ = [
    "DEFAULT_WINDOWS",
    "NATIVE_HISTORIES",
    "Event",
    "Features",
    "LabelOutcome",
    "LabelPlace",
    "MemoryStore",
    "StateConfig",
    "StateStore",
    "TiledMemoryStore",
    "feature_names",
    "memory_store",
    "open_store",
    "window_name",
]


def memory_store(config: StateConfig) -> MemoryStore | TiledMemoryStore:
    """A fresh store in this process's memory with the configuration's windows."""
    return TiledMemoryStore(config) if config.tiled else MemoryStore(config)


def open_store(config: StateConfig, redis_url: str | None, *, prefix: str = "fraud:") -> StateStore:
    """The configured store: Redis when redis_url is set (its keys under `prefix`), else
    process memory; tiled unless the configuration says otherwise.

    Connections open on first use, so this is safe to call before a fork.

    Raises:
        StateConfigError: redis_url is not a Redis URL.
    """
    if redis_url is None:
        return memory_store(config)
    # Imported here: redis-py and the store's scripts cost cold-start time that a function
    # with state in memory never needs (BENCHMARKS.md, "Cold start").
    if config.tiled:
        from detector.state.redis_tiled import RedisTiledStore

        return RedisTiledStore(config, redis_url, prefix=prefix)
    from detector.state.redis_store import RedisStore

    return RedisStore(config, redis_url, prefix=prefix)
