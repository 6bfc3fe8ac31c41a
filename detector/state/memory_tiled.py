"""The tiled state store in process memory: the definition of `detector.state.tiles`.

The twin of `detector.state.redis_tiled`, step for step: an entity keeps time tiles per tile
width and, per window, running sums that a transaction moves by the tiles entering or leaving
it, so its cost is bounded by the tiles and not by the entity's transactions. Both are checked
against the same brute-force reading of the definition (`tests/state/test_tiled.py`) and give
the same features to the bit.

Forgetting: an entity's tiles, ids and attribute values go as the definition lets them, each
time it records; an idle entity goes whole once its newest is more than ``retention`` behind
the median event time of the latest transactions recorded (as in `detector.state.memory`), and
so does the label index's entry of a transaction no entity holds any more.

Entities are C structs (`detector.state._tiles`, the same steps on the same state) where
`make native` built the extension, else the Python `_Entity` below; the property test runs
both against the reference. The C entities also build the feature dicts, which is most of the
difference: a transaction of three entities costs about a tenth of the Python path.
"""

from __future__ import annotations

import logging
import math
import threading
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

from detector.state import base
from detector.state.base import (
    DISTINCT,
    DISTINCT_FEATURE,
    Event,
    FeatureBuilder,
    Features,
    LabelOutcome,
    Raw,
    StateConfig,
    select,
    window_name,
)
from detector.state.tiles import RING, levels, tile_width

try:  # the C entities (`make native`); without them, the same in Python
    import detector.state._tiles as _tiles
except ImportError:  # pragma: no cover - exercised where the extension is not built
    _tiles = None

__all__ = ["NATIVE_TILES", "TiledMemoryStore"]

log = logging.getLogger(__name__)

#: Entities (or label index entries) the forgetting visits per recorded transaction.
SWEEP_SLICE = 512

#: How many of the latest recorded event times the forgetting clock is the median of.
_CLOCK_SAMPLE = 63

_NEG: Final = -math.inf

#: Whether `make native` built the C entities in this process's package.
NATIVE_TILES: Final = _tiles is not None

#: The largest amount in micros (either sign) that C entities hold (64-bit integers).
_MICROS_MAX = 2**63 - 1

#: A C entity's status of a transaction it holds already (0: recorded, 2: too late).
_DUP = 1

#: The entity kinds an `Event` names, in the order of its fields (`_tiles.observe`'s order).
_KINDS = ("customer", "card", "terminal", "merchant")

#: The label index's entry of a transaction: its timestamp and the id of each of its
#: entities in `_KINDS` order (None where it names none). A flat tuple costs a third of a list
#: of (kind, id) pairs, and C entities hand over their own copy of each id.
_IndexEntry = tuple[float, str | None, str | None, str | None, str | None]

# A tile: [count, sum in micros, max amount, fraud count, and the number of terminals,
# merchants and countries whose newest tile it is].
# A window's running sums: [end tile, valid, count, sum, fraud, max, max valid, and the
# distinct sums of the values whose newest tile is after the window's start].
_K, _VALID, _COUNT, _SUM, _FRAUD, _MAX, _MAX_OK = range(7)

#: Each attribute's slot in a tile (after its first four fields) and its key letter.
_SLOTS = {"terminal": (0, "t"), "merchant": (1, "m"), "country": (2, "c")}


class _Entity:
    """One entity's tiles, window sums, ring of recent transactions, ids and values."""

    __slots__ = (
        "caches",
        "ids",
        "newest",
        "order",
        "recent_ids",
        "recent_values",
        "ring",
        "tiles",
        "values",
    )

    def __init__(self, nlev: int, nwin: int) -> None:
        self.newest: float | None = None
        #: Per level, tile index -> tile, and the kept indexes in ascending order.
        self.tiles: list[dict[int, list[float]]] = [{} for _ in range(nlev)]
        self.order: list[list[int]] = [[] for _ in range(nlev)]
        self.caches: list[list[float]] = [_empty_cache() for _ in range(nwin)]
        #: The `RING` greatest (timestamp, transaction_id) recorded, ascending.
        self.ring: list[tuple[float, str]] = []
        #: transaction_id -> [timestamp, micros, label (-1 none, 0, 1)], and the order in
        #: which they were recorded, to forget from the front.
        self.ids: dict[str, list[float]] = {}
        self.recent_ids: deque[tuple[float, str]] = deque()
        #: Attribute value (letter + value) -> its newest tile per level, then the newest
        #: timestamp that moved it; and the order in which they moved.
        self.values: dict[str, list[float]] = {}
        self.recent_values: deque[tuple[float, str]] = deque()


