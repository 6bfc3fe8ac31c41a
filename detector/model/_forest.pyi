# Types of the optional C extension built from _forest.c (`make native`).
from collections.abc import Sequence

class Forest:
    def __init__(
        self,
        n_features: int,
        feature: Sequence[int],
        threshold: Sequence[float],
        left: Sequence[int],
        right: Sequence[int],
        roots: Sequence[int],
        add_start: Sequence[int],
        add_feature: Sequence[int],
        add_credit: Sequence[float],
        /,
    ) -> None: ...
    def walk(
        self, values: tuple[float, ...], k: int, /
    ) -> tuple[tuple[float, ...], tuple[int, ...]]: ...
