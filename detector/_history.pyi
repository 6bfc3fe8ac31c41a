# Types of the optional C extension built from _history.c (`make native`).
from collections.abc import Sequence
from typing import Any

MAX_WINDOWS: int

class History:
    base: int
    attrs: tuple[int, ...]
    oldest: float
    newest: float
    def __init__(self, attrs: tuple[int, ...], /) -> None: ...
    def __len__(self) -> int: ...
    def position(self, ts: float, txid: str, /) -> int: ...
    def scan(
        self, index: int, ts: float, txid: str, windows: Sequence[int], labels: dict[str, bool], /
    ) -> list[tuple[int, int, float, int, int, int, int]]: ...
    def gap(self, index: int, ts: float, txid: str, lookback: float, /) -> float | None: ...
    def insert(self, index: int, record: tuple[Any, ...], /) -> None: ...
    def rebuild(self, labels: dict[str, bool], /) -> None: ...
    def trim(self, cutoff: float, /) -> None: ...
    def add_fraud(self, ts: float, txid: str, delta: int, /) -> None: ...
    def records(self) -> list[Any]: ...

class Plan:
    def __init__(
        self,
        windows: tuple[int, ...],
        keys: tuple[tuple[str | None, ...], ...],
        gap_key: str | None,
        /,
    ) -> None: ...
    def step(
        self,
        history: History,
        record: tuple[Any, ...],
        lookback: float,
        keep: float,
        longest: int,
        /,
    ) -> dict[str, float] | None: ...