def _empty_cache() -> list[float]:
    return [0, 0, 0, 0, 0, _NEG, 1, 0, 0, 0]


def _span(order: list[int], low: float, high: float) -> list[int]:
    """The kept tile indexes i with low < i <= high."""
    return order[bisect_right(order, low) : bisect_right(order, high)]


def _take(
    c: list[float], tiles: dict[int, list[float]], span: list[int], sign: int, distinct: bool
) -> None:
    """Add (sign 1) or take out (-1) tiles from a window's sums; the distinct sums too when
    `distinct`. A max that leaves marks the window's max invalid."""
    for i in span:
        t = tiles.get(i)
        if t is None:
            continue
        c[2] += sign * t[0]
        c[3] += sign * t[1]
        c[4] += sign * t[3]
        if sign > 0:
            if t[2] > c[5]:
                c[5] = t[2]
        elif t[2] >= c[5]:
            c[6] = 0
        if distinct:
            c[7] += sign * t[4]
            c[8] += sign * t[5]
            c[9] += sign * t[6]


def _pairs(entry: _IndexEntry) -> list[tuple[str, str]]:
    """The (kind, id) of each entity an index entry names."""
    return [
        (kind, ident) for kind, ident in zip(_KINDS, entry[1:], strict=True) if ident is not None
    ]


