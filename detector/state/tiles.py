"""Tiled windows: every window aggregate from time tiles of mergeable values.

The exact stores (`detector.state.memory`, `detector.state.redis_store`) keep each entity's
transactions and scan them; their cost grows with an entity's history. Here an entity keeps
time tiles instead, as feature stores do (Feast's tiles, Chronon's sawtooth windows): each
tile holds the count, amount sum, amount max and fraud count of the transactions in it, so a
window costs a bounded number of tile reads whatever the entity's volume. This module holds
the definition; `detector.state.memory_tiled` implements it in process memory and
`detector.state.redis_tiled` in Redis (single node or cluster), both checked against a
brute-force reading of this text in `tests/state/test_tiled.py`. It is the default
(`StateConfig.tiled`); the exact stores remain for models trained on exact windows.

Definition. Features are those of `detector.state.base` (`feature_names`), built by the same
`FeatureBuilder` from raw window aggregates; only what a window holds differs.

- Tile width. A window of W seconds is read in tiles of `tile_width(W)` seconds: an hour for
  windows of a day and longer (whole hours), a minute for windows of ten minutes and longer
  (whole minutes), else a second. Tile i of width g covers event times [i*g, (i+1)*g).
- Window. For a transaction x at time t, a window of W = n*g seconds holds the tiles
  k-n < i <= k, where k = floor(t/g): it ends with the tile of t (exact to the tile at its
  old edge: 1-hour windows to the minute, day-and-longer windows to the hour). It holds the
  transactions the entity recorded in those tiles by the time of the call, whatever their
  order within the tile of t.
- Redelivery. When the entity already holds x's id, x is decided at the timestamp the
  entity recorded it with, whatever the redelivery carries (a client that stamps each retry
  anew), and x's own amount is taken out of count, sum and fraud count; max and distinct
  counts may still include it.
- count, sum (integer micros), max, fraud count: of the window's transactions. A label
  counts in the tile of its transaction's time.
- Distinct counts: a value of an attribute (terminal, merchant, country) counts when its
  newest tile of width g (the latest tile of a recorded transaction of the entity with that
  value) is after k-n, so a value also seen later than x (a late x) counts too.
- seconds_since_last: t minus the timestamp of the greatest recorded (timestamp,
  transaction_id) strictly before x's, looked for among the entity's `RING` greatest; absent
  when there is none or it is ``retention - allowed_lateness`` or more before t.
- Lateness, per entity: x is recorded for an entity unless the entity holds its id or t is
  more than ``allowed_lateness`` behind the entity's newest timestamp N (then scored only).
- Forgetting, per entity: tiles of width g before floor((N - keep_g)/g) are forgotten, where
  keep_g is the longest window read in that width plus ``allowed_lateness``, and no window
  reads them (a transaction far too late sees only what is kept). An id is held while its
  timestamp is within ``retention`` of N, so redeliveries count once for that long (30 days
  and an hour by default, beyond Pub/Sub's 7-day retention).
- Labels, as in `detector.state.base`: a label names a transaction_id; through an index of
  ids (kept for the retention) it reaches each entity that holds the transaction and moves
  the fraud count of the transaction's tiles.

Cost. An entity keeps per tile width at most keep_g/g tiles, one newest tile per width for
each distinct attribute value, `RING` recent timestamps and its ids for the retention. Each
window keeps running sums for the tile it last ended at; a transaction moves them by the
tiles that enter or leave, so its cost is bounded by the tiles and not by the entity's
transactions (a max whose tile left is found again over the window's tiles).
"""

from __future__ import annotations

from typing import Final

from detector.state.base import StateConfig
from detector.vocabulary import DAY, HOUR, MINUTE

__all__ = ["RING", "levels", "tile_width"]

#: How many of an entity's greatest (timestamp, transaction_id) seconds_since_last looks among.
RING: Final = 8


def tile_width(window: int) -> int:
    """Seconds per tile of a window: an hour from a day up, a minute from ten minutes up."""
    if window >= DAY and window % HOUR == 0:
        return HOUR
    if window >= 10 * MINUTE and window % MINUTE == 0:
        return MINUTE
    return 1


def levels(config: StateConfig) -> list[tuple[int, float]]:
    """The tile widths a configuration's windows use, finest first, each with keep_g: how
    far behind an entity's newest its tiles are kept (longest window of the width + lateness).
    """
    by_width: dict[int, list[int]] = {}
    for window in config.windows:
        by_width.setdefault(tile_width(window), []).append(window)
    return [
        (width, max(windows) + config.allowed_lateness)
        for width, windows in sorted(by_width.items())
    ]
