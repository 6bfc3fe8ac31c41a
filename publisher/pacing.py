"""When to send the next message: as fast as possible, at a rate, or in compressed event time.

A `Clock` seam keeps the pacers testable without sleeping for real.
"""

from __future__ import annotations

import time
from typing import Protocol

# Sleeping for less than this costs more than it saves; the pacer catches up on the next call.
_MIN_SLEEP = 0.002


class Clock(Protocol):
    """Monotonic time and sleep, as the pacers need them."""

    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class Pacer(Protocol):
    """Blocks until the message with this event time may be sent."""

    def wait(self, event_time: float) -> None: ...


class Unpaced:
    """As fast as possible."""

    def wait(self, event_time: float) -> None:
        return None


class RatePacer:
    """At most `rate` messages a second, on average since the first message."""

    def __init__(self, rate: float, clock: Clock) -> None:
        self._interval = 1.0 / rate
        self._clock = clock
        self._start: float | None = None
        self._sent = 0

    def wait(self, event_time: float) -> None:
        now = self._clock.now()
        if self._start is None:
            self._start = now
        due = self._start + self._sent * self._interval
        self._sent += 1
        if due - now > _MIN_SLEEP:
            self._clock.sleep(due - now)


class SpeedupPacer:
    """Event time compressed `speedup` times: 3600 plays an hour of traffic in a second.

    The first message goes at once; message at event time t goes (t - t0) / speedup later.
    """

    def __init__(self, speedup: float, clock: Clock) -> None:
        self._speedup = speedup
        self._clock = clock
        self._origin: tuple[float, float] | None = None

    def wait(self, event_time: float) -> None:
        now = self._clock.now()
        if self._origin is None:
            self._origin = (now, event_time)
        wall0, event0 = self._origin
        due = wall0 + (event_time - event0) / self._speedup
        if due - now > _MIN_SLEEP:
            self._clock.sleep(due - now)
