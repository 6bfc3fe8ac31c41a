"""The state store in process memory: exact, for one instance, tests and replay.

Each entity's history is held in (timestamp, transaction_id) order with prefix sums and
indexes, in C arrays where `make native` built `detector.state._history`, else in Python
lists, with the same features to the bit. Semantics: `detector.state.base`.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final

from detector.state import base
from detector.state.base import (
    DISTINCT,
    DISTINCT_FEATURE,
    MICROS,
    Event,
    FeatureBuilder,
    Features,
    LabelOutcome,
    Raw,
    StateConfig,
    feature_names,
    select,
    window_name,
)

try:  # the C histories (`make native`); without them, the same in Python
    import detector.state._history as _history
except ImportError:  # pragma: no cover - exercised where the extension is not built
    _history = None  # type: ignore[assignment]

__all__ = ["NATIVE_HISTORIES", "MemoryStore"]

log = logging.getLogger(__name__)

#: Whether `make native` built the C histories in this process's package.
NATIVE_HISTORIES: Final = _history is not None

#: Entities (or remembered transaction ids) the memory store's forgetting visits per call.
SWEEP_SLICE = 512

#: How many of the latest recorded event times the forgetting clock is the median of.
_CLOCK_SAMPLE = 63

#: The largest amount in micros (either sign) that C histories sum (64-bit integers).
_MICROS_MAX = 2**63 - 1

# ---------------------------------------------------------------------------------------------
# In-process memory store
#
# A recorded transaction is a plain tuple (ts, transaction_id, amount, micros, terminal,
# merchant, country): tuples of strings and numbers are untracked by the cyclic garbage
# collector, which otherwise rescans every live record over and over. Labels live in a separate dict.

_Record = tuple[float, str, float, int, "str | None", "str | None", "str | None"]
_TS: Final = 0
_TXID: Final = 1
_AMOUNT: Final = 2
_MICRO: Final = 3
_ATTR_INDEX = {"terminal": 4, "merchant": 5, "country": 6}


class _History:
    """One entity's recorded transactions in (timestamp, transaction_id) order, with indexes.

    Positions are absolute: list index + `base`, where `base` counts transactions dropped from
    the front, so that indexes survive trimming. `sums`/`frauds` are prefix sums (length n+1)
    of amounts in micros and of fraud labels. `peaks` holds the positions of suffix maxima of
    the amount (amounts strictly decreasing), so the max of a window is the first peak inside
    it. For each tracked attribute (`attrs`: record indexes of the attributes whose distinct
    counts some reader of this kind needs), `last` maps a value to the position of its last
    occurrence and `lasts` holds those positions sorted: the distinct values of a window are
    the last occurrences inside it.
    """

    __slots__ = ("attrs", "base", "frauds", "last", "lasts", "peaks", "sums", "ts", "txs")

    def __init__(self, attrs: tuple[int, ...]) -> None:
        self.attrs = attrs
        self.base = 0
        self.ts: list[float] = []
        self.txs: list[_Record] = []
        self.sums: list[int] = [0]
        self.frauds: list[int] = [0]
        self.peaks: list[int] = []
        self.last: list[dict[str, int]] = [{} for _ in attrs]
        self.lasts: list[list[int]] = [[] for _ in attrs]

    def position(self, ts: float, txid: str) -> int:
        """List index where a transaction with this key goes (after every smaller key)."""
        index = bisect_left(self.ts, ts)
        txs, times = self.txs, self.ts
        while index < len(times) and times[index] == ts and txs[index][_TXID] < txid:
            index += 1
        return index

    def scan(
        self, index: int, ts: float, txid: str, windows: Sequence[int], labels: dict[str, bool]
    ) -> list[Raw]:
        """Raw aggregates of the transactions before list index `index`, by brute force."""
        raws: list[Raw] = []
        times, txs = self.ts, self.txs
        for window in windows:
            start = bisect_right(times, ts - window, 0, index)
            count = total = fraud = 0
            high = 0.0
            seen: dict[int, set[str | None]] = {4: set(), 5: set(), 6: set()}
            for i in range(start, index):
                tx = txs[i]
                if tx[_TXID] == txid:
                    continue
                count += 1
                total += tx[_MICRO]
                if labels.get(tx[_TXID]):
                    fraud += 1
                if tx[_AMOUNT] > high:
                    high = tx[_AMOUNT]
                for attr in (4, 5, 6):
                    seen[attr].add(tx[attr])  # type: ignore[arg-type]
            distinct = [len(seen[attr] - {None}) for attr in (4, 5, 6)]
            raws.append((count, total, high, fraud, distinct[0], distinct[1], distinct[2]))
        return raws

    def gap(self, index: int, ts: float, txid: str, lookback: float) -> float | None:
        """Seconds since the latest transaction before list index `index`, within `lookback`."""
        i = index - 1
        while i >= 0 and self.txs[i][_TXID] == txid:
            i -= 1
        if i < 0 or self.ts[i] <= ts - lookback:
            return None
        return ts - self.ts[i]

    def rebuild(self, labels: dict[str, bool]) -> None:
        """Recompute every index from the lists (after an out-of-order insert)."""
        base = self.base
        sums = [0]
        frauds = [0]
        peaks: list[int] = []
        last: list[dict[str, int]] = [{} for _ in self.attrs]
        txs = self.txs
        for i, tx in enumerate(txs):
            sums.append(sums[-1] + tx[_MICRO])
            frauds.append(frauds[-1] + (1 if labels.get(tx[_TXID]) else 0))
            while peaks and txs[peaks[-1] - base][_AMOUNT] <= tx[_AMOUNT]:
                peaks.pop()
            peaks.append(i + base)
            for n, attr in enumerate(self.attrs):
                value: str | None = tx[attr]  # type: ignore[assignment]
                if value is not None:
                    last[n][value] = i + base
        self.sums = sums
        self.frauds = frauds
        self.peaks = peaks
        self.last = last
        self.lasts = [sorted(d.values()) for d in last]

    def trim(self, cutoff: float) -> None:
        """Forget transactions with timestamp <= cutoff."""
        drop = bisect_right(self.ts, cutoff)
        if not drop:
            return
        base = self.base
        floor = base + drop
        txs = self.txs
        for n, positions in enumerate(self.lasts):
            gone = bisect_left(positions, floor)
            if gone:
                # Forget exactly the values whose last occurrence is dropped: O(dropped),
                # where rebuilding the map cost O(distinct values) on nearly every event.
                last = self.last[n]
                attr = self.attrs[n]
                for position in positions[:gone]:
                    del last[txs[position - base][attr]]  # type: ignore[arg-type]
                del positions[:gone]
        del self.ts[:drop]
        del txs[:drop]
        self.base = floor
        del self.sums[:drop]
        del self.frauds[:drop]
        del self.peaks[: bisect_left(self.peaks, floor)]

    def add_fraud(self, ts: float, txid: str, delta: int) -> None:
        """Add delta to the fraud count of a transaction, if this history still holds it."""
        index = self.position(ts, txid)
        if index < len(self.txs) and self.txs[index][_TXID] == txid:
            frauds = self.frauds
            start = index + 1
            frauds[start:] = [count + delta for count in frauds[start:]]

    def insert(self, index: int, tx: _Record) -> None:
        """Put a record at list index `index`; `rebuild` must follow."""
        self.ts.insert(index, tx[_TS])
        self.txs.insert(index, tx)

    def records(self) -> list[_Record]:
        """The records held, in order."""
        return list(self.txs)

    def __len__(self) -> int:
        return len(self.ts)

    @property
    def oldest(self) -> float:
        """Event time of the oldest record (IndexError when empty)."""
        return self.ts[0]

    @property
    def newest(self) -> float:
        """Event time of the newest record (IndexError when empty)."""
        return self.ts[-1]


_NA = object()  # placeholder for an absent amount ratio in generated code


#: The variables of one window in generated code and in `_history.Plan`'s keys, in order,
#: with the features they compute; a distinct count per tracked attribute follows them
#: ("d0", "d1", ...).
_VARIABLES = {
    "c": "count",
    "s": "sum",
    "m": "mean",
    "x": "max",
    "r": "amount_ratio",
    "f": "fraud_count",
    "fs": "fraud_share",
}


def _layout(
    kind: str, windows: Sequence[int], needed: frozenset[str] | None, tracked: Sequence[str]
) -> tuple[list[int], list[dict[str, str]], bool]:
    """What the fast path of one kind computes for one `needed` set.

    Returns the windows longest first; for each, the features wanted of it by variable
    (`_VARIABLES`, then "d<n>" for the n-th tracked attribute), in that order; and whether
    seconds_since_last is wanted.
    """
    names = feature_names(windows, kind)
    wanted = names if needed is None else names & needed
    attrs = tuple(tracked)
    missing = {
        name
        for name in wanted
        for attr in DISTINCT[kind]
        if name.startswith(DISTINCT_FEATURE[attr] + "_") and attr not in attrs
    }
    assert not missing, f"distinct counts of untracked attributes: {sorted(missing)}"
    order = sorted(windows, reverse=True)
    layout = []
    for window in order:
        s = window_name(window)
        keys = {var: f"{base}_{s}" for var, base in _VARIABLES.items()}
        for n, attr in enumerate(attrs):
            keys[f"d{n}"] = f"{DISTINCT_FEATURE[attr]}_{s}"
        layout.append({var: key for var, key in keys.items() if key in wanted})
    return order, layout, "seconds_since_last" in wanted


#: `step(history, tx, lookback, keep, longest)` of one kind (see `_compile_features`).
_Step = Callable[[Any, _Record, float, float, int], "dict[str, float] | None"]


def _native_plan(
    kind: str, windows: Sequence[int], needed: frozenset[str] | None, tracked: Sequence[str]
) -> _Step:
    """The step of `_compile_features` in C (`detector._history.Plan.step`)."""
    assert _history is not None
    order, layout, gap = _layout(kind, windows, needed, tracked)
    variables = [*_VARIABLES, *(f"d{n}" for n in range(len(tracked)))]
    keys = tuple(tuple(keys.get(var) for var in variables) for keys in layout)
    return _history.Plan(tuple(order), keys, "seconds_since_last" if gap else None).step


def _compile_features(
    kind: str, windows: Sequence[int], needed: frozenset[str] | None, tracked: Sequence[str]
) -> _Step:
    """Generate the fast path of one kind for one `needed` set: features, then record.

    `step(history, tx, lookback, keep, longest_window)` computes the features of a
    transaction that comes after everything in the history, whose `attrs` are the `tracked`
    attributes (a superset of the distinct counts wanted), then records it; it returns None,
    changing nothing, for one that does not come after. The generated code unrolls the windows
    (largest first, stopping at the first empty one: smaller ones are empty too) and builds
    dict displays with constant keys. Its arithmetic is that of `FeatureBuilder.build`; the
    property tests compare the two exactly.
    """
    order, layout, gap_wanted = _layout(kind, windows, needed, tracked)
    attrs = tuple(tracked)

    def keys_of(window: int) -> dict[str, str]:
        return layout[order.index(window)]

    def values(k: int) -> list[str]:
        """Dict display items of window k as computed."""
        items = []
        for var, key in keys_of(order[k]).items():
            if var == "r":
                continue
            expr = {
                "c": f"float(c{k})",
                "s": f"s{k}",
                "m": f"m{k}",
                "x": f"x{k}",
                "f": f"float(f{k})",
                "fs": f"f{k} / c{k}",
            }.get(var, f"{var}{k}")
            items.append(f"{key!r}: {expr}")
        return items

    def zeros(k: int) -> list[str]:
        return [f"{key!r}: 0.0" for var, key in keys_of(order[k]).items() if var != "r"]

    def finish(done: int, indent: str) -> list[str]:
        """Build `out` after computing windows 0..done-1 (the rest are empty)."""
        items = []
        for k in range(len(order)):
            items += values(k) if k < done else zeros(k)
        lines = [f"{indent}out = {{{', '.join(items)}}}"]
        for k in range(done):
            ratio = keys_of(order[k]).get("r")
            if ratio:
                lines.append(f"{indent}if r{k} is not _NA: out[{ratio!r}] = r{k}")
        if gap_wanted:
            lines.append(f"{indent}if gap is not None: out['seconds_since_last'] = gap")
        return lines

    computed = [(k, window) for k, window in enumerate(order) if keys_of(window)]

    def block(i: int, indent: str) -> list[str]:
        """Window computed[i] and, when it is not empty, the smaller ones inside it."""
        if i == len(computed):
            return finish(len(order), indent)
        k, window = computed[i]
        keys = keys_of(window)
        inner = indent + "    "
        lines = [
            f"{indent}lo = bisect_right(times, ts - {window}, lo)",
            f"{indent}c{k} = n - lo",
            f"{indent}if not c{k}:",
            *finish(k, inner),
            f"{indent}else:",
            f"{inner}la = lo + base",
        ]
        # Only what the wanted features read.
        if "x" in keys:
            lines += [
                f"{inner}while peaks[pi] < la:",
                f"{inner}    pi += 1",
                f"{inner}x{k} = txs[peaks[pi] - base][2]",
            ]
        if keys.keys() & {"s", "m", "r"}:
            lines.append(f"{inner}s{k} = (sa - sums[lo]) / {MICROS}")
        if keys.keys() & {"m", "r"}:
            lines.append(f"{inner}m{k} = s{k} / c{k}")
        if "r" in keys:
            lines.append(f"{inner}r{k} = amount / m{k} if m{k} > 0 else _NA")
        if keys.keys() & {"f", "fs"}:
            lines.append(f"{inner}f{k} = fa - frauds[lo]")
        for n in range(len(attrs)):
            if f"d{n}" in keys:
                lines.append(
                    f"{inner}d{n}{k} = float(len(p{n}) - bisect_left(p{n}, la)) if p{n} else 0.0"
                )
        return lines + block(i + 1, inner)

    body = [
        "def step(h, tx, lookback, keep, longest):",
        "    ts = tx[0]",
        "    amount = tx[2]",
        "    times = h.ts",
        "    n = len(times)",
        "    base = h.base",
        "    sums = h.sums",
        "    frauds = h.frauds",
        "    peaks = h.peaks",
        "    txs = h.txs",
        "    sa = sums[-1]",
        "    fa = frauds[-1]",
        "    if n and (ts < times[-1] or (ts == times[-1] and tx[1] <= txs[-1][1])):",
        "        return None  # not after everything held: the caller inserts it",
        "    if not n:",
        "        gap = None",
        *finish(0, "        "),
        "    else:",
        "        last = times[-1]",
        "        gap = ts - last if last > ts - lookback else None",
        f"        {', '.join(f'p{n}' for n in range(len(attrs)))}, = h.lasts"
        if attrs
        else "        pass",
        "        lo = 0",
        "        pi = 0",
        *block(0, "        "),
        # Record: the transaction comes after everything in the history.
        "    end = base + n",
        "    while peaks and txs[peaks[-1] - base][2] <= amount:",
        "        peaks.pop()",
        "    peaks.append(end)",
        "    times.append(ts)",
        "    txs.append(tx)",
        "    sums.append(sa + tx[3])",
        "    frauds.append(fa)",
    ]
    if attrs:
        body += ["    lasts = h.lasts", "    maps = h.last"]
    for n, attr in enumerate(attrs):
        body += [
            f"    value = tx[{_ATTR_INDEX[attr]}]",
            "    if value is not None:",
            f"        seen = maps[{n}]",
            "        old = seen.get(value)",
            f"        positions = lasts[{n}]",
            "        if old is not None:",
            "            del positions[bisect_left(positions, old)]",
            "        positions.append(end)",
            "        seen[value] = end",
        ]
    body += [
        "    if times[0] <= ts - keep:",
        "        cutoff = ts - keep",
        "        if len(times) >= 64 or times[len(times) // 2] <= cutoff:",
        "            h.trim(cutoff)",
        "    if len(peaks) > 8:",
        "        # Peaks older than the longest window are never read again.",
        "        floor = h.base + bisect_right(times, ts - longest)",
        "        if peaks[0] < floor:",
        "            del peaks[: bisect_left(peaks, floor)]",
        "    return out",
    ]
    source = "\n".join(body)
    namespace: dict[str, object] = {
        "bisect_left": bisect_left,
        "bisect_right": bisect_right,
        "_NA": _NA,
    }
    exec(compile(source, f"<state step {kind}>", "exec"), namespace)
    return namespace["step"]  # type: ignore[return-value]


class _Plan:
    """How the memory fast path computes one entity kind's features for a `needed` set.

    `step(history, tx, lookback, keep, longest)` is generated (see `_compile_features`), or
    its C twin for C histories (`native`); `keys` are the features to return, or None for
    all (used to trim the slow path's output).
    """

    __slots__ = ("keys", "step")

    def __init__(
        self,
        kind: str,
        windows: Sequence[int],
        needed: frozenset[str] | None,
        tracked: Sequence[str],
        native: bool = False,
    ) -> None:
        names = feature_names(windows, kind)
        self.keys = None if needed is None else tuple(sorted(names & needed))
        compile_step = _native_plan if native else _compile_features
        self.step = compile_step(kind, windows, needed, tracked)

    def select(self, features: dict[str, float]) -> dict[str, float]:
        """Only the needed features."""
        assert self.keys is not None
        return {key: features[key] for key in self.keys if key in features}


_Known = tuple[_Record, "str | None", "str | None", "str | None", "str | None"]


def _distinct_read(kind: str, wanted: frozenset[str] | None) -> set[str]:
    """The attributes whose distinct counts `wanted` (None: all) asks of this kind."""
    return {
        attr
        for attr in DISTINCT[kind]
        if wanted is None or any(name.startswith(DISTINCT_FEATURE[attr] + "_") for name in wanted)
    }


class MemoryStore:
    """State in this process's memory: the embedded default (one process, tests, replay).

    Calls are serialized by a lock (functions-framework serves requests from several threads).

    Entity histories are C arrays (`detector._history`) where the extension is built and
    `native` is not False, else Python lists (as in a Cloud Functions upload); the results
    are the same. `native` says which. An amount beyond 9.2 trillion (its micros past 64 bits)
    moves the store back to Python for good.
    """

    def __init__(self, config: StateConfig | None = None, *, native: bool = True) -> None:
        self.config = config or StateConfig()
        self._windows = self.config.windows
        self.native = native and _history is not None and len(self._windows) <= _history.MAX_WINDOWS
        self._keep = self.config.keep
        self._lateness = self.config.allowed_lateness
        self._lookback = self._keep - self._lateness
        self._builder = FeatureBuilder(self._windows)
        self._customers: dict[str, _History] = {}
        self._cards: dict[str, _History] = {}
        self._terminals: dict[str, _History] = {}
        self._merchants: dict[str, _History] = {}
        self._entities = {
            "customer": self._customers,
            "card": self._cards,
            "terminal": self._terminals,
            "merchant": self._merchants,
        }
        # transaction_id -> (record, customer, card, terminal, merchant)
        self._txs: dict[str, _Known] = {}
        # The same ids with their event times, in the order they were recorded (roughly event
        # time), to forget from the front without scanning the dict's deleted slots.
        self._arrivals: deque[tuple[float, str]] = deque()
        self._labels: dict[str, bool] = {}
        # The event times of the latest transactions recorded: their median is the clock
        # that forgetting idle entities goes by, which a few timestamps far ahead (or behind)
        # cannot move.
        self._recent: deque[float] = deque(maxlen=_CLOCK_SAMPLE)
        # Forgetting runs when that clock has advanced this far since the last time.
        self._sweep_every = max(self._keep / 8, 60.0)
        self._next_sweep = float("-inf")
        self._sweeper: Iterator[None] | None = None
        self._plans: dict[frozenset[str] | None, dict[str, _Plan]] = {}
        self._reads: dict[str, frozenset[str] | None] | None = None
        # Per kind, the attributes whose last-occurrence indexes are kept (see `_track`).
        self._tracked: dict[str, tuple[str, ...]] = dict.fromkeys(DISTINCT, ())
        self._longest = self._windows[-1]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Number of transactions remembered (for idempotency and labels)."""
        return len(self._txs)

    @property
    def entity_count(self) -> int:
        """Number of entities with history in memory."""
        return sum(len(histories) for histories in self._entities.values())

    def declare_reads(self, reads: Mapping[str, frozenset[str] | None]) -> None:
        """Compute per kind only what is read (`narrow`), and keep the indexes it reads from
        the first transaction on, also for one only recorded (`track`)."""
        self.narrow(reads)
        if any(names is None for names in reads.values()):
            self.track(None)
        else:
            self.track(frozenset().union(*(names for names in reads.values() if names)))

    def narrow(self, reads: Mapping[str, frozenset[str] | None]) -> None:
        """From now on compute, per entity kind, only the features its readers use.

        `needed` is one set for every entity, so without this a card computes the customer's
        30-day means too. Recording is unchanged, and so is every feature still computed:
        readers limited to `reads` see no difference.

        Args:
            reads: feature names read of each kind (None: all that `needed` asks); a kind
                not in it computes none.
        """
        with self._lock:
            self._reads = dict(reads)
            self._plans.clear()

    def track(self, needed: frozenset[str] | None) -> None:
        """Keep the distinct-value indexes `needed` reads from now on (observe does it too).

        So that transactions observed with fewer features needed (none, to only record them)
        keep what later reads of `needed` use.
        """
        with self._lock:
            self._track(needed)

    def _wanted(self, kind: str, needed: frozenset[str] | None) -> frozenset[str] | None:
        """`needed` narrowed to what is read of this kind (see `narrow`)."""
        return base.wanted(self._reads, kind, needed)

    def _plan(self, needed: frozenset[str] | None) -> dict[str, _Plan]:
        """How to compute each kind's features for this `needed` (cached per set)."""
        plans = self._plans.get(needed)
        if plans is None:
            self._track(needed)
            plans = {
                kind: _Plan(
                    kind,
                    self._windows,
                    self._wanted(kind, needed),
                    self._tracked[kind],
                    self.native,
                )
                for kind in DISTINCT
            }
            if len(self._plans) < 64:
                self._plans[needed] = plans
        return plans

    def _track(self, needed: frozenset[str] | None) -> None:
        """Start keeping the distinct-value indexes `needed` reads, where not kept yet.

        Each index costs a few dict and list operations per event and entity, so a kind keeps
        only those some caller has asked for (a card's distinct terminals, say, and not its
        merchants or countries); a newly kept one is rebuilt from the entity's history, and
        the compiled plans, which record the old set, are dropped.
        """
        for kind, attrs in DISTINCT.items():
            read = _distinct_read(kind, self._wanted(kind, needed))
            if read <= set(self._tracked[kind]):
                continue
            tracked = tuple(attr for attr in attrs if attr in read or attr in self._tracked[kind])
            self._tracked[kind] = tracked
            indexes = tuple(_ATTR_INDEX[attr] for attr in tracked)
            for history in self._entities[kind].values():
                history.attrs = indexes
                history.rebuild(self._labels)
            self._plans.clear()

    def _new_history(self, kind: str) -> _History:
        attrs = tuple(_ATTR_INDEX[attr] for attr in self._tracked[kind])
        return _history.History(attrs) if self.native else _History(attrs)  # type: ignore[return-value]

    def _to_python(self) -> None:
        """Move every history to Python lists, for good (amounts the C arrays cannot sum)."""
        log.warning("an amount beyond 64-bit micros: the memory store continues in Python")
        for histories in self._entities.values():
            for ident, native in histories.items():
                history = _History(native.attrs)
                history.base = native.base
                history.txs = native.records()
                history.ts = [tx[_TS] for tx in history.txs]
                history.rebuild(self._labels)
                histories[ident] = history
        self.native = False
        self._plans.clear()

    def observe(self, event: Event, needed: frozenset[str] | None = None) -> Features:
        """See `StateStore.observe`."""
        with self._lock:
            return self._observe(event, needed)

    def _observe(self, event: Event, needed: frozenset[str] | None) -> Features:
        ts = event.timestamp
        txid = event.transaction_id
        known = self._txs.get(txid)
        amount = event.amount
        micro = round(amount * MICROS)
        if (micro > _MICROS_MAX or micro < -_MICROS_MAX) and self.native:
            self._to_python()
        tx: _Record = (ts, txid, amount, micro, event.terminal, event.merchant, event.country)
        plans = self._plans.get(needed) or self._plan(needed)
        features: Features = {}
        before: list[str | None] = [None, None, None, None] if known is None else list(known[1:])
        recorded = list(before)
        duplicate: list[str] = []
        late: list[tuple[str, float]] = []
        for slot, kind, ident, entities in (
            (0, "customer", event.customer, self._customers),
            (1, "card", event.card, self._cards),
            (2, "terminal", event.terminal, self._terminals),
            (3, "merchant", event.merchant, self._merchants),
        ):
            if ident is None:
                continue
            history = entities.get(ident)
            if history is None:
                history = entities[ident] = self._new_history(kind)
            elif known is not None and self._holds(known, slot, ident, history):
                duplicate.append(kind)
                features[kind] = self._score(kind, history, event, needed)
                continue
            plan = plans[kind]
            out = plan.step(history, tx, self._lookback, self._keep, self._longest)
            if out is None:  # not after everything the entity holds
                behind = history.newest - ts
                if behind > self._lateness:
                    late.append((kind, behind))
                    features[kind] = self._score(kind, history, event, needed)
                    continue
                raws, gap = self._insert(history, tx)
                out = self._builder.build(kind, amount, raws, gap)
                if plan.keys is not None:
                    out = plan.select(out)
            features[kind] = out
            recorded[slot] = ident
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
        if recorded == before:
            return features  # recorded for no entity it was not recorded for already
        if known is not None and known[0][_TS] != ts:
            # The id again with another event time: counted afresh where it was not held.
            self._labels.pop(txid, None)
        self._txs[txid] = (tx, recorded[0], recorded[1], recorded[2], recorded[3])
        self._arrivals.append((ts, txid))
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
        return features

    def _holds(self, known: _Known, slot: int, ident: str, history: _History) -> bool:
        """Whether the entity recorded this transaction and still holds it (its own
        retention: the record is less than `retention` older than the entity's newest)."""
        if known[1 + slot] != ident or not history:
            return False
        stamp = known[0][_TS]
        return history.oldest <= stamp and stamp > history.newest - self._keep

    def _insert(self, h: _History, tx: _Record) -> tuple[list[Raw], float | None]:
        """Slow path: tx arrived after later transactions of this entity."""
        index = h.position(tx[_TS], tx[_TXID])
        raws = h.scan(index, tx[_TS], tx[_TXID], self._windows, self._labels)
        gap = h.gap(index, tx[_TS], tx[_TXID], self._lookback)
        h.insert(index, tx)
        h.rebuild(self._labels)
        return raws, gap

    def _score(
        self, kind: str, history: _History, event: Event, needed: frozenset[str] | None
    ) -> dict[str, float]:
        """Features of an event this entity does not record (redelivered or too late)."""
        ts, txid = event.timestamp, event.transaction_id
        index = history.position(ts, txid)
        raws = history.scan(index, ts, txid, self._windows, self._labels)
        gap = history.gap(index, ts, txid, self._lookback)
        return select(
            self._builder.build(kind, event.amount, raws, gap), self._wanted(kind, needed)
        )

    def _sweep(self, clock: float) -> Iterator[None]:
        """Forget what no transaction can read any more.

        An entity whose newest transaction is more than the retention behind `clock` (the
        median event time of the latest transactions) is forgotten whole; another keeps its
        last `retention` seconds before its own newest. A generator: each step does at most
        `SWEEP_SLICE` entities or transaction ids, one step per recorded transaction, so no
        transaction waits for a whole pass.
        """
        gone = forgotten = 0
        keep = self._keep
        idle = clock - keep
        for histories in self._entities.values():
            keys = list(histories)
            for start in range(0, len(keys), SWEEP_SLICE):
                for key in keys[start : start + SWEEP_SLICE]:
                    h = histories.get(key)
                    if h is None:
                        continue
                    if not h or h.newest <= idle:  # empty: a C history that refused
                        del histories[key]
                        gone += 1
                    elif h.oldest <= h.newest - keep:
                        h.trim(h.newest - keep)
                yield
        while True:
            remembered = len(self._txs)
            more = self._forget_ids(idle)
            forgotten += remembered - len(self._txs)
            if not more:
                break
            yield
        if gone or forgotten:
            log.debug("forgot %d entities and %d transactions", gone, forgotten)

    def _holders(self, known: _Known) -> list[_History]:
        """The histories that still hold a recorded transaction."""
        held = []
        for slot, entities in enumerate(
            (self._customers, self._cards, self._terminals, self._merchants)
        ):
            ident: str | None = known[1 + slot]  # type: ignore[assignment]
            if ident is None:
                continue
            history = entities.get(ident)
            if history is not None and self._holds(known, slot, ident, history):
                held.append(history)
        return held

    def _forget_ids(self, cutoff: float) -> bool:
        """Forget up to `SWEEP_SLICE` remembered ids older than cutoff that no entity holds.

        Returns whether more may be due. Ids are in the order recorded, roughly event time:
        a late straggler behind a newer id waits for a later pass; one an entity still holds
        (its newest is less than the retention after it), or one dated more than the retention
        ahead of the clock,
        goes to the back of the queue.
        """
        arrivals, txs, labels = self._arrivals, self._txs, self._labels
        ahead = cutoff + 2 * self._keep  # the clock + the retention
        rotated = 0
        for _ in range(SWEEP_SLICE):
            if not arrivals:
                return False
            if arrivals[0][0] > cutoff:
                if arrivals[0][0] <= ahead or rotated >= len(arrivals):
                    return False
                # Dated far ahead of the clock: to the back, so that it holds up no other.
                arrivals.append(arrivals.popleft())
                rotated += 1
                continue
            ts, txid = arrivals.popleft()
            known = txs.get(txid)
            # An id recorded again after it expired has a newer record: that one stays.
            if known is not None and known[0][_TS] == ts:
                if self._holders(known):
                    arrivals.append((ts, txid))
                else:
                    del txs[txid]
                    labels.pop(txid, None)
        return True

    def observe_many(
        self, events: Sequence[Event], needed: frozenset[str] | None = None
    ) -> list[Features]:
        """See `detector.state.base.StateStore.observe_many`."""
        return [self.observe(event, needed) for event in events]

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
        """See `StateStore.record_label` (`place` is not needed: the store knows it)."""
        with self._lock:
            return self._record_label(transaction_id, is_fraud)

    def _record_label(self, transaction_id: str, is_fraud: bool) -> LabelOutcome:
        known = self._txs.get(transaction_id)
        holders = [] if known is None else self._holders(known)
        old = self._labels.get(transaction_id)
        if not holders:
            outcome = LabelOutcome.UNKNOWN
        elif old is None:
            outcome = LabelOutcome.APPLIED
        elif old == is_fraud:
            outcome = LabelOutcome.DUPLICATE
        else:
            outcome = LabelOutcome.CHANGED
        if known is not None and holders and outcome is not LabelOutcome.DUPLICATE:
            self._labels[transaction_id] = is_fraud
            delta = int(is_fraud) - int(bool(old))
            if delta:
                for history in holders:
                    history.add_fraud(known[0][_TS], transaction_id, delta)
        base.log_label(log, transaction_id, is_fraud, outcome)
        return outcome

    def check(self) -> None:
        """Always reachable: the store is this process's memory."""

    def close(self) -> None:
        """Drop all state."""
        with self._lock:
            for histories in self._entities.values():
                histories.clear()
            self._txs.clear()
            self._arrivals.clear()
            self._labels.clear()
            self._sweeper = None
