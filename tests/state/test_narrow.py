"""MemoryStore.narrow and the Detector's use of it: fewer features computed, none changed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from detector.engine import entity_reads
from detector.offline.commands import offline_detector
from detector.state import Event, MemoryStore, feature_names
from detector.vocabulary import ENTITIES
from tests.helpers.state import PROPERTY_CONFIG, needed_features, streams

_reads = st.dictionaries(
    st.sampled_from(ENTITIES),
    st.none()
    | st.frozensets(st.sampled_from(sorted(feature_names(PROPERTY_CONFIG.windows))), max_size=6),
)


@settings(max_examples=200, deadline=None)
@given(steps=streams(), needed=needed_features, reads=_reads)
def test_a_narrowed_store_returns_the_read_subset_of_the_same_features(
    steps: list[tuple[str, object]],
    needed: frozenset[str] | None,
    reads: dict[str, frozenset[str] | None],
) -> None:
    """Random streams: narrowed features == full features restricted to what is read."""
    full, narrowed = MemoryStore(PROPERTY_CONFIG), MemoryStore(PROPERTY_CONFIG)
    narrowed.narrow(reads)
    for kind, step in steps:
        if kind == "label":
            txid, is_fraud = step  # type: ignore[misc]
            assert narrowed.record_label(txid, is_fraud) == full.record_label(txid, is_fraud)
            continue
        assert isinstance(step, Event)
        expected = full.observe(step, needed)
        got = narrowed.observe(step, needed)
        assert got.keys() == expected.keys()
        for entity, values in expected.items():
            if entity not in reads:
                assert got[entity] == {}
                continue
            read = reads[entity]
            assert got[entity] == {
                name: value for name, value in values.items() if read is None or name in read
            }, (entity, step)


def test_the_offline_detector_narrows_to_what_rules_and_model_read() -> None:
    """The default detector: cards compute their 1-hour count, not the customer's means."""
    detector = offline_detector(None, None)
    names = set(detector.rules.variables) | (detector.model.variables if detector.model else set())
    reads = entity_reads(names)
    assert reads["card"] == frozenset({"count_1h", "distinct_terminals_1h"})
    assert "mean_30d" in (reads["customer"] or ())
    assert "merchant" not in reads
    features = detector.store.observe(  # type: ignore[union-attr]
        Event("t1", 0.0, 5.0, customer="c", card="k", terminal="t", merchant="m"),
        needed=frozenset({"count_1h", "mean_30d"}),
    )
    assert features["card"] == {"count_1h": 0.0}
    assert features["customer"]["mean_30d"] == 0.0
    assert features["merchant"] == {}
