"""The detection core: a validated transaction in, a verdict out. No I/O but the state store.

The same `Detector` serves the Pub/Sub function, the HTTP function and offline replay, so
a transaction gets the same verdict whichever way it arrives.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import orjson

from detector.rules import Ruleset
from detector.state import Event, LabelOutcome, LabelPlace, StateStore
from detector.state.base import DISTINCT, DISTINCT_FEATURE, Features, Label, entities_of
from detector.transaction import Transaction, rfc3339
from detector.vocabulary import ENTITY_VARIABLES

log = logging.getLogger(__name__)

__all__ = [
    "OPTIONAL_FIELDS",
    "Contribution",
    "Detector",
    "Observed",
    "Request",
    "RiskModel",
    "Verdict",
    "entity_reads",
    "recorded",
]

_SEVERITY_SCORE = {"block": 1.0, "review": 0.5, "allow": 0.0}


class Contribution(Protocol):
    """One feature's push on the model's score."""

    @property
    def feature(self) -> str: ...

    @property
    def value(self) -> float: ...

    @property
    def contribution(self) -> float: ...


class RiskModel(Protocol):
    """A learned fraud probability computed from the same activation the rules see."""

    version: str
    variables: frozenset[str]
    #: The window features it was trained on: "tiled" or "exact" (`StateConfig.tiled`).
    state: str

    def score(self, activation: Mapping[str, Any]) -> tuple[float, Sequence[Contribution]]:
        """Return the fraud probability and the features that pushed it most."""
        ...


class Verdict(NamedTuple):
    """The decision on one transaction, as published and returned over HTTP.

    Attributes:
        body: the verdict object: the transaction's fields as received plus the verdict's.
    """

    transaction_id: str
    decision: str
    score: float
    rules_version: str
    body: Mapping[str, Any]

    @property
    def is_fraud(self) -> bool:
        return self.decision == "block"

    def encode(self) -> bytes:
        """The verdict as UTF-8 JSON."""
        return orjson.dumps(self.body)

    def attributes(self) -> dict[str, str]:
        """Pub/Sub attributes that let subscribers filter without parsing the body."""
        return {
            "transaction_id": self.transaction_id,
            "decision": self.decision,
            "is_fraud": "true" if self.is_fraud else "false",
            "rules_version": self.rules_version,
        }


def entity_reads(names: set[str] | frozenset[str]) -> dict[str, frozenset[str] | None]:
    """Of the variables rules and model read, the features of each entity kind.

    None for a kind whose whole map is read (a rule may use ``by_card`` itself); a kind
    nothing reads is left out.
    """
    reads: dict[str, frozenset[str] | None] = {}
    for kind, variable in ENTITY_VARIABLES.items():
        if variable in names:
            reads[kind] = None
            continue
        prefix = variable + "."
        wanted = frozenset(name[len(prefix) :] for name in names if name.startswith(prefix))
        if wanted:
            reads[kind] = wanted
    return reads


def recorded(reads: Mapping[str, frozenset[str] | None]) -> frozenset[str]:
    """Of the fields of `Event` that name entities and attributes, those state needs for what
    is read (`entity_reads`): each entity kind read, and each attribute a read kind counts
    distinct values of (all of its attributes when its whole map is read).

    What no rule or model reads is not recorded, as a feature store materialises only the
    features declared: the shipped detector hands the store no merchant and no country. A
    kind kept as an attribute (the terminals or merchants a card has seen) is recorded as an
    entity too, since an `Event` names it once for both.
    """
    keep = set(reads)
    for kind, names in reads.items():
        for attribute in DISTINCT[kind]:
            prefix = DISTINCT_FEATURE[attribute] + "_"
            if names is None or any(name.startswith(prefix) for name in names):
                keep.add(attribute)
    return frozenset(keep)


#: `Event`'s fields that may be left out (None): entities and attributes.
OPTIONAL_FIELDS = ("customer", "card", "terminal", "merchant", "country")
#: The same by position.
_OPTIONAL = {at: name for at, name in enumerate(Event._fields) if name in OPTIONAL_FIELDS}

_new = tuple.__new__


def _event(
    transaction: Transaction, transaction_id: str, moment: datetime, drop: tuple[int, ...] = ()
) -> Event:
    """The transaction as the store sees it, the fields at the positions `drop` left out."""
    # The fields in `Event` order, built as a tuple: cheaper than the keyword constructor.
    fields = (
        transaction_id,
        moment.timestamp(),
        transaction.amount,
        transaction.customer_id,
        transaction.card_id,
        transaction.terminal_id,
        transaction.merchant,
        transaction.country,
    )
    if not drop:
        return _new(Event, fields)
    kept = list(fields)
    for at in drop:
        kept[at] = None
    return _new(Event, kept)


def _fields(transaction: Transaction, transaction_id: str, moment: datetime) -> dict[str, Any]:
    """The transaction's own variables (see `vocabulary.TRANSACTION_VARIABLES`)."""
    return {
        "amount": transaction.amount,
        "customer_id": transaction.customer_id,
        "transaction_id": transaction_id,
        "currency": transaction.currency,
        "merchant": transaction.merchant,
        "card_id": transaction.card_id,
        "terminal_id": transaction.terminal_id,
        "merchant_category": transaction.merchant_category,
        "country": transaction.country,
        "ip_country": transaction.ip_country,
        "channel": transaction.channel,
        "hour": moment.hour + moment.minute / 60,
        "weekday": moment.isoweekday(),
    }


