"""The state store: windows, ordering, lateness, idempotency, labels; memory and Redis alike."""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis
import redis.cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from detector.errors import StateConfigError, StoreUnavailable, TransientError
from detector.state import (
    DEFAULT_WINDOWS,
    NATIVE_HISTORIES,
    Event,
    LabelOutcome,
    MemoryStore,
    StateConfig,
    StateStore,
    TiledMemoryStore,
    feature_names,
    open_store,
    window_name,
)
from detector.state.base import entities_of, micros
from detector.state.memory import SWEEP_SLICE
from detector.state.redis_store import RedisStore, redact
from detector.state.redis_tiled import RedisTiledStore
from detector.vocabulary import parse_duration
from stack.services import unique
from tests.helpers.state import PROPERTY_CONFIG, needed_features, streams

SMALL = StateConfig(windows=(10, 100), allowed_lateness=20)

Factory = Callable[[StateConfig], StateStore]


#: The memory store's implementations: entity histories in C arrays, and in Python lists.
NATIVE = [
    pytest.param(
        True,
        id="c",
        marks=pytest.mark.skipif(not NATIVE_HISTORIES, reason="make native: not built"),
    ),
    pytest.param(False, id="python"),
]


def test_the_c_histories_are_used_where_built() -> None:
    assert MemoryStore().native is NATIVE_HISTORIES
    assert not MemoryStore(native=False).native


#: The fixture of each Redis store's server.
REDIS_SERVERS = {"redis": "redis_url", "redis-cluster": "redis_cluster_url"}


@pytest.fixture(params=["memory-c", "memory-python", *REDIS_SERVERS])
def make_store(request: pytest.FixtureRequest) -> Iterator[Factory]:
    """Builds stores of one kind; Redis stores get a fresh key prefix each."""
    opened: list[StateStore] = []
    if request.param == "memory-c" and not NATIVE_HISTORIES:
        pytest.skip("make native: the C histories are not built")

    def factory(config: StateConfig = SMALL) -> StateStore:
        store: StateStore
        if request.param.startswith("memory"):
            store = MemoryStore(config, native=request.param == "memory-c")
        else:
            url = request.getfixturevalue(REDIS_SERVERS[request.param])
            store = RedisStore(config, url, prefix=unique("test") + ":")
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


def ev(txid: str, ts: float, amount: float = 10.0, **ids: str) -> Event:
    ids.setdefault("customer", "c1")
    return Event(transaction_id=txid, timestamp=ts, amount=amount, **ids)


# --- names and configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "name"),
    [(3600, "1h"), (86400, "1d"), (604800, "7d"), (2592000, "30d"), (90, "90s"), (900, "15m")],
)
def test_window_name_renders_the_largest_whole_unit(seconds: int, name: str) -> None:
    """Windows render as the suffixes rules use, and parse back."""
    assert window_name(seconds) == name
    assert parse_duration(name) == seconds


@pytest.mark.parametrize("bad", [0, -3600, 1.5])
def test_a_window_must_be_positive_whole_seconds(bad: float) -> None:
    """A window that cannot name features is a configuration error naming `windows`."""
    with pytest.raises(StateConfigError, match=r"^windows: must be positive whole seconds"):
        StateConfig(windows=(bad,))


def test_feature_names_depend_on_the_entity() -> None:
    """No distinct terminals for a terminal, no distinct merchants for a merchant."""
    terminal = feature_names(DEFAULT_WINDOWS, "terminal")
    merchant = feature_names(DEFAULT_WINDOWS, "merchant")
    customer = feature_names(DEFAULT_WINDOWS, "customer")
    assert "distinct_terminals_1h" not in terminal
    assert "distinct_merchants_30d" not in merchant
    assert {"distinct_terminals_7d", "distinct_merchants_1d", "seconds_since_last"} <= customer
    assert {"amount_ratio_30d", "fraud_share_1h", "max_7d", "mean_1d"} <= terminal
    assert len(customer) == 4 * 10 + 1
    assert feature_names(DEFAULT_WINDOWS) == customer | terminal | merchant


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"windows": ()}, "windows: must name at least one window, got none"),
        ({"windows": (0,)}, "windows: must be positive whole seconds, got 0"),
        ({"windows": (1.5,)}, "windows: must be positive whole seconds, got 1.5"),
        ({"allowed_lateness": -1}, "allowed_lateness: must be >= 0 seconds, got -1"),
        (
            {"windows": (100,), "allowed_lateness": 10, "retention": 50},
            r"retention: must be >= longest window \+ allowed_lateness \(110 s\), got 50",
        ),
    ],
)
def test_config_errors_name_the_setting(kwargs: dict[str, object], message: str) -> None:
    """Invalid settings fail at construction with the field, the problem and the limit."""
    with pytest.raises(StateConfigError, match=f"^{message}$"):
        StateConfig(**kwargs)  # type: ignore[arg-type]


def test_config_defaults() -> None:
    """Default windows are 1h, 1d, 7d, 30d; retention is the minimum that keeps them exact."""
    config = StateConfig(windows=(86400, 3600, 3600))
    assert config.windows == (3600, 86400)
    assert config.retention == 86400 + 3600