class TiledMemoryStore:
    """Tiled window state in this process's memory (see the module doc).

    Calls are serialized by a lock (functions-framework serves requests from several threads).
    """

    def __init__(self, config: StateConfig | None = None, *, native: bool = True) -> None:
        """Entities are C structs where the extension is built and `native` is not False,
        else Python objects (as in a Cloud Functions upload); the results are the same.
        `native` says which. An amount beyond 9.2 trillion (its micros past 64 bits) or an
        event time beyond `_tiles.MAX_TIME` moves the store to Python for good."""
        self.config = config = config or StateConfig()
        self._builder = FeatureBuilder(config.windows)
        self._levels = levels(config)
        level_of = {width: level for level, (width, _) in enumerate(self._levels)}
        #: Per window: its level and its length in tiles.
        self._wl = [level_of[tile_width(window)] for window in config.windows]
        self._wn = [window // tile_width(window) for window in config.windows]
        self._keep = config.keep
        self._lateness = config.allowed_lateness
        self._lookback = config.keep - config.allowed_lateness
        # A value whose newest timestamp is this far behind its entity's newest is before
        # every level's kept tiles: as good as never seen.
        self._value_keep = max(keep for _, keep in self._levels) + self._levels[-1][0]
        self.native = (
            native
            and _tiles is not None
            and len(self._wl) <= _tiles.MAX_WINDOWS
            and len(self._levels) <= _tiles.MAX_LEVELS
        )
        self._layout: Any = None
        if self.native:
            self._layout = _tiles.Layout(
                tuple(float(width) for width, _ in self._levels),
                tuple(float(keep) for _, keep in self._levels),
                tuple(self._wl),
                tuple(self._wn),
                self._keep,
                self._lateness,
                self._lookback,
                self._value_keep,
            )
        #: Per `needed`, the C plan of each kind (what its feature dicts hold).
        self._plans: dict[frozenset[str] | None, tuple[Any, ...]] = {}
        #: Per kind, id -> entity: an `_Entity`, or a `_tiles.Entity` when native.
        self._entities: dict[str, dict[str, Any]] = {kind: {} for kind in DISTINCT}
        self._maps = tuple(self._entities[kind] for kind in _KINDS)
        #: transaction_id -> (timestamp, the entities it named), for labels.
        #: Tuples, not lists: the cyclic garbage collector untracks tuples of strings and
        #: numbers, and would otherwise rescan every entry over and over.
        self._index: dict[str, _IndexEntry] = {}
        self._reads: dict[str, frozenset[str] | None] | None = None
        self._recent: deque[float] = deque(maxlen=_CLOCK_SAMPLE)
        self._sweep_every = max(self._keep / 8, 60.0)
        self._next_sweep = _NEG
        self._sweeper: Iterator[None] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Number of transactions in the label index."""
        return len(self._index)

    @property
    def entity_count(self) -> int:
        """Number of entities with state in memory."""
        return sum(len(entities) for entities in self._entities.values())

    def declare_reads(self, reads: Mapping[str, frozenset[str] | None]) -> None:
        """Return per kind only what is read (see `detector.state.base.wanted`)."""
        with self._lock:
            self._reads = dict(reads)
            self._plans.clear()

    def observe(self, event: Event, needed: frozenset[str] | None = None) -> Features:
        """See `StateStore.observe`."""
        with self._lock:
            return self._observe(event, needed)

    def observe_many(
        self, events: Sequence[Event], needed: frozenset[str] | None = None
    ) -> list[Features]:
        """See `StateStore.observe_many`."""
        with self._lock:
            return [self._observe(event, needed) for event in events]

    def _plan(self, needed: frozenset[str] | None) -> tuple[Any, ...]:
        """The C plan of each kind for `needed` (in `_KINDS` order): the names `select`
        would keep, in order."""
        assert _tiles is not None
        plans = {}
        for kind, attrs in DISTINCT.items():
            wanted = base.wanted(self._reads, kind, needed)
            keys = []
            for window in self.config.windows:
                s = window_name(window)
                names = [f"{name}_{s}" for name in base.WINDOW_AGGREGATES]
                for attr in _SLOTS:
                    names.append(f"{DISTINCT_FEATURE[attr]}_{s}" if attr in attrs else "")
                keys.append(
                    tuple(n if n and (wanted is None or n in wanted) else None for n in names)
                )
            gap = "seconds_since_last"
            plans[kind] = _tiles.Plan(
                tuple(_SLOTS[attr][0] for attr in attrs),
                tuple(keys),
                gap if wanted is None or gap in wanted else None,
            )
        ordered = tuple(plans[kind] for kind in _KINDS)
        if len(self._plans) < 64:
            self._plans[needed] = ordered
        return ordered

    def _to_python(self) -> None:
        """Move every entity to Python, for good (amounts or times C entities cannot hold)."""
        log.warning(
            "an amount beyond 64-bit micros or an event time beyond %g s: the tiled memory "
            "store continues in Python",
            _tiles.MAX_TIME if _tiles is not None else math.inf,
        )
        for entities in self._entities.values():
            for ident, native in entities.items():
                e = _Entity(len(self._levels), len(self._wl))
                (
                    e.newest,
                    e.tiles,
                    e.order,
                    e.caches,
                    e.ring,
                    e.ids,
                    recent_ids,
                    e.values,
                    recent_values,
                ) = native.export()
                e.recent_ids = deque(recent_ids)
                e.recent_values = deque(recent_values)
                entities[ident] = e
        self.native = False
        self._plans.clear()

    def _observe(self, event: Event, needed: frozenset[str] | None) -> Features:
        ts = event.timestamp
        txid = event.transaction_id
        amount = event.amount
        micro = base.micros(amount)
        if self.native:
            assert _tiles is not None
            if (micro > _MICROS_MAX or micro < -_MICROS_MAX) or (
                math.isfinite(ts) and abs(ts) > _tiles.MAX_TIME
            ):
                self._to_python()
        features: Features
        duplicate: list[str] = []
        late: list[tuple[str, float]] = []
        if self.native:
            assert _tiles is not None
            plans = self._plans.get(needed) or self._plan(needed)
            features, entry, recorded, notes = _tiles.observe(
                self._layout, _KINDS, self._maps, plans, event, micro
            )
            for kind, status, behind in notes or ():
                if status == _DUP:
                    duplicate.append(kind)
                else:
                    late.append((kind, behind))
            self._finish(txid, entry, duplicate, late, recorded)
            return features
        features = {}
        recorded = False
        pairs = base.entities_of(event)
        kk = self._tiles_of(ts)
        for kind, ident in pairs:
            entities = self._entities[kind]
            entity = entities.get(ident)
            if entity is None:
                entity = entities[ident] = _Entity(len(self._levels), len(self._wl))
            attrs = []
            for attr in DISTINCT[kind]:
                value = getattr(event, attr)
                if value is not None:
                    slot, letter = _SLOTS[attr]
                    attrs.append((slot, letter + value))
            status, raws, gap = self._step(entity, txid, ts, micro, amount, kk, attrs)
            if status == "dup":
                duplicate.append(kind)
            elif status == "late":
                assert entity.newest is not None
                late.append((kind, entity.newest - ts))
            else:
                recorded = True
            out = self._builder.build(kind, amount, raws, gap)
            features[kind] = select(out, base.wanted(self._reads, kind, needed))
        self._finish(
            txid,
            (ts, event.customer, event.card, event.terminal, event.merchant),
            duplicate,
            late,
            recorded,
        )
        return features

    def _finish(
        self,
        txid: str,
        entry: _IndexEntry,
        duplicate: list[str],
        late: list[tuple[str, float]],
        recorded: bool,
    ) -> None:
        """Index the transaction for labels, say what was not recorded, tick the clock."""
        self._index[txid] = entry
        ts = entry[0]
        if duplicate:
            log.info(
                "transaction %s already recorded for %s: scored, not counted again",
                txid,
                ", ".join(duplicate),
            )
        for kind, behind in late:
            log.warning(
                "transaction %s is %.0f s behind the newest of its %s (allowed lateness "
                "%.0f s): scored, not recorded for it",
                txid,
                behind,
                kind,
                self._lateness,
            )
        if recorded:
            self._tick(ts)

    def _tiles_of(self, ts: float) -> list[int]:
        """The index of the tile holding a timestamp, per level."""
        return [math.floor(ts / width) for width, _ in self._levels]

    def _step(
        self,
        e: _Entity,
        txid: str,
        ts: float,
        micro: int,
        amount: float,
        kk: list[int],
        attrs: list[tuple[int, str]],
    ) -> tuple[str, list[Raw], float | None]:
        """One entity's features of a transaction, recording it when it is new."""
        levels, wl, wn = self._levels, self._wl, self._wn
        newest = e.newest
        late = newest is not None and ts < newest - self._lateness
        held = e.ids.get(txid)
        if held is not None and (newest is None or not held[0] > newest - self._keep):
            held = None
        status = "dup" if held is not None else "late" if late else "new"
        if held is not None and held[0] != ts:
            # A redelivery is decided at the timestamp it was recorded with, whatever its own.
            ts = held[0]
            kk = self._tiles_of(ts)
        next_newest = newest
        if status == "new" and (newest is None or ts > newest):
            next_newest = ts
        forgotten = [
            _NEG if newest is None else math.floor((newest - keep) / width)
            for width, keep in levels
        ]
        # Move every window's sums to the transaction's tile (on copies unless it is new).
        caches = e.caches if status == "new" else [list(c) for c in e.caches]
        for w, c in enumerate(caches):
            level, n = wl[w], wn[w]
            k = kk[level]
            tiles, order = e.tiles[level], e.order[level]
            if c[_VALID] != 1 or abs(k - c[_K]) >= n:
                c[:] = [k, 1, 0, 0, 0, _NEG, 1, 0, 0, 0]
                _take(c, tiles, _span(order, k - n, k), 1, True)
                for i in _span(order, k, math.inf):
                    t = tiles[i]
                    c[7] += t[4]
                    c[8] += t[5]
                    c[9] += t[6]
                continue
            if k > c[_K]:
                _take(c, tiles, _span(order, c[_K] - n, k - n), -1, True)
                _take(c, tiles, _span(order, c[_K], k), 1, False)
            elif k < c[_K]:
                _take(c, tiles, _span(order, k, c[_K]), -1, False)
                _take(c, tiles, _span(order, k - n, c[_K] - n), 1, True)
            c[_K] = k
            if c[_MAX_OK] == 0:  # the max left: find it again over the window's tiles
                high = _NEG
                for i in _span(order, k - n, k):
                    if tiles[i][2] > high:
                        high = tiles[i][2]
                c[_MAX], c[_MAX_OK] = high, 1
        raws: list[Raw] = []
        for w, c in enumerate(caches):
            count, total, fraud = c[_COUNT], c[_SUM], c[_FRAUD]
            if held is not None and kk[wl[w]] >= forgotten[wl[w]]:
                count -= 1
                total -= held[1]
                fraud -= held[2] == 1
            raws.append(
                (int(count), int(total), c[_MAX], int(fraud), int(c[7]), int(c[8]), int(c[9]))
            )
        ring = e.ring
        pos = bisect_left(ring, (ts, txid))
        gap = None
        if pos and ring[pos - 1][0] > ts - self._lookback:
            gap = ts - ring[pos - 1][0]
        if status == "new":
            assert next_newest is not None
            self._record(e, txid, ts, micro, amount, kk, attrs, next_newest)
        return status, raws, gap

    def _record(
        self,
        e: _Entity,
        txid: str,
        ts: float,
        micro: int,
        amount: float,
        kk: list[int],
        attrs: list[tuple[int, str]],
        newest: float,
    ) -> None:
        """Record a new transaction whose windows' sums are at its tiles: forget what the
        new newest lets go, then add it to its tiles, sums, values, ring and ids."""
        levels, wl, wn = self._levels, self._wl, self._wn
        horizon = [math.floor((newest - keep) / width) for width, keep in levels]
        for level, order in enumerate(e.order):
            cut = bisect_left(order, horizon[level])
            if cut:
                tiles = e.tiles[level]
                for i in order[:cut]:
                    del tiles[i]
                del order[:cut]
        for w, c in enumerate(e.caches):
            if c[_VALID] == 1 and c[_K] - wn[w] + 1 < horizon[wl[w]]:
                c[_VALID] = 0
        for level, j in enumerate(kk):
            tiles = e.tiles[level]
            t = tiles.get(j)
            if t is None:
                t = tiles[j] = [0, 0, _NEG, 0, 0, 0, 0]
                insort(e.order[level], j)
            t[0] += 1
            t[1] += micro
            if amount > t[2]:
                t[2] = amount
        for w, c in enumerate(e.caches):
            j = kk[wl[w]]
            if c[_VALID] == 1 and c[_K] - wn[w] < j <= c[_K]:
                c[_COUNT] += 1
                c[_SUM] += micro
                if amount > c[_MAX]:
                    c[_MAX] = amount
        # A value counts in its newest tile per level: move its count there.
        for slot, key in attrs:
            rec = e.values.get(key)
            moved = False
            for level, j in enumerate(kk):
                o = None if rec is None else int(rec[level])
                if o is not None and j <= o:
                    continue
                moved = True
                tiles = e.tiles[level]
                tiles[j][4 + slot] += 1
                old = tiles.get(o) if o is not None and o >= horizon[level] else None
                if old is not None:
                    old[4 + slot] -= 1
                for w, c in enumerate(e.caches):
                    if wl[w] == level and c[_VALID] == 1:
                        edge = c[_K] - wn[w]
                        if j > edge:
                            c[7 + slot] += 1
                        if old is not None and o is not None and o > edge:
                            c[7 + slot] -= 1
            if moved:
                if rec is None:
                    rec = e.values[key] = [*kk, ts]
                else:
                    for level, j in enumerate(kk):
                        if j > rec[level]:
                            rec[level] = j
                    if ts > rec[-1]:
                        rec[-1] = ts
                e.recent_values.append((rec[-1], key))
        values, recent_values = e.values, e.recent_values
        cutoff = newest - self._value_keep
        while recent_values and recent_values[0][0] <= cutoff:
            stamp, key = recent_values.popleft()
            rec = values.get(key)
            if rec is not None and rec[-1] == stamp:
                del values[key]
        insort(e.ring, (ts, txid))
        if len(e.ring) > RING:
            del e.ring[0]
        e.ids[txid] = [ts, micro, -1]
        e.recent_ids.append((ts, txid))
        ids, recent_ids = e.ids, e.recent_ids
        cutoff = newest - self._keep
        while recent_ids and recent_ids[0][0] <= cutoff:
            stamp, old_id = recent_ids.popleft()
            row = ids.get(old_id)
            if row is not None and row[0] == stamp:
                del ids[old_id]
        e.newest = newest

    def _tick(self, ts: float) -> None:
        """Advance the forgetting clock by a recorded timestamp, and forget a slice."""
        recent = self._recent
        recent.append(ts)
        if ts >= self._next_sweep:
            clock = sorted(recent)[(len(recent) - 1) // 2]
            if clock >= self._next_sweep:
                for _ in self._sweeper or ():
                    pass  # finish the previous pass before starting another
                self._next_sweep = clock + self._sweep_every
                self._sweeper = self._sweep(clock)
        if self._sweeper is not None and next(self._sweeper, StopIteration) is StopIteration:
            self._sweeper = None

    def _sweep(self, clock: float) -> Iterator[None]:
        """Forget entities idle for the retention before `clock`, and the label index's
        entries of transactions no entity holds, `SWEEP_SLICE` at a time."""
        idle = clock - self._keep
        for entities in self._entities.values():
            keys = list(entities)
            for start in range(0, len(keys), SWEEP_SLICE):
                for key in keys[start : start + SWEEP_SLICE]:
                    entity = entities.get(key)
                    if entity is not None and (entity.newest is None or entity.newest <= idle):
                        del entities[key]
                yield
        # The index is walked whole rather than kept in a queue of arrivals as well (a tuple
        # per transaction): an entry no entity holds stays unheld until the transaction is
        # observed again, which rewrites it, so when it goes changes nothing.
        index = self._index
        txids = list(index)
        for start in range(0, len(txids), SWEEP_SLICE):
            for txid in txids[start : start + SWEEP_SLICE]:
                entry = index.get(txid)
                if (
                    entry is not None
                    and entry[0] <= idle
                    and not any(
                        ident is not None and self._holds(kind, ident, txid)
                        for kind, ident in zip(_KINDS, entry[1:], strict=True)
                    )
                ):
                    del index[txid]
            yield

    def _holds(self, kind: str, ident: str, txid: str) -> bool:
        """Whether the entity still holds a transaction."""
        if self.native:
            entity = self._entities[kind].get(ident)
            return entity is not None and bool(entity.holds(txid))
        return self._held(kind, ident, txid) is not None

    def _held(self, kind: str, ident: str, txid: str) -> list[float] | None:
        """The Python entity's row of a transaction it still holds."""
        entity: _Entity | None = self._entities[kind].get(ident)
        if entity is None or entity.newest is None:
            return None
        row = entity.ids.get(txid)
        if row is None or not row[0] > entity.newest - self._keep:
            return None
        return row

    def observe_labelled(
        self,
        events: Sequence[Event],
        labels: Sequence[base.Label],
        needed: frozenset[str] | None = None,
    ) -> tuple[list[Features], list[LabelOutcome]]:
        """See `StateStore.observe_labelled`: `observe_many` and `record_label` in turn."""
        return base.observe_in_turn(self, events, labels, needed)

    def record_label(
        self, transaction_id: str, is_fraud: bool, place: base.LabelPlace | None = None
    ) -> LabelOutcome:
        """See `StateStore.record_label`: the entities `place` names, when given, else those
        of the label index's entry."""
        with self._lock:
            outcome = self._record_label(transaction_id, is_fraud, place)
        base.log_label(log, transaction_id, is_fraud, outcome)
        return outcome

    def _record_label(
        self, txid: str, is_fraud: bool, place: base.LabelPlace | None = None
    ) -> LabelOutcome:
        outcomes: list[str] = []
        label = int(is_fraud)
        if place is not None:
            pairs = [(kind, ident) for kind, ident in place.entities if kind in self._entities]
        else:
            entry = self._index.get(txid)
            pairs = [] if entry is None else _pairs(entry)
        if self.native:
            for kind, ident in pairs:
                entity = self._entities[kind].get(ident)
                outcome = None if entity is None else entity.label(txid, label)
                if outcome is not None:
                    outcomes.append(outcome)
            return base.combine_outcomes(outcomes)
        for kind, ident in pairs:
            row = self._held(kind, ident, txid)
            if row is None:
                continue
            old = row[2]
            if old == label:
                outcomes.append(LabelOutcome.DUPLICATE.value)
                continue
            outcomes.append(LabelOutcome.APPLIED.value if old == -1 else LabelOutcome.CHANGED.value)
            row[2] = label
            delta = label - (old == 1)
            if delta:
                self._move_fraud(self._entities[kind][ident], row[0], delta)
        return base.combine_outcomes(outcomes)

    def _move_fraud(self, e: _Entity, ts: float, delta: int) -> None:
        """Move the fraud count of a transaction's tiles, and of the window sums over them."""
        for level, (width, _) in enumerate(self._levels):
            k = math.floor(ts / width)
            t = e.tiles[level].get(k)
            if t is None:  # forgotten
                continue
            t[3] += delta
            for w, c in enumerate(e.caches):
                if self._wl[w] == level and c[_VALID] == 1 and c[_K] - self._wn[w] < k <= c[_K]:
                    c[_FRAUD] += delta

    def check(self) -> None:
        """Always reachable: the store is this process's memory."""

    def close(self) -> None:
        """Drop all state."""
        with self._lock:
            for entities in self._entities.values():
                entities.clear()
            self._index.clear()
            self._sweeper = None
