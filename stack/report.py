"""The demo's report: verdicts in, against the ground truth, figures out.

Pure: `parse_verdict()` reads one verdict message; `Tally` accumulates verdicts with the time
each arrived and gives live figures (`live()`) and the final report (`report()`), a JSON-ready
dict whose top-level names are stable (`decisions`, `precision_block`, `recall_block`,
`precision_flagged`, `recall_flagged`, `labels_applied`, `delay_ms` with `p50`/`p95`/`p99`).
"Flagged" is block or review. Recall counts every fraud that was published: a fraud whose
verdict never arrived is missed.

The publisher's watcher keeps a similar tally, with decisions and delays only; this one also
needs the score, the rules and the amount of each verdict, and the scenario of each fraud.
When the publisher's own accumulator of verdicts and labels (`publisher/report.py`) covers
these figures, `Tally.report()` should delegate to it and keep only the demo's extras (the
chart series), so that `python -m publisher watch` and the demo report the same numbers.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

__all__ = [
    "DECISIONS",
    "SCENARIOS",
    "Live",
    "Observed",
    "Tally",
    "Truth",
    "parse_verdict",
    "percentile",
]

DECISIONS = ("allow", "review", "block")
# The simulator's fraud scenarios (publisher/simulate.py, after the Fraud Detection Handbook).
SCENARIOS = {1: "amount over 220", 2: "compromised terminal", 3: "stolen card, amounts x5"}
THRESHOLDS = tuple(round(0.01 * step, 2) for step in range(1, 100))
SCORE_BINS = 20
DELAY_BINS = 24
_FRACTION = re.compile(r"\.(\d+)")


class Truth(NamedTuple):
    """The ground truth of one transaction: fraud or not, and by which scenario."""

    is_fraud: bool
    scenario: int | None = None


class Reason(NamedTuple):
    rule: str
    action: str
    shadow: bool


@dataclass(frozen=True)
class Observed:
    """What the report keeps of one verdict.

    Attributes:
        delay: seconds from the transaction's publish to the verdict's, when measurable.
    """

    transaction_id: str
    decision: str
    score: float | None
    amount: float
    reasons: tuple[Reason, ...]
    delay: float | None


def _parse_time(text: str) -> dt.datetime:
    trimmed = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text.strip(), count=1)
    return dt.datetime.fromisoformat(trimmed)


def parse_verdict(
    data: bytes, attributes: Mapping[str, str], publish_time: dt.datetime | None
) -> Observed | None:
    """Read one verdict message; None if it is not a verdict (no transaction id or decision)."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    tid, decision = body.get("transaction_id"), body.get("decision")
    if not isinstance(tid, str) or decision not in DECISIONS:
        return None
    score = body.get("score")
    amount = body.get("amount")
    reasons = tuple(
        Reason(str(r.get("rule")), str(r.get("action")), bool(r.get("shadow")))
        for r in body.get("reasons") or ()
        if isinstance(r, dict)
    )
    delay = None
    source = attributes.get("source_publish_time")
    if source and publish_time is not None:
        try:
            delay = (publish_time - _parse_time(source)).total_seconds()
        except ValueError:
            delay = None
    return Observed(
        transaction_id=tid,
        decision=decision,
        score=float(score) if isinstance(score, int | float) else None,
        amount=float(amount) if isinstance(amount, int | float | str) else 0.0,
        reasons=reasons,
        delay=delay,
    )


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


@dataclass(frozen=True)
class Live:
    """The figures shown while the stream runs."""

    verdicts: int
    rate: float  # verdicts per second over the last few seconds
    decisions: Mapping[str, int]
    lag_p50_ms: float | None  # over the last 1,000 verdicts
    lag_p99_ms: float | None
    frauds: int  # frauds among the verdicts so far
    caught: int  # of which flagged (block or review)


