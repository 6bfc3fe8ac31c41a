"""The detection core: a batch decides exactly as the same transactions one by one, and
state is handed only what rules and model read."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from detector.config import DetectorConfig, build_detector, load_risk_model, state_config
from detector.engine import Detector, Request, recorded
from detector.errors import ConfigError
from detector.state import (
    Event,
    LabelOutcome,
    LabelPlace,
    MemoryStore,
    StateStore,
    memory_store,
)
from detector.state.base import Label
from detector.transaction import decode
from detector.vocabulary import ENTITIES

START = datetime(2026, 1, 1, tzinfo=UTC)


def requests(count: int) -> list[Request]:
    """A small stream: two customers, repeated cards and terminals, some large amounts."""
    out = []
    for n in range(count):
        line = (
            f'{{"transaction_id": "t{n}", "amount": {(n * 37) % 1500 + 0.5}, '
            f'"customer_id": "c{n % 2}", "card_id": "k{n % 3}", "terminal_id": "T{n % 4}", '
            f'"timestamp": "{(START + timedelta(minutes=7 * n)).isoformat()}"}}'
        ).encode()
        raw, transaction = decode(line)
        out.append(Request(raw, transaction, f"m{n}", START, START))
    return out


def test_decide_many_gives_the_verdicts_of_decide_one_by_one() -> None:
    """Same decisions, scores, reasons and bodies, batch or not, with state and a model."""
    batch = requests(60)
    one = build_detector(DetectorConfig(), MemoryStore())
    many = build_detector(DetectorConfig(), MemoryStore())
    expected = [
        one.decide(
            r.raw,
            r.transaction,
            message_id=r.message_id,
            default_time=r.default_time,
            decided_at=r.decided_at,
        ).body
        for r in batch
    ]
    got = [v.body for b in (batch[:25], batch[25:26], batch[26:]) for v in many.decide_many(b)]
    assert got == expected
    assert any(body["decision"] != "allow" for body in got)  # the stream exercises the rules


class Handed:
    """A state store that keeps what the detector hands it, and passes it on."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.events: list[Event] = []
        self.places: list[LabelPlace | None] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def observe_labelled(
        self, events: Sequence[Event], labels: Sequence[Label], needed: frozenset[str] | None
    ) -> Any:
        self.events.extend(events)
        self.places.extend(label.place for label in labels)
        return self.store.observe_labelled(events, labels, needed)

    def record_label(self, transaction_id: str, is_fraud: bool, place: LabelPlace | None) -> Any:
        self.places.append(place)
        return self.store.record_label(transaction_id, is_fraud, place)


def merchant_requests(count: int) -> list[Request]:
    """`requests` with merchants and countries, two minutes apart: cards exceed the velocity
    rule's limit."""
    out = []
    for n, request in enumerate(requests(count)):
        moment = (START + timedelta(minutes=2 * n)).isoformat()
        fields = {"timestamp": moment, "merchant": f"M{n % 5}", "country": "FR"}
        raw, transaction = decode(orjson.dumps({**request.raw, **fields}))
        out.append(request._replace(raw=raw, transaction=transaction))
    return out


def test_what_no_rule_or_model_reads_is_not_recorded_and_decides_nothing() -> None:
    """The shipped detector reads nothing of merchants and no distinct countries: the store is
    handed neither (STATE_RECORD=read, the default), and the verdicts and label outcomes are
    those of a detector that records everything (STATE_RECORD=all)."""
    batch = merchant_requests(80)
    verdicts, places = {}, {}
    for record in ("read", "all"):
        config = DetectorConfig.from_env({"STATE_RECORD": record})
        store = Handed(memory_store(state_config(load_risk_model(config))))
        detector = build_detector(config, cast(StateStore, store))
        labels = [Label(n + 3, f"t{n}", n % 4 == 0, detector.place(r)) for n, r in enumerate(batch)]
        got, outcomes = detector.decide_labelled(batch, labels)
        assert detector.record_label("t1", True, detector.place(batch[1])) is LabelOutcome.CHANGED
        verdicts[record] = ([v.body for v in got], outcomes)
        places[record] = store.places
        handed = {(e.merchant, e.country) for e in store.events}
        if record == "read":
            assert handed == {(None, None)}
            assert all(e.customer and e.card and e.terminal for e in store.events)
        else:
            assert handed == {(f"M{n}", "FR") for n in range(5)}
    assert verdicts["read"] == verdicts["all"]
    reasons = {hit["rule"] for body in verdicts["read"][0] for hit in body["reasons"]}
    assert any("card" in rule for rule in reasons), reasons  # the card's features decide
    assert LabelOutcome.APPLIED in verdicts["read"][1]
    kinds = {record: {k for p in ps if p for k, _ in p.entities} for record, ps in places.items()}
    assert kinds == {"read": {"customer", "card", "terminal"}, "all": set(ENTITIES)}


