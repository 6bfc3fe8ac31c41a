"""What the worker did per logging interval: messages, batches, lag and errors, as log fields.

No payload and no identifier goes in: one line per interval says how the worker keeps up,
not what it decided.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Stats", "percentile"]

#: Lag samples kept per interval; beyond it a uniform sample (reservoir) of them is kept.
SAMPLES = 20_000


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) of values, nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class Stats:
    """Counters of one interval, reset by each `interval()`; thread-safe.

    Attributes:
        total_acked: messages acked since start (never reset), transactions and labels.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, seed: int = 0) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.total_acked = 0
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self._started = now
        self._verdicts = 0
        self._dead_letters = 0
        self._labels = 0
        self._batches = 0
        self._batched = 0
        self._redelivered = 0
        self._errors = 0
        self._lags: list[float] = []
        self._seen_lags = 0

    def batch(self, size: int) -> None:
        """A batch of `size` transactions was taken for deciding."""
        with self._lock:
            self._batches += 1
            self._batched += size

    def acked(self, verdicts: int, dead_letters: int, lags: Iterable[float]) -> None:
        """Messages acked after their verdicts or dead letters were published; lags in seconds."""
        with self._lock:
            self._verdicts += verdicts
            self._dead_letters += dead_letters
            self.total_acked += verdicts + dead_letters
            for lag in lags:
                self._seen_lags += 1
                if len(self._lags) < SAMPLES:
                    self._lags.append(lag)
                else:
                    slot = self._random.randrange(self._seen_lags)
                    if slot < SAMPLES:
                        self._lags[slot] = lag

    def label(self) -> None:
        """A label was recorded (or dead-lettered) and acked."""
        with self._lock:
            self._labels += 1
            self.total_acked += 1

    def failed(self, count: int) -> None:
        """A transient failure: `count` messages nacked, to be delivered again."""
        with self._lock:
            self._errors += 1
            self._redelivered += count

    def interval(self) -> dict[str, Any]:
        """The fields of the interval since the last call, and start a new one."""
        with self._lock:
            now = self._clock()
            seconds = max(now - self._started, 1e-9)
            messages = self._verdicts + self._dead_letters
            fields = {
                "interval_s": round(seconds, 3),
                "messages_per_s": round(messages / seconds, 1),
                "verdicts": self._verdicts,
                "dead_letters": self._dead_letters,
                "labels": self._labels,
                "batches": self._batches,
                "mean_batch_size": round(self._batched / self._batches, 1)
                if self._batches
                else 0.0,
                "lag_p50_ms": _ms(percentile(self._lags, 50)),
                "lag_p99_ms": _ms(percentile(self._lags, 99)),
                "errors": self._errors,
                "nacked": self._redelivered,
            }
            self._reset(now)
            return fields


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
