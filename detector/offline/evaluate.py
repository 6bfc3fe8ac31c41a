"""Detection metrics and the Fraud Detection Handbook's test protocol, in pure Python.

- `auc_roc`: area under the ROC curve (ties count one half, as Mann-Whitney).
- `average_precision`: sum over distinct score thresholds of (recall step) x precision, as
  scikit-learn's ``average_precision_score``.
- `card_precision_at_k`: the handbook's card precision top-k. Each day: drop the cards found
  compromised in the top k of earlier days, take each card's highest score and label, rank
  the cards by score, count the compromised among the top k, divide by k; then average over
  the days.
- `handbook_protocol`: Le Borgne et al., chapters 3 to 6: test on 7 days that start
  `delay` days after the training period ends, leaving out cards already known compromised
  (frauds from the first training day on, and each day of the delay period as it becomes
  known), and report the three metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

DAY = 86400.0


def auc_roc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    order = sorted(range(len(scores)), key=scores.__getitem__)
    positives = sum(1 for label in labels if label)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return float("nan")
    rank_sum = 0.0
    i = 0
    n = len(order)
    while i < n:
        j = i
        while j + 1 < n and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        average_rank = (i + j) / 2 + 1  # ranks are 1-based; ties share their mean rank
        rank_sum += average_rank * sum(1 for k in range(i, j + 1) if labels[order[k]])
        i = j + 1
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def average_precision(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Average precision (area under the step precision-recall curve); NaN without positives."""
    order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
    positives = sum(1 for label in labels if label)
    if not positives:
        return float("nan")
    n = len(order)
    total = 0.0
    true_positives = 0
    seen = 0
    previous_tp = 0
    i = 0
    while i < n:
        threshold = scores[order[i]]
        while i < n and scores[order[i]] == threshold:
            true_positives += 1 if labels[order[i]] else 0
            seen += 1
            i += 1
        if true_positives > previous_tp:
            total += (true_positives - previous_tp) / positives * (true_positives / seen)
            previous_tp = true_positives
    return total


@dataclass(frozen=True, slots=True)
class Scored:
    """One scored transaction of the test period."""

    time: float  # epoch seconds
    card: str
    score: float
    is_fraud: bool


def card_precision_at_k(transactions: Iterable[Scored], k: int, day_start: float) -> float:
    """The handbook's card precision top-k, averaged over the days from `day_start` on.

    Args:
        transactions: the test set, already without cards known compromised beforehand.
        k: cards to inspect per day.
        day_start: epoch seconds of the first test day's midnight (days are 24 h from it).
    """
    by_day: dict[int, dict[str, tuple[float, bool]]] = {}
    for tx in transactions:
        day = int((tx.time - day_start) // DAY)
        cards = by_day.setdefault(day, {})
        best = cards.get(tx.card)
        if best is None:
            cards[tx.card] = (tx.score, tx.is_fraud)
        else:
            cards[tx.card] = (max(best[0], tx.score), best[1] or tx.is_fraud)
    detected: set[str] = set()
    precisions = []
    for day in sorted(by_day):
        ranked = [(s, f, c) for c, (s, f) in by_day[day].items() if c not in detected]
        ranked.sort(key=lambda item: item[0], reverse=True)
        found = [card for _, fraud, card in ranked[:k] if fraud]
        precisions.append(len(found) / k)
        detected.update(found)
    return sum(precisions) / len(precisions) if precisions else float("nan")


@dataclass(frozen=True, slots=True)
class Metrics:
    """The handbook's three metrics on one test period."""

    auc_roc: float
    average_precision: float
    card_precision_at_100: float
    transactions: int
    frauds: int
    excluded_cards: int


def handbook_protocol(
    scored: Iterable[Scored],
    *,
    train_start: datetime,
    train_end: datetime,
    delay_days: int = 7,
    test_days: int = 7,
    k: int = 100,
) -> Metrics:
    """Evaluate scores on the handbook's test period.

    Args:
        scored: every scored transaction from `train_start` on (later ones are ignored).
        train_start: first instant whose frauds count as known (book: first training day).
        train_end: end of the training period (exclusive; book: 2018-08-01).
        delay_days: label delay; the test starts this long after train_end (book: 7).
        test_days: length of the test period (book: 7).
    """
    start = train_start.timestamp()
    test_start = (train_end + timedelta(days=delay_days)).timestamp()
    test_end = test_start + test_days * DAY
    # Known compromised cards, by the day they become known: a fraud on day D of the delay
    # period is known from test day D - train_end + 1 on (the book's "delay period" rule).
    known_from: dict[str, float] = {}
    test: list[Scored] = []
    for tx in scored:
        if tx.time < start or tx.time >= test_end:
            continue
        if tx.time >= test_start:
            test.append(tx)
        elif tx.is_fraud:
            # A fraud at time t excludes its card from the test day starting after
            # t's day + delay (for frauds before train_end: from the first test day).
            day_end = start + ((tx.time - start) // DAY + 1) * DAY
            becomes = max(test_start, day_end + delay_days * DAY)
            previous = known_from.get(tx.card)
            if previous is None or becomes < previous:
                known_from[tx.card] = becomes
    kept = [
        tx
        for tx in test
        if tx.card not in known_from
        or known_from[tx.card] > test_start + ((tx.time - test_start) // DAY) * DAY
    ]
    scores = [tx.score for tx in kept]
    labels = [tx.is_fraud for tx in kept]
    return Metrics(
        auc_roc=auc_roc(scores, labels),
        average_precision=average_precision(scores, labels),
        card_precision_at_100=card_precision_at_k(kept, k, test_start),
        transactions=len(kept),
        frauds=sum(labels),
        excluded_cards=len(known_from),
    )


def scored_from_verdicts(
    verdicts: Iterable[Mapping[str, object]], labels: Mapping[str, bool], card_field: str
) -> Iterator[Scored]:
    """Scored transactions from replay verdicts (timestamp, card, score) and ground truth."""
    for verdict in verdicts:
        tid = verdict.get("transaction_id")
        timestamp = verdict.get("timestamp")
        card = verdict.get(card_field)
        score = verdict.get("score")
        if not isinstance(tid, str) or not isinstance(timestamp, str):
            continue
        if not isinstance(score, int | float) or card is None:
            continue
        yield Scored(
            datetime.fromisoformat(timestamp).timestamp(),
            str(card),
            float(score),
            bool(labels.get(tid, False)),
        )