# --- the shared suite --------------------------------------------------------------------


def test_first_transaction_has_empty_history(make_store: Factory) -> None:
    """Counts are zero and ratio and gap absent before any history."""
    store = make_store(SMALL)
    features = store.observe(ev("a", 1000, 5, terminal="t1", card="k1"))
    assert set(features) == {"customer", "card", "terminal"}
    customer = features["customer"]
    assert customer["count_10s"] == 0.0
    assert customer["sum_100s"] == 0.0
    assert customer["fraud_share_10s"] == 0.0
    assert "amount_ratio_10s" not in customer
    assert "seconds_since_last" not in customer
    assert set(customer) | {"amount_ratio_10s", "amount_ratio_100s", "seconds_since_last"} == (
        feature_names(SMALL.windows, "customer")
    )
    assert set(features["terminal"]) <= feature_names(SMALL.windows, "terminal")


def test_aggregates_over_windows(make_store: Factory) -> None:
    """Count, sum, mean, max, ratio, distincts and gap over each window."""
    store = make_store(SMALL)
    store.observe(ev("a", 1000, 50, terminal="t1", country="FR"))
    store.observe(ev("b", 1095, 10, terminal="t2", country="FR"))
    store.observe(ev("c", 1097, 30, terminal="t1", merchant="m1"))
    got = store.observe(ev("d", 1099, 60, terminal="t3"))["customer"]
    assert got["count_10s"] == 2.0 and got["count_100s"] == 3.0
    assert got["sum_10s"] == 40.0 and got["sum_100s"] == 90.0
    assert got["mean_10s"] == 20.0 and got["mean_100s"] == 30.0
    assert got["max_10s"] == 30.0 and got["max_100s"] == 50.0
    assert got["amount_ratio_10s"] == 3.0 and got["amount_ratio_100s"] == 2.0
    assert got["distinct_terminals_10s"] == 2.0 and got["distinct_terminals_100s"] == 2.0
    assert got["distinct_merchants_10s"] == 1.0
    assert got["distinct_countries_10s"] == 1.0
    assert got["seconds_since_last"] == 2.0


def test_window_edge_excludes_exactly_w_seconds_old(make_store: Factory) -> None:
    """A transaction exactly W seconds old has left the window; a hair younger has not."""
    store = make_store(SMALL)
    store.observe(ev("a", 1000, 1))
    store.observe(ev("b", 1000.5, 2))
    got = store.observe(ev("c", 1010, 4))["customer"]
    assert got["count_10s"] == 1.0
    assert got["sum_10s"] == 2.0
    assert got["count_100s"] == 2.0


def test_never_sees_itself_or_later_transactions(make_store: Factory) -> None:
    """A late arrival is scored on earlier transactions only; later ones then see it."""
    store = make_store(SMALL)
    store.observe(ev("a", 1000, 1))
    store.observe(ev("c", 1010, 4))
    late = store.observe(ev("b", 1005, 2))["customer"]
    assert late["count_100s"] == 1.0
    assert late["sum_100s"] == 1.0
    assert late["seconds_since_last"] == 5.0
    after = store.observe(ev("d", 1012, 8))["customer"]
    assert after["count_100s"] == 3.0
    assert after["sum_100s"] == 7.0
    assert after["count_10s"] == 2.0  # b (7 s old) and c; a is 12 s old


def test_equal_timestamps_are_ordered_by_transaction_id(make_store: Factory) -> None:
    """Ties in event time go by transaction_id, whatever the arrival order."""
    store = make_store(SMALL)
    second = store.observe(ev("tx-b", 1000, 2))["customer"]
    first = store.observe(ev("tx-a", 1000, 1))["customer"]
    third = store.observe(ev("tx-c", 1000, 4))["customer"]
    assert first["count_10s"] == 0.0
    assert second["count_10s"] == 0.0  # tx-a had not arrived yet
    assert third["count_10s"] == 2.0
    assert third["seconds_since_last"] == 0.0


def test_redelivery_is_counted_once(make_store: Factory) -> None:
    """The same transaction_id twice: same features, recorded once."""
    store = make_store(SMALL)
    store.observe(ev("a", 1000, 5))
    first = store.observe(ev("b", 1001, 7))
    again = store.observe(ev("b", 1001, 7))
    assert again == first
    after = store.observe(ev("c", 1002, 1))["customer"]
    assert after["count_10s"] == 2.0
    assert after["sum_10s"] == 12.0