@dataclass
class Tally:
    """Verdicts so far, against `truth` (every transaction published, by id).

    Duplicates (a redelivered transaction) are counted once, with the first verdict.
    """

    truth: Mapping[str, Truth]
    seen: dict[str, tuple[Observed, float]] = field(default_factory=dict)
    duplicates: int = 0
    unknown: int = 0
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    _arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=5000))
    _decisions: Counter[str] = field(default_factory=Counter)
    _frauds: int = 0
    _caught: int = 0

    def add(self, verdict: Observed, at: float) -> bool:
        """Count a verdict that arrived `at` seconds into the run; False if not counted."""
        if verdict.transaction_id in self.seen:
            self.duplicates += 1
            return False
        truth = self.truth.get(verdict.transaction_id)
        if truth is None:
            self.unknown += 1
            return False
        self.seen[verdict.transaction_id] = (verdict, at)
        self._decisions[verdict.decision] += 1
        self._arrivals.append(at)
        if verdict.delay is not None:
            self._recent.append(verdict.delay)
        if truth.is_fraud:
            self._frauds += 1
            self._caught += verdict.decision != "allow"
        return True

    def live(self, now: float, window: float = 5.0) -> Live:
        """Figures for the live display at `now` seconds into the run."""
        recent = [t for t in self._arrivals if t > now - window]
        span = min(window, now) if now > 0 else 1.0
        lags = sorted(self._recent)
        return Live(
            verdicts=len(self.seen),
            rate=len(recent) / span if span > 0 else 0.0,
            decisions={d: self._decisions.get(d, 0) for d in DECISIONS},
            lag_p50_ms=percentile(lags, 0.5) * 1000 if lags else None,
            lag_p99_ms=percentile(lags, 0.99) * 1000 if lags else None,
            frauds=self._frauds,
            caught=self._caught,
        )

    def report(
        self,
        *,
        rate: float,
        seconds: float,
        labels_sent: int,
        labels_applied: int,
        top_rules: int = 8,
    ) -> dict[str, Any]:
        """The final report as a JSON-ready dict.

        Args:
            rate: messages per second the stream was published at.
            seconds: wall time of the stream, first publish to last verdict.
            labels_sent: chargebacks published to the feedback topic.
            labels_applied: labels the detector recorded (record_feedback's log).
        """
        frauds = [tid for tid, t in self.truth.items() if t.is_fraud]
        decision_of = {tid: obs.decision for tid, (obs, _) in self.seen.items()}
        blocked = [tid for tid in self.seen if decision_of[tid] == "block"]
        flagged = [tid for tid in self.seen if decision_of[tid] != "allow"]
        hit_block = sum(self.truth[tid].is_fraud for tid in blocked)
        hit_flagged = sum(self.truth[tid].is_fraud for tid in flagged)
        delays = sorted(obs.delay for obs, _ in self.seen.values() if obs.delay is not None)
        return {
            "transactions": len(self.truth),
            "verdicts": len(self.seen),
            "missing": len(self.truth) - len(self.seen),
            "duplicates": self.duplicates,
            "rate": round(rate, 1),
            "seconds": round(seconds, 1),
            "frauds": len(frauds),
            "decisions": {d: self._decisions.get(d, 0) for d in DECISIONS},
            "precision_block": _ratio(hit_block, len(blocked)),
            "recall_block": _ratio(hit_block, len(frauds)),
            "precision_flagged": _ratio(hit_flagged, len(flagged)),
            "recall_flagged": _ratio(hit_flagged, len(frauds)),
            "confusion": self._confusion(decision_of),
            "scenarios": self._scenarios(decision_of),
            "fraud_amount": self._amounts(),
            "rules": self._rules(top_rules),
            "labels_sent": labels_sent,
            "labels_applied": labels_applied,
            "delay_ms": _delay_summary(delays),
            "charts": {
                "score_histogram": self._score_histogram(),
                "threshold_curve": self._threshold_curve(len(frauds)),
                "delay_histogram": _delay_histogram(delays),
                "decisions_over_time": self._over_time(),
            },
        }

    def _confusion(self, decision_of: Mapping[str, str]) -> dict[str, dict[str, int]]:
        table = {d: {"fraud": 0, "genuine": 0} for d in (*DECISIONS, "missing")}
        for tid, truth in self.truth.items():
            row = decision_of.get(tid, "missing")
            table[row]["fraud" if truth.is_fraud else "genuine"] += 1
        return table

    def _scenarios(self, decision_of: Mapping[str, str]) -> list[dict[str, Any]]:
        rows: dict[int, Counter[str]] = {}
        for tid, truth in self.truth.items():
            if truth.is_fraud:
                scenario = truth.scenario or 0
                rows.setdefault(scenario, Counter())[decision_of.get(tid, "missing")] += 1
        return [
            {
                "scenario": number,
                "name": SCENARIOS.get(number, "unknown"),
                "frauds": sum(counts.values()),
                "blocked": counts["block"],
                "reviewed": counts["review"],
                "missed": counts["allow"] + counts["missing"],
            }
            for number, counts in sorted(rows.items())
        ]

    def _amounts(self) -> dict[str, float]:
        amounts = {"blocked": 0.0, "reviewed": 0.0, "let_through": 0.0}
        key = {"block": "blocked", "review": "reviewed", "allow": "let_through"}
        for obs, _ in self.seen.values():
            if self.truth[obs.transaction_id].is_fraud:
                amounts[key[obs.decision]] += obs.amount
        return {name: round(value, 2) for name, value in amounts.items()}

    def _rules(self, top: int) -> list[dict[str, Any]]:
        fired: Counter[Reason] = Counter()
        frauds: Counter[Reason] = Counter()
        for obs, _ in self.seen.values():
            fraud = self.truth[obs.transaction_id].is_fraud
            for reason in set(obs.reasons):
                fired[reason] += 1
                frauds[reason] += fraud
        return [
            {
                "rule": reason.rule,
                "action": reason.action,
                "shadow": reason.shadow,
                "fired": count,
                "fraud": frauds[reason],
                "precision": _ratio(frauds[reason], count),
            }
            for reason, count in fired.most_common(top)
        ]

    def _score_histogram(self) -> dict[str, list[float] | list[int]]:
        fraud = [0] * SCORE_BINS
        genuine = [0] * SCORE_BINS
        for obs, _ in self.seen.values():
            if obs.score is None:
                continue
            index = min(SCORE_BINS - 1, int(obs.score * SCORE_BINS))
            if self.truth[obs.transaction_id].is_fraud:
                fraud[index] += 1
            else:
                genuine[index] += 1
        edges = [round(i / SCORE_BINS, 4) for i in range(SCORE_BINS + 1)]
        return {"edges": edges, "fraud": fraud, "genuine": genuine}

    def _threshold_curve(self, frauds: int) -> list[dict[str, float | None]]:
        """Precision and recall of `score > t` alone, for t from 0.01 to 0.99."""
        scored = sorted(
            (
                (obs.score, self.truth[obs.transaction_id].is_fraud)
                for obs, _ in self.seen.values()
                if obs.score is not None
            ),
            reverse=True,
        )
        curve = []
        index = flagged = hits = 0
        for threshold in reversed(THRESHOLDS):
            while index < len(scored) and scored[index][0] > threshold:
                flagged += 1
                hits += scored[index][1]
                index += 1
            curve.append(
                {
                    "threshold": threshold,
                    "precision": _ratio(hits, flagged),
                    "recall": _ratio(hits, frauds),
                }
            )
        curve.reverse()
        return curve

    def _over_time(self, bucket: float = 2.0) -> dict[str, Any]:
        """Verdicts per second by decision, and the delay's p99, per `bucket` seconds of arrival."""
        if not self.seen:
            return {
                "bucket_s": bucket,
                "start_s": [],
                **{d: [] for d in DECISIONS},
                "delay_p99_ms": [],
            }
        first = min(at for _, at in self.seen.values())
        last = max(at for _, at in self.seen.values())
        count = int((last - first) // bucket) + 1
        series = {d: [0.0] * count for d in DECISIONS}
        delays: list[list[float]] = [[] for _ in range(count)]
        for obs, at in self.seen.values():
            index = int((at - first) // bucket)
            series[obs.decision][index] += 1 / bucket
            if obs.delay is not None:
                delays[index].append(obs.delay)
        return {
            "bucket_s": bucket,
            "start_s": [round(first + i * bucket, 1) for i in range(count)],
            **{d: [round(v, 2) for v in values] for d, values in series.items()},
            "delay_p99_ms": [
                round(percentile(sorted(d), 0.99) * 1000, 1) if d else None for d in delays
            ],
        }


def _delay_summary(delays: Sequence[float]) -> dict[str, float | int | None]:
    if not delays:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    return {
        "count": len(delays),
        "p50": round(percentile(delays, 0.50) * 1000, 1),
        "p95": round(percentile(delays, 0.95) * 1000, 1),
        "p99": round(percentile(delays, 0.99) * 1000, 1),
        "max": round(delays[-1] * 1000, 1),
    }


def _delay_histogram(delays: Sequence[float]) -> dict[str, list[float] | list[int]]:
    """Counts of delays in equal bins from 0 to the 99.9th percentile (the rest in the last)."""
    if not delays:
        return {"edges_ms": [], "counts": []}
    top = max(percentile(delays, 0.999) * 1000, 1.0)
    width = top / DELAY_BINS
    counts = [0] * DELAY_BINS
    for delay in delays:
        counts[min(DELAY_BINS - 1, max(0, int(delay * 1000 / width)))] += 1
    return {"edges_ms": [round(i * width, 1) for i in range(DELAY_BINS + 1)], "counts": counts}
