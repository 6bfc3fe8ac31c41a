"""The tiled stores: the same features as the tiled definition, at a cost flat in history."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from detector.state import Event, LabelOutcome, LabelPlace, StateConfig
from detector.state.base import (
    DISTINCT,
    FeatureBuilder,
    Features,
    Label,
    Raw,
    combine_outcomes,
    entities_of,
    feature_names,
    micros,
    wanted,
)
from detector.state.memory_tiled import NATIVE_TILES, TiledMemoryStore
from detector.state.redis_tiled import RedisTiledStore
from detector.state.tiles import RING, tile_width
from stack.services import script_time, unique
from tests.helpers.state import PROPERTY_CONFIG, streams

#: Minute and hour tiles: a 10-minute and a 1-day window.
HOURS_CONFIG = StateConfig(windows=(600, 86400), allowed_lateness=300)

REDIS_SERVERS = {"redis": "redis_url", "redis-cluster": "redis_cluster_url"}

Store = TiledMemoryStore | RedisTiledStore
Factory = Callable[[StateConfig], Store]


def test_the_c_entities_are_used_where_built() -> None:
    assert TiledMemoryStore().native is NATIVE_TILES
    assert not TiledMemoryStore(native=False).native


@pytest.fixture(params=["memory-c", "memory-python", *REDIS_SERVERS])
def make_store(request: pytest.FixtureRequest) -> Iterator[Factory]:
    """Builds tiled stores of one kind, each Redis one under a fresh key prefix."""
    opened: list[Store] = []
    if request.param == "memory-c" and not NATIVE_TILES:
        pytest.skip("make native: the C tiles are not built")
    memory = request.param.startswith("memory")
    url = None if memory else request.getfixturevalue(REDIS_SERVERS[request.param])

    def factory(config: StateConfig) -> Store:
        store: Store
        if url is None:
            store = TiledMemoryStore(config, native=request.param == "memory-c")
        else:
            store = RedisTiledStore(config, url, prefix=unique("tiled") + ":")
        opened.append(store)
        return store

    yield factory
    for store in opened:
        if isinstance(store, RedisTiledStore):
            store.drop()
        store.close()


class _Reference:
    """The tiled definition computed by brute force from every recorded transaction."""

    def __init__(self, config: StateConfig) -> None:
        self.config = config
        self.builder = FeatureBuilder(config.windows)
        self.horizon: dict[int, float] = {}
        for window in config.windows:
            width = tile_width(window)
            longest = max(w for w in config.windows if tile_width(w) == width)
            self.horizon[width] = longest + config.allowed_lateness
        self.recorded: dict[tuple[str, str], dict[str, tuple[Event, int]]] = {}
        self.index: dict[str, list[tuple[str, str]]] = {}
        self.times: dict[str, float] = {}
        # The memory store may forget an entity whose newest is the retention behind the
        # newest recorded anywhere: from then on its features are not predicted there.
        self.latest = -math.inf
        self.idle: set[tuple[str, str]] = set()

    def _age(self, entity: tuple[str, str]) -> bool:
        rows = self.recorded.get(entity)
        if rows and max(e.timestamp for e, _ in rows.values()) <= self.latest - self.config.keep:
            self.idle.add(entity)
        return entity in self.idle

    def _held(self, entity: tuple[str, str], txid: str) -> tuple[Event, int] | None:
        rows = self.recorded.get(entity, {})
        row = rows.get(txid)
        newest = max(e.timestamp for e, _ in rows.values()) if rows else -math.inf
        if row is not None and row[0].timestamp > newest - self.config.keep:
            return row
        return None

    def observe(self, event: Event) -> tuple[Features, set[str]]:
        """The features, and the kinds whose entity the memory store may have forgotten."""
        config = self.config
        out: Features = {}
        idle = set()
        for entity in entities_of(event):
            kind = entity[0]
            if self._age(entity):
                idle.add(kind)
            rows = self.recorded.setdefault(entity, {})
            newest = max((e.timestamp for e, _ in rows.values()), default=None)
            held = self._held(entity, event.transaction_id)
            # A redelivery is decided at the timestamp it was recorded with.
            ts = event.timestamp if held is None else held[0].timestamp
            raws: list[Raw] = []
            for window in config.windows:
                width = tile_width(window)
                n = window // width
                k = math.floor(ts / width)
                edge = (
                    -math.inf
                    if newest is None
                    else math.floor((newest - self.horizon[width]) / width)
                )
                inside = [
                    (e, label)
                    for e, label in rows.values()
                    if k - n < math.floor(e.timestamp / width) <= k
                    and math.floor(e.timestamp / width) >= edge
                ]
                count = len(inside)
                total = sum(micros(e.amount) for e, _ in inside)
                high = max((e.amount for e, _ in inside), default=-math.inf)
                fraud = sum(1 for _, label in inside if label == 1)
                if held is not None and k >= edge:
                    count -= 1
                    total -= micros(held[0].amount)
                    fraud -= held[1] == 1
                distinct = []
                for attr in ("terminal", "merchant", "country"):
                    newest_tile: dict[str, int] = {}
                    for e, _ in rows.values():
                        value = getattr(e, attr)
                        if value is not None and attr in DISTINCT[kind]:
                            tile = math.floor(e.timestamp / width)
                            newest_tile[value] = max(newest_tile.get(value, tile), tile)
                    distinct.append(sum(1 for i in newest_tile.values() if i > k - n and i >= edge))
                raws.append((count, total, high, fraud, *distinct))  # type: ignore[arg-type]
            ring = sorted(((e.timestamp, e.transaction_id) for e, _ in rows.values()))[-RING:]
            before = [s for s in ring if s < (ts, event.transaction_id)]
            lookback = config.keep - config.allowed_lateness
            gap = None
            if before and before[-1][0] > ts - lookback:
                gap = ts - before[-1][0]
            out[kind] = self.builder.build(kind, event.amount, raws, gap)
            late = newest is not None and event.timestamp < newest - config.allowed_lateness
            if held is None and not late:
                rows[event.transaction_id] = (event, -1)
                self.latest = max(self.latest, event.timestamp)
        self.index[event.transaction_id] = entities_of(event)
        self.times[event.transaction_id] = event.timestamp
        return out, idle

    def record_label(self, txid: str, is_fraud: bool) -> tuple[LabelOutcome, bool]:
        """The outcome, and whether it is predicted for the memory store: not when the label
        names an entity it may have forgotten (and then recorded afresh)."""
        outcomes = []
        predicted = True
        for entity in self.index.get(txid, []):
            predicted = predicted and not self._age(entity)
            held = self._held(entity, txid)
            if held is None:
                continue
            label = int(is_fraud)
            if held[1] == label:
                outcomes.append(LabelOutcome.DUPLICATE.value)
            else:
                outcomes.append(
                    LabelOutcome.APPLIED.value if held[1] == -1 else LabelOutcome.CHANGED.value
                )
                self.recorded[entity][txid] = (held[0], label)
        return combine_outcomes(outcomes), predicted


@st.composite
def scaled_streams(draw: st.DrawFn) -> tuple[StateConfig, list[tuple[str, object]]]:
    """A random stream with second tiles, or stretched over days for minute and hour tiles;
    some redeliveries carry another timestamp."""
    steps = draw(streams(retimed=True))
    if draw(st.booleans()):
        return PROPERTY_CONFIG, steps
    scale = draw(st.sampled_from([60, 1000, 7000]))
    start = 1_700_000_000.0
    stretched: list[tuple[str, object]] = []
    for kind, step in steps:
        if kind == "event":
            assert isinstance(step, Event)
            step = step._replace(timestamp=start + step.timestamp * scale)
        stretched.append((kind, step))
    return HOURS_CONFIG, stretched


Reads = dict[str, frozenset[str] | None]

#: Feature names of every window the property streams use.
_NAMES = sorted(feature_names({*PROPERTY_CONFIG.windows, *HOURS_CONFIG.windows}))


@st.composite
def declared_reads(draw: st.DrawFn) -> Reads:
    """What a detector may declare it reads: per kind nothing, everything, or some names."""
    reads: Reads = {}
    for kind in DISTINCT:
        choice = draw(st.sampled_from(["none", "all", "some"]))
        if choice == "all":
            reads[kind] = None
        elif choice == "some":
            reads[kind] = frozenset(draw(st.sets(st.sampled_from(_NAMES), min_size=1)))
    return reads


def _only(features: dict[str, float], names: frozenset[str] | None) -> dict[str, float]:
    return features if names is None else {n: v for n, v in features.items() if n in names}


@settings(
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    case=scaled_streams(),
    batched=st.booleans(),
    placed=st.booleans(),
    reads=st.lists(st.tuples(st.floats(0, 1), declared_reads()), max_size=3),
)
def test_features_and_labels_follow_the_tiled_definition(
    make_store: Factory,
    case: tuple[StateConfig, list[tuple[str, object]]],
    batched: bool,
    placed: bool,
    reads: list[tuple[float, Reads]],
) -> None:
    """Any stream gives the reference's features and label outcomes, one by one or in batches,
    labels through the index or placed as a chargeback places them; with reads declared on the
    way (a store may then skip what is not read), the features read are still the reference's."""
    config, steps = case
    reference = _Reference(config)
    store = make_store(config)
    forgets = isinstance(store, TiledMemoryStore)  # idle entities, by its own clock
    batch: list[Event] = []
    expected: list[tuple[Features, set[str]]] = []
    declared: Reads | None = None
    changes = sorted(
        ((int(at * len(steps)), declared) for at, declared in reads), key=lambda c: c[0]
    )

    labels: list[Label] = []  # in a batch: recorded among its events
    outcomes: list[tuple[LabelOutcome, bool]] = []

    def flush() -> None:
        got, said = store.observe_labelled(batch, labels)
        for outcome, (want_outcome, predicted) in zip(said, outcomes, strict=True):
            assert outcome == want_outcome or (forgets and not predicted)
        for features, (want, idle) in zip(got, expected, strict=True):
            if forgets:
                features = {kind: f for kind, f in features.items() if kind not in idle}
                want = {kind: f for kind, f in want.items() if kind not in idle}
            if declared is not None:
                want = {kind: _only(f, wanted(declared, kind, None)) for kind, f in want.items()}
            assert features == want
        batch.clear()
        expected.clear()
        labels.clear()
        outcomes.clear()

    for position, (kind, step) in enumerate(steps):
        while changes and changes[0][0] <= position:
            flush()
            declared = changes.pop(0)[1]
            store.declare_reads(declared)
        if kind == "event":
            assert isinstance(step, Event)
            expected.append(reference.observe(step))
            batch.append(step)
            if not batched:
                flush()
        else:
            assert isinstance(step, tuple)
            txid, is_fraud = step
            outcome, predicted = reference.record_label(txid, is_fraud)
            place = None
            if placed and txid in reference.times:  # as a chargeback gives it: no index
                place = LabelPlace(reference.times[txid], tuple(reference.index[txid]))
            if batched:  # among the batch's events, as a replay records them
                labels.append(Label(len(batch), txid, is_fraud, place))
                outcomes.append((outcome, predicted))
            else:
                got = store.record_label(txid, is_fraud, place)
                assert got == outcome or (forgets and not predicted)
    flush()