def test_recorded_keeps_each_kind_read_and_the_attributes_it_counts() -> None:
    assert recorded({}) == frozenset()
    assert recorded({"card": frozenset({"count_1h", "distinct_terminals_1h"})}) == {
        "card",
        "terminal",
    }
    assert recorded({"customer": frozenset({"distinct_countries_30d"})}) == {
        "customer",
        "country",
    }
    # A whole map read (a rule on `by_merchant` itself): all of its attributes.
    assert recorded({"merchant": None}) == {"merchant", "terminal", "country"}


def test_state_record_must_be_read_or_all() -> None:
    assert not DetectorConfig.from_env({}).record_all
    assert DetectorConfig.from_env({"STATE_RECORD": "ALL"}).record_all
    with pytest.raises(ConfigError, match="STATE_RECORD: must be 'read' or 'all', got ' Some'"):
        DetectorConfig.from_env({"STATE_RECORD": " Some"})


def custom_detector(tmp_path: Path, rules: str, record: str) -> tuple[Detector, Handed]:
    """A detector with these rules and no model over a fresh memory store, and its store."""
    path = tmp_path / f"rules-{record}.yaml"
    path.write_text(f'version: "test"\nrules:\n{rules}')
    config = DetectorConfig.from_env(
        {"STATE_RECORD": record, "RULES_FILE": str(path), "MODEL_PATH": "none"}
    )
    store = Handed(memory_store(state_config(None)))
    return build_detector(config, cast(StateStore, store)), store


def test_an_attribute_counted_is_recorded_though_its_kind_is_not_read(tmp_path: Path) -> None:
    """Rules on a customer's distinct countries and a card's distinct merchants: the store is
    handed both attributes (and no terminal, which nothing reads), and decides as when it
    records everything."""
    rules = """
  - id: countries
    description: "{by_customer.distinct_countries_1d} countries in a day"
    condition: has(by_customer.distinct_countries_1d) && by_customer.distinct_countries_1d > 1
    action: review
  - id: merchants
    description: "{by_card.distinct_merchants_1d} merchants in a day"
    condition: has(by_card.distinct_merchants_1d) && by_card.distinct_merchants_1d > 3
    action: review
"""
    batch = []
    for n, request in enumerate(merchant_requests(40)):
        fields = {**request.raw, "country": ("FR", "DE", "FR")[n % 3] if n % 2 else "FR"}
        raw, transaction = decode(orjson.dumps(fields))
        batch.append(request._replace(raw=raw, transaction=transaction))
    verdicts = {}
    for record in ("read", "all"):
        detector, store = custom_detector(tmp_path, rules, record)
        verdicts[record] = [v.body for v in detector.decide_many(batch)]
        if record == "read":
            assert {e.terminal for e in store.events} == {None}
            assert all(e.customer and e.card and e.merchant and e.country for e in store.events)
    assert verdicts["read"] == verdicts["all"]
    fired = {hit["rule"] for body in verdicts["read"] for hit in body["reasons"]}
    assert fired == {"countries", "merchants"}


def test_a_transaction_naming_no_entity_recorded_is_not_handed_to_state(tmp_path: Path) -> None:
    """Rules that read only the card: a transaction without a card has nothing to be counted
    in, so the store never sees it (a store would still index it for labels, for a month);
    labels keep their places among the rest, and the verdicts are those of recording all."""
    rules = """
  - id: card-velocity
    description: "{by_card.count_1h} earlier on this card"
    condition: has(by_card.count_1h) && by_card.count_1h >= 2
    action: review
"""
    batch = []
    for n, request in enumerate(requests(60)):
        fields = {**request.raw, "merchant": "M1"}
        if n % 3 == 0:
            del fields["card_id"]
        raw, transaction = decode(orjson.dumps(fields))
        batch.append(request._replace(raw=raw, transaction=transaction))
    verdicts = {}
    for record in ("read", "all"):
        detector, store = custom_detector(tmp_path, rules, record)
        labels = [Label(n + 1, f"t{n}", True, detector.place(batch[n])) for n in range(0, 60, 2)]
        got, outcomes = detector.decide_labelled(batch, labels)
        verdicts[record] = [v.body for v in got]
        if record == "read":
            assert [e.transaction_id for e in store.events] == [f"t{n}" for n in range(60) if n % 3]
            assert len(store.store) == 40  # the label index holds no card-less transaction
            assert outcomes.count(LabelOutcome.UNKNOWN) == 10  # those of the card-less ones
            # A place naming kinds nothing reads reaches the store without them.
            place = LabelPlace(batch[1].transaction.timestamp.timestamp(), tuple(ENTITIES_OF_1))
            assert detector.record_label("t1", False, place) is LabelOutcome.APPLIED
            assert store.places[-1] == LabelPlace(place.timestamp, (("card", "k1"),))
    assert verdicts["read"] == verdicts["all"]
    assert any(body["reasons"] for body in verdicts["read"])


#: Every entity kind of `requests(...)[1]` with a merchant.
ENTITIES_OF_1 = (("customer", "c1"), ("card", "k1"), ("terminal", "T1"), ("merchant", "M1"))
