"""Ground truth for offline tools: label files, and labels injected when they become known.

A label of a transaction at event time t becomes known at t + delay (chargebacks arrive
late); replay and training inject it then, as the feedback function would have recorded it.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, TypeVar

import orjson

from detector.errors import InputError

__all__ = ["KnownLabel", "Timed", "merge_labels", "parse_time", "read_labels"]

T = TypeVar("T")


def parse_time(text: str) -> datetime:
    """A date (YYYY-MM-DD, midnight UTC) or an RFC 3339 date-time.

    Raises:
        InputError: neither.
    """
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"expected a date YYYY-MM-DD or an RFC 3339 time, got {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def read_labels(path: Path) -> dict[str, bool]:
    """Labels by transaction_id from a JSON-lines file of {"transaction_id", "is_fraud"}.

    Raises:
        InputError: the file cannot be read, or a line is not a label (names the line).
    """
    labels: dict[str, bool] = {}
    try:
        with path.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    item = orjson.loads(line)
                except orjson.JSONDecodeError:
                    raise InputError(f"{path}:{number}: not a JSON object") from None
                tid = item.get("transaction_id") if isinstance(item, dict) else None
                fraud = item.get("is_fraud") if isinstance(item, dict) else None
                if not isinstance(tid, str) or not tid or not isinstance(fraud, bool):
                    raise InputError(
                        f"{path}:{number}: a label needs a transaction_id string and an "
                        f"is_fraud boolean, got {line[:120]!r}"
                    )
                labels[tid] = fraud
    except OSError as error:
        raise InputError(f"--labels: cannot read {str(path)!r} ({error.strerror})") from None
    return labels


@dataclass(frozen=True, slots=True)
class KnownLabel:
    """A label at the moment it becomes known (transaction time + delay)."""

    transaction_id: str
    is_fraud: bool
    known_at: float


@dataclass(frozen=True, slots=True)
class Timed(Generic[T]):
    """A stream item at its event time (epoch seconds)."""

    time: float
    transaction_id: str
    item: T


def merge_labels(
    stream: Iterable[Timed[T]], labels: Mapping[str, bool], delay: float
) -> Iterator[Timed[T] | KnownLabel]:
    """Interleave labels with the transactions they label, at the moment they become known.

    The label of a transaction at time t becomes known at t + delay and is yielded just
    before the first transaction at or after that moment; labels never known before the
    stream ends are not yielded (nothing would see them). Replay and training both use this,
    so a model learns from exactly the fraud counts that live scoring sees.
    """
    pending: list[tuple[float, int, str, bool]] = []
    sequence = 0
    for timed in stream:
        while pending and pending[0][0] <= timed.time:
            known_at, _, tid, fraud = heapq.heappop(pending)
            yield KnownLabel(tid, fraud, known_at)
        yield timed
        label = labels.get(timed.transaction_id)
        if label is not None:
            heapq.heappush(pending, (timed.time + delay, sequence, timed.transaction_id, label))
            sequence += 1
