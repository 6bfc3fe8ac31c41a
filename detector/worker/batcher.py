"""Micro-batches: items handed out when a batch is full or its oldest item has waited long enough.

The streaming pull delivers messages one at a time on the client library's thread; the
worker decides them in batches, because the state store then answers a whole batch in one
call (one Redis round trip) and verdicts go out in few Publish requests. `Batcher` sits
between the two: `put` never blocks (the subscription's flow control bounds what is held),
`get` blocks until a batch is ready.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Batcher"]

T = TypeVar("T")


class Batcher(Generic[T]):
    """Collects items into batches of at most `size`, in arrival order.

    A batch is ready when `size` items are held, or when the oldest held item arrived `wait`
    seconds ago, whichever comes first. After `close`, `put` refuses items and `get` hands out
    what is held at once (in batches of at most `size`), then empty lists.

    Thread-safe: any number of threads may `put`; one or more may `get`.
    """

    def __init__(self, size: int, wait: float, clock: Callable[[], float] = time.monotonic) -> None:
        """
        Raises:
            ValueError: size below 1 or wait negative.
        """
        if size < 1:
            raise ValueError(f"size: must be >= 1, got {size}")
        if wait < 0:
            raise ValueError(f"wait: must be >= 0 seconds, got {wait}")
        self.size = size
        self.wait = wait
        self._clock = clock
        # (arrival time, item): the deadline of the next batch is its first item's arrival.
        self._held: deque[tuple[float, T]] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._closed = False

    def __len__(self) -> int:
        return len(self._held)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> bool:
        """Hold item for the next batch; False (item not taken) once closed."""
        with self._ready:
            if self._closed:
                return False
            self._held.append((self._clock(), item))
            held = len(self._held)
            # A waiting `get` needs waking only when a deadline starts or a batch fills up.
            if held == 1 or held == self.size:
                self._ready.notify()
        return True

    def get(self, timeout: float | None = None) -> list[T]:
        """The next batch, blocking until one is ready.

        Args:
            timeout: give up after this many seconds and return [] (None: wait on).

        Returns:
            1 to `size` items; [] when closed with nothing held, or on timeout.
        """
        give_up = None if timeout is None else self._clock() + timeout
        with self._ready:
            while True:
                held = self._held
                now = self._clock()
                if len(held) >= self.size or (
                    held and (self._closed or now - held[0][0] >= self.wait)
                ):
                    count = min(len(held), self.size)
                    return [held.popleft()[1] for _ in range(count)]
                if self._closed:
                    return []
                limits = [] if not held else [held[0][0] + self.wait - now]
                if give_up is not None:
                    if now >= give_up:
                        return []
                    limits.append(give_up - now)
                self._ready.wait(min(limits) if limits else None)

    def close(self) -> None:
        """Refuse further items; wake every `get` so it hands out what is held."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def take_all(self) -> list[T]:
        """Remove and return every held item without waiting (to give them back on exit)."""
        with self._ready:
            items = [item for _, item in self._held]
            self._held.clear()
            return items