def test_an_entitys_keys_share_one_slot_and_expire(redis_url: str) -> None:
    """Every key a transaction writes is in its entity's slot (or the index's) with a TTL."""
    config = StateConfig()
    store = RedisTiledStore(config, redis_url, prefix=unique("tiled") + ":")
    event = Event("x1", 1_700_000_000.0, 12.5, "c1", "k1", "t1", "m1", "FR")
    store.observe(event)
    store.record_label("x1", True)
    client = redis.Redis.from_url(redis_url)
    keys = [key.decode() for key in client.scan_iter(match=store.prefix + "*")]
    by_tag: dict[str, set[int]] = {}
    for key in keys:
        tag = key[key.index("{") + 1 : key.index("}")]
        by_tag.setdefault(tag, set()).add(key_slot(key.encode()))
        assert 0 < client.ttl(key) <= math.ceil(config.keep)
    assert set(by_tag) == {"customer:c1", "card:k1", "terminal:t1", "merchant:m1", "t:x1"}
    assert all(len(slots) == 1 for slots in by_tag.values())
    store.drop()
    store.close()


def _server_usec_per_script(url: str, history: int) -> float:
    """Server µs per script of 200 transactions of a merchant after `history` earlier ones."""
    client = redis.Redis.from_url(url)
    store = RedisTiledStore(StateConfig(), url, prefix=unique("tiled") + ":")
    start = 1_700_000_000.0
    spacing = 20 * 86400 / history
    earlier = [
        Event(f"h{i}", start + i * spacing, 1.0 + i % 97, merchant="busy", terminal=f"t{i % 7}")
        for i in range(history)
    ]
    for at in range(0, len(earlier), 500):
        store.observe_many(earlier[at : at + 500])
    later = [
        Event(f"n{i}", start + 20 * 86400 + i * 30, 1.0 + i % 89, merchant="busy")
        for i in range(200)
    ]
    client.config_resetstat()
    store.observe_many(later)
    usec, calls = script_time(client)
    store.drop()
    store.close()
    return usec / calls


