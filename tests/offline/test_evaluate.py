"""Metrics of the handbook benchmark: AUC ROC, average precision, card precision@k, protocol."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detector.offline.evaluate import (
    DAY,
    Scored,
    auc_roc,
    average_precision,
    card_precision_at_k,
    handbook_protocol,
)


def test_auc_and_average_precision_match_the_textbook_example() -> None:
    """scikit-learn's documented example: AUC 0.75, average precision 0.8333."""
    scores = [0.1, 0.4, 0.35, 0.8]
    labels = [False, False, True, True]
    assert auc_roc(scores, labels) == pytest.approx(0.75)
    assert average_precision(scores, labels) == pytest.approx(0.8333333)


def test_ties_count_one_half() -> None:
    """Equal scores for a fraud and a genuine transaction: AUC 0.5, AP is the fraud rate."""
    assert auc_roc([0.5, 0.5], [True, False]) == 0.5
    assert average_precision([0.5, 0.5], [True, False]) == 0.5


def test_one_class_only_is_undefined() -> None:
    """Without frauds (or without genuine transactions) the metrics are NaN, not a number."""
    assert math.isnan(auc_roc([0.1, 0.2], [False, False]))
    assert math.isnan(average_precision([0.1, 0.2], [False, False]))


@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=2, max_size=40))
def test_auc_is_the_probability_a_fraud_outranks_a_genuine(pairs: list[tuple[float, bool]]) -> None:
    """AUC equals the pairwise definition (ties one half)."""
    scores = [s for s, _ in pairs]
    labels = [f for _, f in pairs]
    frauds = [s for s, f in pairs if f]
    genuine = [s for s, f in pairs if not f]
    if not frauds or not genuine:
        return
    wins = sum((f > g) + 0.5 * (f == g) for f in frauds for g in genuine)
    assert auc_roc(scores, labels) == pytest.approx(wins / (len(frauds) * len(genuine)))


def test_perfect_and_reversed_rankings() -> None:
    """Perfect ranking: AUC 1 and AP 1; reversed: AUC 0."""
    labels = [True] * 3 + [False] * 7
    scores = [1.0 - i / 10 for i in range(10)]
    assert auc_roc(scores, labels) == 1.0
    assert average_precision(scores, labels) == 1.0
    assert auc_roc([-s for s in scores], labels) == 0.0


def tx(day: int, card: str, score: float, fraud: bool, start: float = 0.0) -> Scored:
    return Scored(start + day * DAY + 3600, card, score, fraud)


def test_card_precision_takes_each_cards_best_and_drops_cards_found_earlier() -> None:
    """Day 0: the top card is compromised (1/2); day 1 it is dropped, so a genuine card leads."""
    transactions = [
        tx(0, "a", 0.9, True),
        tx(0, "a", 0.1, False),
        tx(0, "b", 0.8, False),
        tx(0, "c", 0.2, True),
        tx(1, "a", 0.95, True),  # already found on day 0: dropped
        tx(1, "b", 0.7, False),
        tx(1, "c", 0.6, True),
    ]
    # k=2: day 0 -> a (fraud), b -> 1/2; day 1 -> b, c (fraud) -> 1/2.
    assert card_precision_at_k(transactions, 2, 0.0) == pytest.approx(0.5)
    # k=1: day 0 -> a: 1; day 1 -> b: 0.
    assert card_precision_at_k(transactions, 1, 0.0) == pytest.approx(0.5)


def test_protocol_leaves_out_cards_known_compromised_as_they_become_known() -> None:
    """Frauds in training exclude a card from the whole test; a delay-period fraud from the next day on."""
    start = datetime(2018, 7, 25, tzinfo=UTC)
    end = datetime(2018, 8, 1, tzinfo=UTC)
    base = start.timestamp()

    def at(day: int, card: str, score: float, fraud: bool) -> Scored:
        return Scored(base + day * DAY + 3600, card, score, fraud)

    test0 = 14  # 2018-08-08
    data = [
        at(2, "known", 0.5, True),  # training fraud: excluded from every test day
        at(7, "late", 0.5, True),  # 2018-08-01 (delay period): known from test day 1
        at(13, "last", 0.5, True),  # 2018-08-07: never known during the test
        at(test0, "known", 0.99, True),
        at(test0, "late", 0.9, True),  # kept on day 0
        at(test0 + 1, "late", 0.9, True),  # dropped on day 1
        at(test0 + 1, "last", 0.8, True),
        at(test0, "good", 0.1, False),
        at(test0 + 1, "good", 0.2, False),
        at(test0 + 7, "after", 0.9, True),  # after the test week: ignored
    ]
    result = handbook_protocol(data, train_start=start, train_end=end)
    assert result.transactions == 4  # late@day0, last@day1, good x2
    assert result.frauds == 2
    assert result.auc_roc == 1.0
    # Day 0: cards late (fraud), good -> 1/100; day 1: last (fraud), good -> 1/100.
    assert result.card_precision_at_100 == pytest.approx(0.01)


def test_random_scores_give_auc_near_one_half() -> None:
    """A sanity check at scale: random scores rank nothing."""
    rng = random.Random(1)
    labels = [rng.random() < 0.1 for _ in range(20000)]
    scores = [rng.random() for _ in labels]
    assert auc_roc(scores, labels) == pytest.approx(0.5, abs=0.03)
    assert timedelta(days=1).total_seconds() == DAY
