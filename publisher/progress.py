"""A one-line progress display with rate and ETA, on a terminal only.

Written here rather than pulling in tqdm or rich: it is thirty lines, and the publisher must
stay silent when its output is not a terminal (scripts, CI), which this checks once.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts messages and redraws `label: n/total  rate/s  ETA` at most 5 times a second."""

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty()
        self._label = label
        self._total = total
        self._count = 0
        self._start = time.monotonic()
        self._drawn = 0.0
        self._extra = ""

    def update(self, count: int, extra: str = "") -> None:
        """Record that `count` items are done; redraw if enough time has passed."""
        self._count = count
        self._extra = extra
        if self._total is not None and count > self._total:
            self._total = count  # the total was an estimate
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn >= 0.2:
            self._drawn = now
            self._draw(now)

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self._count / elapsed
        done = f"{self._count:,}"
        eta = ""
        if self._total:
            done += f"/{self._total:,} ({100 * self._count / self._total:.0f}%)"
            if rate > 0 and self._count < self._total:
                eta = f"  ETA {_clock((self._total - self._count) / rate)}"
        line = f"{self._label}: {done}  {rate:,.0f}/s  {_clock(elapsed)}{eta}{self._extra}"
        self._stream.write("\r" + line + "\033[K")
        self._stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