def test_cost_does_not_grow_with_history(redis_url: str) -> None:
    """A merchant with 10,000 transactions in its windows costs about what one with 10 does."""
    few, many = (_server_usec_per_script(redis_url, history) for history in (10, 10_000))
    assert many < 2 * few, f"{many:.1f} µs per script after 10,000, {few:.1f} after 10"


def test_scripts_the_server_lost_are_loaded_again(redis_url: str) -> None:
    """A restarted or failed-over server has no scripts: the next pipeline loads them and
    runs again, counting nothing twice."""
    store = RedisTiledStore(StateConfig(), redis_url, prefix=unique("tiled") + ":")
    client = redis.Redis.from_url(redis_url)
    start = 1_700_000_000.0
    try:
        store.observe(Event("a1", start, 10.0, "c1"))
        client.script_flush()
        client.function_flush()
        features = store.observe_many(
            [Event("a2", start + 60, 20.0, "c1"), Event("a1", start, 10.0, "c1")]
        )
        assert [f["customer"]["count_1h"] for f in features] == [1.0, 0.0]  # a1 held: once
        client.script_flush()
        client.function_flush()
        assert store.record_label("a1", True) is LabelOutcome.APPLIED
        assert store.observe(Event("a3", start + 120, 5.0, "c1"))["customer"]["fraud_count_1h"] == 1
    finally:
        store.drop()
        store.close()
        client.close()


def test_a_long_batch_streamed_in_chunks_gives_the_features_of_memory(redis_url: str) -> None:
    """A batch of many transactions goes to a single node in chunks, replies read a chunk
    behind (`_Stream`): the same features as the memory store, labels among them."""
    config = HOURS_CONFIG
    start = 1_700_000_000.0
    events = [
        Event(f"x{n}", start + n * 37.0, float(n % 97), f"c{n % 7}", f"k{n % 5}", f"t{n % 11}")
        for n in range(1_500)
    ]
    labels = [
        Label(position, f"x{position - 3}", position % 2 == 0, None)
        for position in range(10, 1_500, 97)
    ]
    placed = [
        label._replace(place=LabelPlace(e.timestamp, tuple(entities_of(e))))
        for label, e in zip(labels, (events[lb.position - 3] for lb in labels), strict=True)
    ]
    store = RedisTiledStore(config, redis_url, prefix=unique("tiled") + ":")
    try:
        got = store.observe_labelled(events, placed)
        want = TiledMemoryStore(config, native=False).observe_labelled(events, labels)
        assert got == want
        assert len(got[0]) == 1_500 and LabelOutcome.APPLIED in got[1]
    finally:
        store.drop()
        store.close()