class Request(NamedTuple):
    """One transaction to decide, with what `Detector.decide` takes besides it."""

    raw: Mapping[str, Any]
    transaction: Transaction
    message_id: str | None
    default_time: datetime
    decided_at: datetime


class Observed(NamedTuple):
    """A batch after its state call (`Detector.observe_labelled`), before its decisions."""

    requests: Sequence[Request]
    ids: list[str]  # each transaction's id
    activations: list[dict[str, Any]]  # what rules and model see of each
    outcomes: list[LabelOutcome]  # of the labels recorded among them


class Detector:
    """Decides on transactions with rules, stream state and an optional risk model."""

    def __init__(
        self,
        rules: Ruleset,
        store: StateStore | None = None,
        model: RiskModel | None = None,
        *,
        record_all: bool = False,
    ) -> None:
        """`record_all`: hand the store every entity and attribute of each transaction, not
        only those rules and model read (`recorded`), so that a rule added later finds their
        history."""
        self.rules = rules
        self.store = store
        self.model = model
        needed = set(rules.variables) | (set(model.variables) if model else set())
        # Only what some rule or the model reads is computed per transaction.
        self._needed = frozenset(name.split(".", 1)[1] for name in needed if "." in name)
        reads = entity_reads(needed)
        #: Positions in `Event` of the fields the store is not handed.
        self._drop: tuple[int, ...] = ()
        #: Positions of the entity kinds the store is handed, when the customer (which every
        #: transaction names) is not one of them: an event may then name no entity, and is
        #: not handed to the store at all. None when every event names its customer.
        self._kinds: tuple[int, ...] | None = None
        if not record_all:
            keep = recorded(reads)
            self._drop = tuple(at for at, name in _OPTIONAL.items() if name not in keep)
            if "customer" not in keep:
                self._kinds = tuple(
                    at
                    for at, name in _OPTIONAL.items()
                    if name in keep and name in ENTITY_VARIABLES
                )
            if store is not None:
                log.info(
                    "state records %s; not %s (STATE_RECORD=all records every one)",
                    ", ".join(sorted(keep)) or "nothing",
                    ", ".join(name for name in OPTIONAL_FIELDS if name not in keep) or "-",
                )
        if store is not None:
            # And per entity kind: a card need not compute the customer's 30-day means.
            store.declare_reads(reads)

    def activation(
        self, transaction: Transaction, transaction_id: str, moment: datetime
    ) -> dict[str, Any]:
        """What rules and model see of one transaction: its fields and its entities' history.

        Records the transaction in the state store (once per transaction_id).

        Raises:
            TransientError: the state store failed (worth retrying).
        """
        activation = _fields(transaction, transaction_id, moment)
        if self.store is not None:
            event = _event(transaction, transaction_id, moment, self._drop)
            features = self.store.observe(event, needed=self._needed) if self._names(event) else {}
            for entity, variable in ENTITY_VARIABLES.items():
                activation[variable] = features.get(entity, {})
        return activation

    def _names(self, event: Event) -> bool:
        """Whether the event names an entity the store records (else it is not handed over:
        there is nothing to count it in, and a store would still index it for labels)."""
        return self._kinds is None or any(event[at] is not None for at in self._kinds)

    def record(self, transaction: Transaction, transaction_id: str, moment: datetime) -> None:
        """Record the transaction in the state store as `activation` does, computing nothing.

        What the store keeps is the same either way: replay warms a shard's store with it.

        Raises:
            TransientError: the state store failed (worth retrying).
        """
        if self.store is not None:
            event = _event(transaction, transaction_id, moment, self._drop)
            if self._names(event):
                self.store.observe(event, needed=frozenset())

    def decide(
        self,
        raw: Mapping[str, Any],
        transaction: Transaction,
        *,
        message_id: str | None,
        default_time: datetime,
        decided_at: datetime,
    ) -> Verdict:
        """Decide on one transaction.

        Args:
            raw: the transaction object as received; echoed in the verdict.
            transaction: its validation.
            message_id: the Pub/Sub message ID, or None over HTTP.
            default_time: event time when the transaction carries no timestamp.
            decided_at: the time the verdict is stamped with.

        Raises:
            TransientError: the state store failed (worth retrying).
        """
        transaction_id = transaction.transaction_id or message_id or uuid.uuid4().hex
        activation = self.activation(
            transaction, transaction_id, transaction.timestamp or default_time
        )
        return self._verdict(raw, activation, transaction_id, message_id, decided_at)

    def decide_many(self, requests: Sequence[Request]) -> list[Verdict]:
        """Decide on transactions in order, as `decide` on each would, with one state call.

        The state store sees the whole batch at once (`StateStore.observe_many`: one round
        trip to Redis), and each transaction's features cover those before it in the batch.

        Raises:
            TransientError: the state store failed; nothing of the batch was decided.
        """
        return self.decide_labelled(requests, ())[0]

    def decide_labelled(
        self, requests: Sequence[Request], labels: Sequence[Label]
    ) -> tuple[list[Verdict], list[LabelOutcome]]:
        """`decide_many` with labels recorded among the transactions, as `record_label`
        between `decide` calls would (`StateStore.observe_labelled`: one round trip to Redis
        when the labels have their places); the verdicts, and the labels' outcomes (none
        without a state store).

        Raises:
            TransientError: the state store failed; nothing of the batch was decided.
        """
        observed = self.observe_labelled(requests, labels)
        return self.verdicts(observed), observed.outcomes

    def observe_labelled(self, requests: Sequence[Request], labels: Sequence[Label]) -> Observed:
        """The state half of `decide_labelled`: what rules and model will see of each
        transaction, the transactions and labels recorded. It may run in another thread
        than `verdicts`, one call at a time, while `verdicts` decides on an earlier batch.

        Raises:
            TransientError: the state store failed.
        """
        outcomes: list[LabelOutcome] = []
        ids = [r.transaction.transaction_id or r.message_id or uuid.uuid4().hex for r in requests]
        moments = [r.transaction.timestamp or r.default_time for r in requests]
        activations = [
            _fields(r.transaction, tid, moment)
            for r, tid, moment in zip(requests, ids, moments, strict=True)
        ]
        if self.store is not None:
            events = [
                _event(r.transaction, tid, moment, self._drop)
                for r, tid, moment in zip(requests, ids, moments, strict=True)
            ]
            if self._kinds is None:
                features, outcomes = self.store.observe_labelled(events, labels, self._needed)
            else:
                features, outcomes = self._observe_naming(self.store, events, labels)
            for activation, entities in zip(activations, features, strict=True):
                for entity, variable in ENTITY_VARIABLES.items():
                    activation[variable] = entities.get(entity, {})
        return Observed(requests, ids, activations, outcomes)

    def _observe_naming(
        self, store: StateStore, events: list[Event], labels: Sequence[Label]
    ) -> tuple[list[Features], list[LabelOutcome]]:
        """`StateStore.observe_labelled` of the events that name an entity recorded, the
        labels kept in their places among them; no features for the others."""
        named = [self._names(event) for event in events]
        before = [0]  # events named before each position
        for names in named:
            before.append(before[-1] + names)
        kept = [event for event, names in zip(events, named, strict=True) if names]
        moved = [label._replace(position=before[label.position]) for label in labels]
        found, outcomes = store.observe_labelled(kept, moved, self._needed)
        features = iter(found)
        return [next(features) if names else {} for names in named], outcomes

    def verdicts(self, observed: Observed) -> list[Verdict]:
        """The decision half of `decide_labelled`: score and rules on each activation."""
        return [
            self._verdict(r.raw, activation, tid, r.message_id, r.decided_at)
            for r, activation, tid in zip(
                observed.requests, observed.activations, observed.ids, strict=True
            )
        ]

    def _verdict(
        self,
        raw: Mapping[str, Any],
        activation: dict[str, Any],
        transaction_id: str,
        message_id: str | None,
        decided_at: datetime,
    ) -> Verdict:
        """Score, evaluate the rules and write the verdict for one activation."""
        factors: Sequence[Contribution] = ()
        if self.model is not None:
            activation["score"], factors = self.model.score(activation)
        evaluation = self.rules.evaluate(activation)
        decision = evaluation.decision
        score = activation.get("score", _SEVERITY_SCORE[decision])
        body = {
            **raw,
            "transaction_id": transaction_id,
            "is_fraud": decision == "block",
            "decision": decision,
            "score": round(score, 6),
            "reasons": [hit.as_dict() for hit in evaluation.hits],
            "rules_version": self.rules.version,
            "message_id": message_id,
            "decided_at": rfc3339(decided_at),
        }
        if self.model is not None:
            body["model_version"] = self.model.version
            body["score_factors"] = [
                {"feature": f.feature, "value": f.value, "contribution": round(f.contribution, 4)}
                for f in factors
            ]
        return Verdict(transaction_id, decision, score, self.rules.version, body)

    def place(self, request: Request) -> LabelPlace:
        """Where a request's transaction is recorded, for a label of it (`LabelPlace`)."""
        transaction = request.transaction
        moment = transaction.timestamp or request.default_time
        event = _event(transaction, "", moment, self._drop)
        return LabelPlace(event.timestamp, tuple(entities_of(event)))

    def record_label(
        self, transaction_id: str, is_fraud: bool, place: LabelPlace | None = None
    ) -> LabelOutcome | None:
        """Record a fraud label for a transaction (see `StateStore.record_label`).

        Returns None without a state store: nothing could use the label.

        Raises:
            TransientError: the state store failed (worth retrying).
        """
        if self.store is None:
            return None
        if place is not None and self._drop:
            # Only the entities recorded: the others would each answer "unknown".
            dropped = {_OPTIONAL[at] for at in self._drop}
            entities = tuple((kind, ident) for kind, ident in place.entities if kind not in dropped)
            place = place._replace(entities=entities)
        return self.store.record_label(transaction_id, is_fraud, place)
