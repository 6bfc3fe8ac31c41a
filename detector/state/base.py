"""The state store's contract: events in, per-entity window features out, and labels.

Every transaction names up to four entities (customer, card, terminal, merchant). For each,
`StateStore.observe` returns aggregates over the entity's earlier transactions in event-time
windows (default 1h, 1d, 7d, 30d) and records the transaction, exactly once per
transaction_id. `StateStore.record_label` applies a fraud label to a recorded transaction.

Features of each entity map, per window W (suffix from `format_duration`: 1h, 1d, 7d, 30d):
``count_W``, ``sum_W``, ``mean_W``, ``max_W`` (0.0 when the window is empty),
``amount_ratio_W`` (this amount / mean_W; absent when the window is empty or its mean is 0),
``distinct_terminals_W`` (not for terminals), ``distinct_merchants_W`` (not for merchants),
``distinct_countries_W``, ``fraud_count_W``, ``fraud_share_W`` (fraud_count / count, 0.0 when
empty); and ``seconds_since_last`` (absent without an earlier transaction in the lookback).
All values are floats. `feature_names(windows, entity)` lists them.

Semantics shared by every store (the same test suite runs against each):

- Order. Transactions are ordered by ``(timestamp, transaction_id)``. A transaction's
  features cover the recorded transactions of the same entity that come strictly before it in
  that order, so a verdict never sees its own or a later transaction, and the result does not
  depend on the order in which Pub/Sub delivered transactions with equal timestamps.
- Windows. A window of W seconds at time t holds the earlier transactions with
  ``timestamp > t - W`` (a transaction exactly W seconds old has left it).
- Amounts are summed exactly as integer millionths (``round(amount * 1e6)``), so sums and means
  do not drift and both stores agree to the bit; digits beyond the sixth decimal are rounded.
- Lateness, per entity. Each entity's newest recorded timestamp is its own clock. A
  transaction more than ``allowed_lateness`` behind the newest of an entity is scored against
  what that entity holds but not recorded for it (logged at WARNING); it is still recorded
  for its other entities. Within the lateness it is recorded in its place, and later
  transactions see it. A timestamp far ahead thus moves the clocks of the entities it names
  only: every other entity goes on as before.
- Redelivery, per entity. A transaction_id an entity holds is not recorded for it again
  (logged at INFO); it is scored like the first time against the entity's earlier
  transactions, so it gets the same features unless older transactions arrived late or labels
  arrived in between. An entity holds a transaction for ``retention`` seconds of event time
  after it (before its own newest), so a redelivery counts once for at least that long
  (30 days and an hour by default, beyond Pub/Sub's longest retention of 7 days); older than
  that it is too late anyway. No state shared across entities decides it.
- Retention, per entity. An entity's state more than ``retention`` older than its own newest
  may be forgotten; ``retention >= longest window + allowed_lateness`` keeps every window exact
  for every transaction that is recorded. ``seconds_since_last`` looks back at most
  ``retention - allowed_lateness`` seconds (the longest window by default), so it is exact too.
  Idle entities are forgotten whole: in memory, once their newest is more than ``retention``
  behind the median event time of the latest transactions recorded (a few timestamps far
  ahead do not move it); in Redis, when their keys expire, ``retention`` seconds of wall-clock
  time after their last write.
- Labels. A label names a transaction_id; it counts for each entity that holds the
  transaction, and is ``unknown`` (logged at WARNING) when none does: never recorded, too late
  for every entity, or older than the retention of each.
- Labels count by transaction time: ``fraud_count_W`` counts the earlier transactions in the
  window that were labelled fraudulent by the time of the call.

Errors: `StateConfigError` for bad windows, lateness or retention (stops start-up),
`StoreUnavailable` when the store cannot be reached (the message is redelivered), both in
`detector.errors`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from detector.errors import ConfigError, StateConfigError
from detector.vocabulary import DAY, ENTITIES, HOUR, format_duration

__all__ = [
    "DEFAULT_WINDOWS",
    "DISTINCT",
    "DISTINCT_FEATURE",
    "MICROS",
    "Event",
    "FeatureBuilder",
    "Features",
    "Label",
    "LabelOutcome",
    "LabelPlace",
    "Raw",
    "StateConfig",
    "StateStore",
    "combine_outcomes",
    "entities_of",
    "feature_names",
    "log_label",
    "micros",
    "observe_in_turn",
    "select",
    "window_name",
]

DEFAULT_WINDOWS: tuple[int, ...] = (HOUR, DAY, 7 * DAY, 30 * DAY)

#: Attributes whose distinct values are counted per entity (not an entity's own kind).
DISTINCT = {
    "customer": ("terminal", "merchant", "country"),
    "card": ("terminal", "merchant", "country"),
    "terminal": ("merchant", "country"),
    "merchant": ("terminal", "country"),
}
DISTINCT_FEATURE = {
    "terminal": "distinct_terminals",
    "merchant": "distinct_merchants",
    "country": "distinct_countries",
}

#: Amounts are summed as integers of this many units per currency unit.
MICROS = 1_000_000

#: Each window's aggregates other than distinct counts, in `FeatureBuilder`'s order.
WINDOW_AGGREGATES = (
    "count",
    "sum",
    "mean",
    "max",
    "amount_ratio",
    "fraud_count",
    "fraud_share",
)

Features = dict[str, dict[str, float]]


class LabelOutcome(enum.StrEnum):
    """What `StateStore.record_label` did with a label."""

    APPLIED = "applied"  # first label of a known transaction
    DUPLICATE = "duplicate"  # the transaction already had this label: nothing changed
    CHANGED = "changed"  # the transaction had the opposite label: replaced
    UNKNOWN = "unknown"  # not recorded (never seen, too late, or forgotten after retention)


class LabelPlace(NamedTuple):
    """Where a labelled transaction was recorded, when the label says so (chargeback files
    carry the original transaction's time and parties): the tiled stores then go to these
    entities directly, without the label index."""

    timestamp: float  # the transaction's event time, epoch seconds
    entities: tuple[tuple[str, str], ...]  # (kind, id), as `entities_of` gives them


class Label(NamedTuple):
    """A label recorded among a batch of transactions (`StateStore.observe_labelled`)."""

    position: int  # recorded before events[position] (after them all at len(events))
    transaction_id: str
    is_fraud: bool
    place: LabelPlace | None = None


class Event(NamedTuple):
    """What the state store needs of a transaction.

    A named tuple: built once per transaction, it costs less than a frozen dataclass.
    """

    transaction_id: str
    timestamp: float  # event time, epoch seconds
    amount: float
    customer: str | None = None
    card: str | None = None
    terminal: str | None = None
    merchant: str | None = None
    country: str | None = None


def window_name(seconds: float) -> str:
    """Suffix of a window's features: 3600 -> "1h", 86400 -> "1d", 90 -> "90s".

    Raises:
        StateConfigError: seconds is not a positive whole number.
    """
    try:
        return format_duration(seconds, setting="windows")
    except ConfigError as error:
        raise StateConfigError(str(error), setting="windows") from None


def feature_names(windows: Iterable[float], entity: str | None = None) -> frozenset[str]:
    """Names of the features an entity's map can hold (all entities' when entity is None).

    ``amount_ratio_W`` and ``seconds_since_last`` are among them although they are absent
    when the entity has no history.

    Raises:
        StateConfigError: a window is not positive whole seconds, or the entity is unknown.
    """
    if entity is None:
        return frozenset().union(*(feature_names(windows, kind) for kind in ENTITIES))
    if entity not in DISTINCT:
        raise StateConfigError(f"entity: must be one of {', '.join(ENTITIES)}, got {entity!r}")
    names = {"seconds_since_last"}
    for window in windows:
        suffix = window_name(window)
        names.update(f"{base}_{suffix}" for base in WINDOW_AGGREGATES)
        names.update(f"{DISTINCT_FEATURE[attr]}_{suffix}" for attr in DISTINCT[entity])
    return frozenset(names)


@dataclass(frozen=True, slots=True)
class StateConfig:
    """How much history the store keeps and how it windows it.

    Attributes:
        windows: window lengths in whole seconds (sorted and deduplicated here).
        allowed_lateness: how far behind the newest recorded timestamp a transaction may be
            and still be recorded, in seconds.
        retention: how long state is kept, in seconds of event time (Redis: also the TTL of
            its keys in wall-clock seconds). None means the minimum, longest window +
            allowed_lateness.
        tiled: whether windows are read from time tiles (`detector.state.tiles`, the
            default: cost flat in history) or from every transaction (the exact stores,
            which models trained before tiles were trained on).
    """

    windows: tuple[int, ...] = DEFAULT_WINDOWS
    allowed_lateness: float = HOUR
    retention: float | None = field(default=None)
    tiled: bool = True

    def __post_init__(self) -> None:
        if not self.windows:
            raise StateConfigError("windows: must name at least one window, got none")
        for window in self.windows:
            window_name(window)  # validates
        object.__setattr__(self, "windows", tuple(sorted({int(w) for w in self.windows})))
        if not self.allowed_lateness >= 0:
            raise StateConfigError(
                f"allowed_lateness: must be >= 0 seconds, got {self.allowed_lateness!r}"
            )
        minimum = self.windows[-1] + self.allowed_lateness
        if self.retention is None:
            object.__setattr__(self, "retention", minimum)
        elif not self.retention >= minimum:
            raise StateConfigError(
                f"retention: must be >= longest window + allowed_lateness ({minimum:g} s), "
                f"got {self.retention!r}"
            )

    @property
    def keep(self) -> float:
        """Retention in seconds (never None after construction)."""
        assert self.retention is not None
        return self.retention


class StateStore(Protocol):
    """Where per-entity history lives: process memory or Redis."""

    def observe(self, event: Event, needed: frozenset[str] | None = None) -> Features:
        """Features of each entity the event names over what came before it, then record it.

        Args:
            event: the transaction.
            needed: feature names (e.g. "count_1h") wanted for every entity; None for all.
                Others may be left out of the result. Recording is the same either way.

        Returns:
            {entity: {feature: value}} for each entity the event names.

        Raises:
            StoreUnavailable: the store cannot be reached; nothing was recorded.
        """
        ...

    def observe_many(
        self, events: Sequence[Event], needed: frozenset[str] | None = None
    ) -> list[Features]:
        """`observe` of each event in order, in one call (one round trip to a remote store).

        Each event's features cover the events before it in the list as `observe` would.

        Raises:
            StoreUnavailable: the store cannot be reached; nothing was recorded.
        """
        ...

    def observe_labelled(
        self,
        events: Sequence[Event],
        labels: Sequence[Label],
        needed: frozenset[str] | None = None,
    ) -> tuple[list[Features], list[LabelOutcome]]:
        """`observe_many` with labels recorded among the events, all in order: each label
        before the event at its position. One round trip to a remote store when every label
        has its place (a replay's labels do).

        Returns:
            Each event's features, and each label's outcome.

        Raises:
            StoreUnavailable: the store cannot be reached; what ran before may be recorded,
                and runs again without counting twice.
        """
        ...

    def record_label(
        self, transaction_id: str, is_fraud: bool, place: LabelPlace | None = None
    ) -> LabelOutcome:
        """Apply a fraud label to a recorded transaction (see `LabelOutcome`).

        `place`, when the label gives it, names the transaction's time and entities: a tiled
        store counts the label for those of them that still hold the transaction, without
        the label index (so however long the index keeps ids); an exact store finds them in
        its own records and ignores it.

        Raises:
            StoreUnavailable: the store cannot be reached; nothing was changed.
        """
        ...

    def declare_reads(self, reads: Mapping[str, frozenset[str] | None]) -> None:
        """What the detector will read of each entity kind, so a store may compute only that.

        Args:
            reads: feature names read of each kind (None: all that `observe`'s `needed`
                asks); a kind not in it is read for none. Readers limited to `reads` see no
                difference; what is recorded does not change.
        """
        ...

    def check(self) -> None:
        """Reach the store once, as a process does at start-up.

        Raises:
            StoreUnavailable: the store cannot be reached.
        """
        ...

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""
        ...


def entities_of(event: Event) -> list[tuple[str, str]]:
    """(kind, id) of each entity the event names, in `ENTITIES` order."""
    pairs = []
    if event.customer is not None:
        pairs.append(("customer", event.customer))
    if event.card is not None:
        pairs.append(("card", event.card))
    if event.terminal is not None:
        pairs.append(("terminal", event.terminal))
    if event.merchant is not None:
        pairs.append(("merchant", event.merchant))
    return pairs


def observe_in_turn(
    store: StateStore,
    events: Sequence[Event],
    labels: Sequence[Label],
    needed: frozenset[str] | None = None,
) -> tuple[list[Features], list[LabelOutcome]]:
    """`StateStore.observe_labelled` by `observe_many` and `record_label` calls in turn."""
    features: list[Features] = []
    outcomes = []
    done = 0
    for label in labels:
        if label.position > done:
            features += store.observe_many(events[done : label.position], needed)
            done = label.position
        outcomes.append(store.record_label(label.transaction_id, label.is_fraud, label.place))
    if done < len(events):
        features += store.observe_many(events[done:], needed)
    return features, outcomes


def micros(amount: float) -> int:
    """The amount in integer millionths, as windows sum it."""
    return round(amount * MICROS)


# One window's raw aggregates:
# (count, sum in micros, max amount, fraud count, distinct terminals, merchants, countries).
Raw = tuple[int, int, float, int, int, int, int]


class FeatureBuilder:
    """Turns raw window aggregates into an entity's feature map (shared by every store).

    Keeping the arithmetic in one place makes both stores return bit-identical values.
    """

    __slots__ = ("_keys", "_last_key", "_windows")

    def __init__(self, windows: Sequence[int]) -> None:
        self._windows = tuple(windows)
        keys = []
        for window in self._windows:
            s = window_name(window)
            keys.append(
                (
                    f"count_{s}",
                    f"sum_{s}",
                    f"mean_{s}",
                    f"max_{s}",
                    f"amount_ratio_{s}",
                    f"fraud_count_{s}",
                    f"fraud_share_{s}",
                    f"distinct_terminals_{s}",
                    f"distinct_merchants_{s}",
                    f"distinct_countries_{s}",
                )
            )
        self._keys = tuple(keys)
        self._last_key = "seconds_since_last"

    def build(
        self, kind: str, amount: float, raws: Sequence[Raw], gap: float | None
    ) -> dict[str, float]:
        """The feature map of one entity from its raw window aggregates and the time gap."""
        out: dict[str, float] = {}
        has_terminal = kind != "terminal"
        has_merchant = kind != "merchant"
        for keys, (count, total, high, fraud, terminals, merchants, countries) in zip(
            self._keys, raws, strict=True
        ):
            if count:
                amount_sum = total / MICROS
                mean = amount_sum / count
                out[keys[0]] = float(count)
                out[keys[1]] = amount_sum
                out[keys[2]] = mean
                out[keys[3]] = high
                if mean > 0:
                    out[keys[4]] = amount / mean
                out[keys[5]] = float(fraud)
                out[keys[6]] = fraud / count
            else:
                out[keys[0]] = 0.0
                out[keys[1]] = 0.0
                out[keys[2]] = 0.0
                out[keys[3]] = 0.0
                out[keys[5]] = 0.0
                out[keys[6]] = 0.0
            if has_terminal:
                out[keys[7]] = float(terminals)
            if has_merchant:
                out[keys[8]] = float(merchants)
            out[keys[9]] = float(countries)
        if gap is not None:
            out[self._last_key] = gap
        return out


def select(features: dict[str, float], needed: frozenset[str] | None) -> dict[str, float]:
    """Only the needed features (all when needed is None)."""
    if needed is None:
        return features
    return {name: value for name, value in features.items() if name in needed}


def wanted(
    reads: Mapping[str, frozenset[str] | None] | None, kind: str, needed: frozenset[str] | None
) -> frozenset[str] | None:
    """`needed` narrowed to what `declare_reads` said is read of this kind: nothing for a kind
    it does not name, everything `needed` asks for one it names with None."""
    if reads is None:
        return needed
    if kind not in reads:
        return frozenset()
    read = reads[kind]
    if read is None:
        return needed
    return read if needed is None else read & needed


def combine_outcomes(outcomes: Iterable[str]) -> LabelOutcome:
    """One label's outcome from what each entity's script said of it (`LabelOutcome` values)."""
    said = set(outcomes) - {LabelOutcome.UNKNOWN.value}
    if not said:
        return LabelOutcome.UNKNOWN
    if said == {LabelOutcome.DUPLICATE.value}:
        return LabelOutcome.DUPLICATE
    if LabelOutcome.CHANGED.value in said:
        return LabelOutcome.CHANGED
    return LabelOutcome.APPLIED


def log_label(
    log: logging.Logger, transaction_id: str, is_fraud: bool, outcome: LabelOutcome
) -> None:
    """Say what a store did with a label: INFO, or WARNING when it could not count."""
    if outcome is LabelOutcome.UNKNOWN:
        log.warning(
            "label %s for %s: %s (never recorded, or older than the retention of each "
            "of its entities): not counted",
            is_fraud,
            transaction_id,
            outcome,
        )
    else:
        log.info("label %s for %s: %s", is_fraud, transaction_id, outcome)