def test_redelivery_logs_that_it_was_not_counted(
    make_store: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """Dropping a duplicate is visible in the log."""
    store = make_store(SMALL)
    store.observe(ev("a", 1000))
    with caplog.at_level(logging.INFO):
        store.observe(ev("a", 1000))
    assert "transaction a already recorded for customer: scored, not counted again" in caplog.text


def test_too_late_is_scored_but_not_recorded(
    make_store: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """Beyond the allowed lateness a transaction gets features but does not count."""
    store = make_store(SMALL)
    store.observe(ev("a", 1000, 1))
    store.observe(ev("b", 1050, 2))
    with caplog.at_level(logging.WARNING):
        late = store.observe(ev("x", 1029, 4))["customer"]  # 21 s behind, lateness 20
    assert late["count_100s"] == 1.0
    assert "transaction x is" in caplog.text and "scored, not recorded" in caplog.text
    on_time = store.observe(ev("y", 1030, 8))["customer"]  # exactly 20 s behind: accepted
    assert on_time["count_100s"] == 1.0
    after = store.observe(ev("c", 1051, 16))["customer"]
    assert after["count_100s"] == 3.0
    assert after["sum_100s"] == 11.0
    assert store.record_label("x", True) is LabelOutcome.UNKNOWN


def test_label_outcomes(make_store: Factory, caplog: pytest.LogCaptureFixture) -> None:
    """Applied, duplicate, changed and unknown labels are told apart and logged."""
    store = make_store(SMALL)
    store.observe(ev("a", 1000))
    with caplog.at_level(logging.INFO):
        outcomes = [
            store.record_label("a", True),
            store.record_label("a", True),
            store.record_label("a", False),
            store.record_label("nope", True),
        ]
    assert outcomes == ["applied", "duplicate", "changed", "unknown"]
    assert "label True for a: applied" in caplog.text
    assert "label True for nope: unknown" in caplog.text


def test_labels_feed_risk_of_later_transactions(make_store: Factory) -> None:
    """Fraud counts and shares move with labels, by transaction time, per entity."""
    store = make_store(SMALL)
    store.observe(ev("a", 1000, terminal="t1"))
    store.observe(ev("b", 1050, terminal="t1", customer="c2"))
    store.observe(ev("c", 1095, terminal="t2"))
    before = store.observe(ev("d", 1096, terminal="t1"))
    assert before["terminal"]["fraud_count_100s"] == 0.0
    assert store.record_label("a", True) is LabelOutcome.APPLIED
    assert store.record_label("b", True) is LabelOutcome.APPLIED
    assert store.record_label("c", False) is LabelOutcome.APPLIED
    got = store.observe(ev("e", 1097, terminal="t1"))
    assert got["customer"]["fraud_count_100s"] == 1.0
    assert got["customer"]["fraud_share_100s"] == 1.0 / 3.0
    assert got["customer"]["fraud_count_10s"] == 0.0
    assert got["terminal"]["fraud_count_100s"] == 2.0
    assert got["terminal"]["fraud_share_100s"] == 2.0 / 3.0
    assert store.record_label("a", False) is LabelOutcome.CHANGED
    later = store.observe(ev("f", 1099, terminal="t1"))
    assert later["customer"]["fraud_count_100s"] == 0.0
    assert later["terminal"]["fraud_count_100s"] == 1.0
    # a (1000) leaves the 100 s window at 1100; b stays.
    assert store.record_label("a", True) is LabelOutcome.CHANGED
    gone = store.observe(ev("g", 1100, terminal="t1"))
    assert gone["terminal"]["fraud_count_100s"] == 1.0


def testneeded_features_limits_the_features(make_store: Factory) -> None:
    """Only the requested features come back, for each entity; state is recorded anyway."""
    store = make_store(SMALL)
    store.observe(ev("a", 1000, 3, terminal="t"), needed=frozenset({"count_10s"}))
    got = store.observe(
        ev("b", 1001, 6, terminal="t"), needed=frozenset({"count_10s", "amount_ratio_100s"})
    )
    assert got == {
        "customer": {"count_10s": 1.0, "amount_ratio_100s": 2.0},
        "terminal": {"count_10s": 1.0, "amount_ratio_100s": 2.0},
    }


def test_gap_looks_back_retention_minus_lateness(make_store: Factory) -> None:
    """seconds_since_last reaches back beyond the longest window, up to its limit."""
    config = StateConfig(windows=(10,), allowed_lateness=5, retention=100)
    store = make_store(config)
    store.observe(ev("a", 1000))
    assert store.observe(ev("b", 1094))["customer"]["seconds_since_last"] == 94.0
    store.observe(ev("c", 1200, customer="c2"))
    assert "seconds_since_last" not in store.observe(ev("d", 1200))["customer"]


def test_exact_amount_sums_do_not_drift(make_store: Factory) -> None:
    """Cents summed and expired many times give exact sums."""
    store = make_store(StateConfig(windows=(10,), allowed_lateness=0))
    for i in range(60):
        got = store.observe(ev(f"t{i:03d}", 1000 + i, 0.1))["customer"]
    assert sum([0.1] * 9) != 0.9  # what a running float sum would give
    assert got["sum_10s"] == 0.9
    assert got["mean_10s"] == 0.9 / 9


def test_lateness_is_per_entity(make_store: Factory) -> None:
    """A timestamp far ahead moves the clock of the entities it names only: a transaction
    too late for that card is still recorded for its customer, and other entities go on."""
    store = make_store(SMALL)
    store.observe(ev("a", 1000, 1, card="k1"))
    store.observe(ev("future", 1_000_000, 2, customer="c9", card="k1"))
    store.observe(ev("b", 1001, 4, card="k1"))  # too late for k1 only
    got = store.observe(ev("c", 1002, 8, card="k1", terminal="t1"))
    assert got["customer"]["count_10s"] == 2.0  # a and b
    assert got["card"]["count_10s"] == 0.0  # k1 is at 1,000,000 now
    assert store.record_label("b", True) is LabelOutcome.APPLIED  # c1 holds it
    assert store.observe(ev("d", 1003, 1))["customer"]["fraud_count_10s"] == 1.0
    for i in range(30):  # nobody else's transactions are late
        got = store.observe(ev(f"e{i}", 1010 + i, 1, customer="c2", terminal="t1"))
    assert got["terminal"]["count_100s"] == 30.0


def test_an_entity_holds_an_id_for_the_retention_after_it_by_its_own_clock(
    make_store: Factory,
) -> None:
    """Redelivery and labels go by each entity's own newest, not by other entities' time:
    an entity counts a transaction once until its own newest is the retention after it."""
    config = StateConfig(windows=(100,), allowed_lateness=10)  # retention 110 s
    store = make_store(config)
    store.observe(ev("x", 0.0, 5.0, customer="a"))
    store.observe(ev("y", 500.0, 1.0, customer="b"))  # b far ahead: a still holds x
    assert store.record_label("x", True) is LabelOutcome.APPLIED
    first = store.observe(ev("z", 50.0, 1.0, customer="a"))["customer"]
    store.observe(ev("x", 0.0, 5.0, customer="a"))  # redelivered: not counted again
    later = store.observe(ev("w", 51.0, 1.0, customer="a"))["customer"]
    assert (first["count_100s"], first["fraud_count_100s"]) == (1.0, 1.0)
    assert (later["count_100s"], later["fraud_count_100s"]) == (2.0, 1.0)
    store.observe(ev("v", 110.0, 1.0, customer="a"))  # a's newest: x is past its retention
    assert store.record_label("x", False) is LabelOutcome.UNKNOWN


# --- property: every store agrees with a brute-force model ---------------------------------


Entity = tuple[str, str]


@dataclass
class Oracle:
    """The specification, by brute force over everything each entity recorded."""

    config: StateConfig
    recorded: dict[Entity, dict[str, Event]] = field(default_factory=dict)
    newest: dict[Entity, float] = field(default_factory=dict)
    labels: dict[str, bool] = field(default_factory=dict)
    latest: float = -math.inf  # the newest timestamp recorded by any entity
    # Entities a store may have forgotten as idle (their newest more than the retention
    # behind the latest): their features are no longer predicted.
    idle: set[Entity] = field(default_factory=set)

    def _age(self, entity: Entity) -> None:
        if self.newest.get(entity, math.inf) <= self.latest - self.config.keep:
            self.idle.add(entity)

    def _holds(self, entity: Entity, txid: str) -> bool:
        held = self.recorded.get(entity, {}).get(txid)
        return held is not None and held.timestamp > self.newest[entity] - self.config.keep

    def observe(self, event: Event) -> dict[str, dict[str, float]]:
        """Expected features of the entities whose features are predicted: those not idle
        and for which the event is not too late (its windows may reach forgotten state)."""
        expected = {}
        record = []
        for kind, ident in entities_of(event):
            entity = (kind, ident)
            self._age(entity)
            newest = self.newest.get(entity)
            late = newest is not None and event.timestamp < newest - self.config.allowed_lateness
            if late:
                continue
            if entity not in self.idle:
                expected[kind] = self.features(entity, event)
            if not self._holds(entity, event.transaction_id):
                record.append(entity)
        for entity in record:
            self.recorded.setdefault(entity, {})[event.transaction_id] = event
            self.newest[entity] = max(self.newest.get(entity, -math.inf), event.timestamp)
            self.latest = max(self.latest, event.timestamp)
        return expected

    def label(self, txid: str, is_fraud: bool) -> set[str]:
        """Acceptable outcomes: a store may forget idle entities."""
        holders = [entity for entity in self.recorded if self._holds(entity, txid)]
        if not holders:
            return {"unknown"}
        for entity in holders:
            self._age(entity)
        old = self.labels.get(txid)
        self.labels[txid] = is_fraud
        outcome = "applied" if old is None else "duplicate" if old == is_fraud else "changed"
        if all(entity in self.idle for entity in holders):
            return {outcome, "unknown"}
        return {outcome}

    def features(self, entity: Entity, event: Event) -> dict[str, float]:
        kind = entity[0]
        key = (event.timestamp, event.transaction_id)
        prior = [
            p
            for p in self.recorded.get(entity, {}).values()
            if (p.timestamp, p.transaction_id) < key and p.transaction_id != event.transaction_id
        ]
        out: dict[str, float] = {}
        for window in self.config.windows:
            s = window_name(window)
            inside = [p for p in prior if p.timestamp > event.timestamp - window]
            count = len(inside)
            total = sum(micros(p.amount) for p in inside) / 1_000_000
            fraud = sum(1 for p in inside if self.labels.get(p.transaction_id))
            mean = total / count if count else 0.0
            out[f"count_{s}"] = float(count)
            out[f"sum_{s}"] = total
            out[f"mean_{s}"] = mean
            out[f"max_{s}"] = max((p.amount for p in inside), default=0.0)
            if mean > 0:
                out[f"amount_ratio_{s}"] = event.amount / mean
            out[f"fraud_count_{s}"] = float(fraud)
            out[f"fraud_share_{s}"] = fraud / count if count else 0.0
            for attr, name in (
                ("terminal", "distinct_terminals"),
                ("merchant", "distinct_merchants"),
                ("country", "distinct_countries"),
            ):
                if attr != kind:
                    values = {getattr(p, attr) for p in inside} - {None}
                    out[f"{name}_{s}"] = float(len(values))
        lookback = self.config.keep - self.config.allowed_lateness
        recent = [p.timestamp for p in prior if p.timestamp > event.timestamp - lookback]
        if recent:
            out["seconds_since_last"] = event.timestamp - max(recent)
        return out


def run_against_oracle(
    store: StateStore, steps: list[tuple[str, object]], needed: frozenset[str] | None = None
) -> None:
    oracle = Oracle(PROPERTY_CONFIG)
    for kind, step in steps:
        if kind == "label":
            txid, is_fraud = step  # type: ignore[misc]
            assert store.record_label(txid, is_fraud) in oracle.label(txid, is_fraud)
        else:
            assert isinstance(step, Event)
            got = store.observe(step, needed)
            expected = oracle.observe(step)
            assert set(expected) <= set(got), step
            for entity, values in expected.items():
                if needed is not None:
                    values = {name: v for name, v in values.items() if name in needed}
                assert got[entity] == values, (step, entity)


@pytest.mark.parametrize("native", NATIVE)
@settings(max_examples=200, deadline=None)
@given(steps=streams(), needed=needed_features)
def test_memory_store_matches_the_specification(
    native: bool, steps: list[tuple[str, object]], needed: frozenset[str] | None
) -> None:
    """Random streams with jitter, ties, redeliveries and labels: memory store == model."""
    run_against_oracle(MemoryStore(PROPERTY_CONFIG, native=native), steps, needed)


@pytest.mark.parametrize("native", NATIVE)
@settings(max_examples=200, deadline=None)
@given(steps=streams(), asks=st.lists(needed_features, min_size=2, max_size=4), data=st.data())
def test_memory_store_stays_exact_when_callers_ask_for_new_features(
    native: bool,
    steps: list[tuple[str, object]],
    asks: list[frozenset[str] | None],
    data: st.DataObject,
) -> None:
    """Each observe asks for one of several feature sets, so the store starts keeping
    distinct-value indexes mid-stream (rebuilt from the entities' histories): still exact."""
    store, oracle = MemoryStore(PROPERTY_CONFIG, native=native), Oracle(PROPERTY_CONFIG)
    for kind, step in steps:
        if kind == "label":
            txid, is_fraud = step  # type: ignore[misc]
            assert store.record_label(txid, is_fraud) in oracle.label(txid, is_fraud)
            continue
        assert isinstance(step, Event)
        needed = data.draw(st.sampled_from(asks))
        got = store.observe(step, needed)
        for entity, values in oracle.observe(step).items():
            assert got[entity] == {
                k: v for k, v in values.items() if needed is None or k in needed
            }, (step, needed)


def _as_items(features: dict[str, dict[str, float]]) -> list[tuple[str, list[tuple]]]:
    """Features with their order and types, which equality of dicts does not compare."""
    return [
        (kind, [(name, type(value), value) for name, value in values.items()])
        for kind, values in features.items()
    ]


@pytest.mark.skipif(not NATIVE_HISTORIES, reason="make native: not built")
@settings(max_examples=200, deadline=None)
@given(steps=streams(), needed=needed_features)
def test_c_and_python_histories_give_the_same_features_in_the_same_order(
    steps: list[tuple[str, object]], needed: frozenset[str] | None
) -> None:
    """Verdicts echo features (explanations, model inputs): the two must agree to the bit,
    key order and types included, and on label outcomes."""
    stores = [MemoryStore(PROPERTY_CONFIG, native=native) for native in (True, False)]
    for kind, step in steps:
        if kind == "label":
            txid, is_fraud = step  # type: ignore[misc]
            assert len({store.record_label(txid, is_fraud) for store in stores}) == 1
        else:
            assert isinstance(step, Event)
            c, python = (_as_items(store.observe(step, needed)) for store in stores)
            assert c == python, step


@pytest.mark.parametrize("sign", [1, -1])
def test_an_amount_beyond_64_bit_micros_moves_the_store_to_python(sign: int) -> None:
    """Amounts are valid up to the largest float, but the C arrays sum 64-bit micros: the
    store carries its histories over to Python lists and goes on, exactly. (A negative
    amount is invalid in a transaction, but the store takes what it is given.)"""
    stores = [MemoryStore(SMALL, native=native) for native in (True, False)]
    stream = [
        ev("a", 1.0, 10.0, terminal="t1"),
        ev("b", 2.0, 20.0, terminal="t2"),
        ev("c", 3.0, sign * 1e13, terminal="t1"),  # 1e19 micros > 2**63 - 1
        ev("d", 2.5, 5.0, terminal="t1"),  # out of order: the slow path, in Python
        ev("e", 4.0, 1e13, terminal="t2"),
    ]
    for index, event in enumerate(stream):
        if index == 1:
            for store in stores:
                assert store.record_label("a", True) is LabelOutcome.APPLIED
        got = [_as_items(store.observe(event)) for store in stores]
        assert got[0] == got[1], event
    assert not stores[0].native
    final = stores[0].observe(ev("f", 5.0, 1.0, terminal="t1"))
    assert final["customer"]["count_100s"] == 5.0
    assert final["customer"]["sum_100s"] == (1 + sign) * 1e13 + 35.0
    assert final["customer"]["fraud_count_100s"] == 1.0


@pytest.mark.skipif(not NATIVE_HISTORIES, reason="make native: not built")
def test_a_c_history_refuses_what_it_cannot_hold_and_never_disagrees_with_itself() -> None:
    """Event times must be finite and tracked values hashable: a step checks before it
    changes a C history, and a rebuild that cannot index a record empties the history, so
    that its indexes never disagree with its records (a crash, in C)."""
    config = StateConfig(windows=(5, 30), allowed_lateness=8, retention=40)
    store = MemoryStore(config)
    store.observe(ev("a", 1.0, 1.0, country=["not", "hashable"]), frozenset())  # untracked
    for i in range(20):
        store.observe(ev(f"b{i:02d}", 2.0 + i, 2.0 + i, country="FR"), frozenset())
    with pytest.raises(TypeError, match="unhashable"):
        store.track(None)  # starts indexing countries: rebuilds, meets the list
    with pytest.raises(TypeError, match="unhashable"):
        store.observe(ev("c", 22.0, 1.0, country=["x"]), None)
    with pytest.raises(ValueError, match="finite"):
        store.observe(ev("d", math.nan, 1.0, country="FR"), None)
    with pytest.raises(ValueError, match="finite"):
        store.observe(ev("e", math.inf, 1.0, customer="new", country="FR"), None)
    # The new customer's history stays, empty: forgetting passes drop it and go on.
    for i in range(200):
        store.observe(ev(f"f{i}", 24.0 + i, 1.0, customer="other", country="FR"), None)
    assert "new" not in store._customers
    assert len(store) <= 101  # ids forgotten: 40 s of retention + a pass every 60 s, 1/s
    # The history whose records the new index could not take was emptied, not left with
    # indexes that miss records.
    got = store.observe(ev("z", 224.0, 1.0, country="FR"), None)["customer"]
    assert (got["count_30s"], got["distinct_countries_30s"]) == (0.0, 0.0)
    got = store.observe(ev("y", 225.0, 1.0, country="FR"), None)["customer"]
    assert (got["count_30s"], got["max_30s"], got["distinct_countries_30s"]) == (1.0, 1.0, 1.0)


@pytest.fixture(params=list(REDIS_SERVERS))
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """URL of a single redis-server, then of a node of a three-master cluster."""
    url: str = request.getfixturevalue(REDIS_SERVERS[request.param])
    return url


@pytest.mark.integration
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=streams())
def test_redis_store_matches_the_specification(
    any_redis_url: str, steps: list[tuple[str, object]]
) -> None:
    """Random streams with jitter, ties, redeliveries and labels: Redis store == model,
    on one node and on a cluster."""
    store = RedisStore(PROPERTY_CONFIG, any_redis_url, prefix=unique("prop") + ":")
    try:
        run_against_oracle(store, steps)
    finally:
        store.close()


@pytest.mark.integration
def test_a_cluster_node_url_gets_a_cluster_client_and_entities_spread_over_nodes(
    redis_cluster_url: str, redis_url: str
) -> None:
    """REDIS_URL naming one node of a cluster works: the store sees cluster mode, and its
    keys land on every node, each entity's keys on one; a single server is no cluster."""
    prefix = unique("spread") + ":"
    store = RedisStore(SMALL, redis_cluster_url, prefix=prefix)
    assert store.cluster and not RedisStore(SMALL, redis_url).cluster
    for i in range(30):
        store.observe(ev(f"x{i}", 1000 + i, customer=f"c{i}", card=f"k{i % 3}"))
    assert store.record_label("x7", True) is LabelOutcome.APPLIED
    got = store.observe(ev("y", 1040, customer="c7", card="k1"))
    assert got["customer"]["fraud_count_100s"] == 1.0
    assert got["card"]["count_100s"] == 10.0
    cluster = redis.cluster.RedisCluster.from_url(redis_cluster_url)
    nodes = {}
    for node in cluster.get_primaries():
        keys = cluster.scan_iter(match=prefix + "*", target_nodes=node)
        nodes[node.name] = {key.split(b"}")[0] for key in keys}
    assert all(nodes.values())  # every node holds some
    tags = [tag for held in nodes.values() for tag in held]
    assert len(tags) == len(set(tags))  # and no entity is split
    store.drop()
    assert not list(cluster.scan_iter(match=prefix + "*"))
    cluster.close()
    store.close()


# --- memory bounds, Redis specifics -------------------------------------------------------


def test_a_timestamp_far_ahead_does_not_make_the_memory_store_forget() -> None:
    """Forgetting idle entities goes by the median time of the latest transactions: one
    transaction dated far ahead neither forgets the others' history nor stops forgetting."""
    store = MemoryStore(StateConfig(windows=(100,), allowed_lateness=10))
    seen: list[float] = []
    for i in range(2_000):
        if i == 300:
            store.observe(ev("future", 1e9, 1.0, customer="elsewhere"))
        got = store.observe(ev(f"t{i}", float(i), 1.0, customer=f"c{i % 3}"))["customer"]
        if i % 3 == 0:
            assert got["count_100s"] == sum(1 for when in seen if when > i - 100), i
            seen.append(float(i))
    assert len(store) <= 110 + 60 + 64 + 1  # retention, a pass, the clock's lag, the future


def test_memory_store_forgets_beyond_retention() -> None:
    """A long stream over many entities keeps only about a retention's worth of state."""
    config = StateConfig(windows=(100,), allowed_lateness=10)
    store = MemoryStore(config)
    for i in range(20_000):
        store.observe(ev(f"t{i}", float(i), 1.0, customer=f"c{i % 5000}", terminal=f"t{i % 7}"))
    # Forgetting runs every max(retention / 8, 60 s) of event time, by a clock 32 s behind
    # (the median of the latest 63 transactions): at most 110 + 60 + 32 s kept.
    assert 110 <= len(store) <= 203
    assert store.entity_count <= 7 + 203
    got = store.observe(ev("last", 20_000.0, 1.0, customer="c0", terminal="t0"))
    assert got["terminal"]["count_100s"] == 15.0  # i % 7 == 0 in (19900, 20000)


def test_memory_store_forgets_in_slices_and_stays_exact() -> None:
    """Ten transactions a second over 5,000 customers: each forgetting pass has ~1,100
    entities and ~600 expired ids to visit, more than one slice of each, spread over the
    following transactions. Memory stays bounded and the windows exact."""
    config = StateConfig(windows=(100,), allowed_lateness=10)
    store = MemoryStore(config)
    recent: list[tuple[float, str]] = []
    for i in range(40_000):
        ts = i / 10
        terminal = f"t{i % 7}"
        got = store.observe(ev(f"t{i}", ts, 1.0, customer=f"c{i % 5000}", terminal=terminal))
        if terminal == "t0":
            expected = sum(1 for when, _ in recent if when > ts - 100)
            assert got["terminal"]["count_100s"] == float(expected), i
            recent.append((ts, terminal))
    # 110 s of retention and a pass every 60 s, at 10 transactions a second, plus the clock's
    # lag (32 transactions) and the slices of a pass still under way.
    assert 1_100 <= len(store) <= 1_732 + 2 * SWEEP_SLICE
    assert store.entity_count <= 7 + 1_732 + 2 * SWEEP_SLICE


@pytest.mark.integration
def test_redis_keys_expire(redis_url: str) -> None:
    """Every key the Redis store writes carries a TTL of at most the retention."""
    config = StateConfig(windows=(100,), allowed_lateness=10)
    prefix = unique("ttl") + ":"
    store = RedisStore(config, redis_url, prefix=prefix)
    store.observe(ev("a", 1000, terminal="t1"))
    store.record_label("a", True)
    client = redis.Redis.from_url(redis_url)
    keys = client.keys(prefix + "*")
    # The label index, and for customer and terminal: history, ids, fraud set.
    assert len(keys) == 7
    assert all(0 < client.ttl(key) <= 110 for key in keys)
    slots: dict[bytes, set[int]] = {}
    for key in keys:
        slots.setdefault(key.split(b"}")[0], set()).add(key_slot(key))
    assert sorted(slots) == [
        prefix.encode() + tag for tag in (b"{customer:c1", b"{t:a", b"{terminal:t1")
    ]
    assert all(len(one) == 1 for one in slots.values())  # each entity's keys in one slot
    client.close()
    store.close()


@pytest.mark.integration
def test_redis_prefix_isolates_stores(redis_url: str) -> None:
    """Two prefixes on one server do not see each other's transactions."""
    one = RedisStore(SMALL, redis_url, prefix=unique("iso") + ":")
    two = RedisStore(SMALL, redis_url, prefix=unique("iso") + ":")
    one.observe(ev("a", 1000))
    assert two.observe(ev("b", 1001))["customer"]["count_10s"] == 0.0
    one.close()
    two.close()


def test_unreachable_redis_fails_with_the_url_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    """No server: StoreUnavailable names the URL without its password, and why; so does the log."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    store = open_store(SMALL, url)
    with caplog.at_level(logging.ERROR), pytest.raises(StoreUnavailable) as caught:
        store.observe(ev("a", 1000))
    assert f"redis at redis://:***@127.0.0.1:{port}/0 unreachable during observe" in caplog.text
    assert "s3cret" not in caplog.text
    message = str(caught.value)
    assert message.startswith(f"redis at redis://:***@127.0.0.1:{port}/0 unreachable: ")
    assert "s3cret" not in message
    assert "refused" in message.lower()
    assert isinstance(caught.value, ConnectionError) and isinstance(caught.value, TransientError)
    with pytest.raises(StoreUnavailable):
        store.record_label("a", True)
    store.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://user:pw@10.0.0.3:6379", "redis://user:***@10.0.0.3:6379"),
        ("rediss://:pw@host/1", "rediss://:***@host/1"),
    ],
)
def test_redact_hides_only_the_password(url: str, shown: str) -> None:
    """Logs and errors show where Redis is, never its password."""
    assert redact(url) == shown


@pytest.mark.parametrize("tiled", [True, False])
def test_open_store_picks_the_configured_windows_in_memory_or_redis(
    redis_url: str, tiled: bool
) -> None:
    """No REDIS_URL: state lives in process memory; tiled windows unless configured exact."""
    config = dataclasses.replace(SMALL, tiled=tiled)
    memory = open_store(config, None)
    assert type(memory) is (TiledMemoryStore if tiled else MemoryStore)
    shared = open_store(config, redis_url, prefix=unique("pick") + ":")
    assert type(shared) is (RedisTiledStore if tiled else RedisStore)
    assert shared.prefix.startswith("pick")  # type: ignore[attr-defined]
    shared.close()


def test_distinct_counts_stay_exact_when_first_asked_late(make_store: Factory) -> None:
    """Recording without distinct features, then asking for them, counts everything seen."""
    store = make_store(SMALL)
    only_count = frozenset({"count_100s"})
    for i, terminal in enumerate(["t1", "t2", "t1", "t3"]):
        store.observe(ev(f"a{i}", 1000 + i, terminal=terminal, country="FR"), needed=only_count)
    got = store.observe(ev("b", 1010, terminal="t4"))
    assert got["customer"]["distinct_terminals_100s"] == 3.0
    assert got["customer"]["distinct_countries_10s"] == 1.0
    after = store.observe(ev("c", 1011, terminal="t1"))
    assert after["customer"]["distinct_terminals_100s"] == 4.0


def test_concurrent_redeliveries_count_once(make_store: Factory) -> None:
    """Threads delivering the same transactions at once (like several instances): each once."""
    config = StateConfig(windows=(1000,), allowed_lateness=1000)
    events = [ev(f"t{i:03d}", 1000 + i, 1.0 + i % 3) for i in range(150)]
    stores = [make_store(config) for _ in range(4)]
    if isinstance(stores[0], RedisStore):
        for store in stores[1:]:
            assert isinstance(store, RedisStore)
            store.prefix = stores[0].prefix  # one shared Redis keyspace
    else:
        stores = [stores[0]] * 4  # one process, many threads

    def deliver(store: StateStore, order: list[Event]) -> None:
        for event in order:
            store.observe(event)

    orders = [events, events[::-1], events[::2] + events[1::2], events[1::2] + events[::2]]
    threads = [
        threading.Thread(target=deliver, args=(store, order))
        for store, order in zip(stores, orders, strict=True)
    ]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that races would show
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    got = stores[0].observe(ev("last", 1200, 1.0))["customer"]
    assert got["count_1000s"] == 150.0
    assert got["sum_1000s"] == sum(e.amount for e in events)


def test_observe_many_is_observe_one_by_one(make_store: Factory) -> None:
    """A batch, redeliveries and late events included, gets the features of single calls."""
    events = [
        ev("a", 100, 5.0, card="k1", terminal="t1"),
        ev("b", 101, 7.0, card="k1", terminal="t2"),
        ev("a", 100, 5.0, card="k1", terminal="t1"),  # redelivered within the batch
        ev("c", 130, 1.0, card="k2", terminal="t1"),
        ev("d", 90, 2.0, card="k1", terminal="t1"),  # late for the customer (at 130), not k1
        ev("e", 20, 3.0, card="k1"),  # too late: scored, not recorded
        ev("f", 131, 4.0, card="k1", terminal="t2", country="FR"),
    ]
    one, many = make_store(), make_store()
    expected = [one.observe(e) for e in events]
    got = many.observe_many(events[:3]) + many.observe_many([]) + many.observe_many(events[3:])
    assert got == expected
    assert got[1]["card"]["count_10s"] == 1.0  # b sees a
    assert got[2] == got[0]  # the redelivery is scored like the first delivery
    assert got[-1]["card"]["count_100s"] == 3.0  # f sees a, b and d; e came too late
    assert got[-1]["customer"]["count_100s"] == 3.0  # a, b and c: d came too late for c1
