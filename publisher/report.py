"""What verdicts say about the detector: decisions, delay and, given the truth, accuracy.

Pure computation, no Pub/Sub and no terminal, and the one place these figures are defined:
`python -m publisher watch` shows them, and the local demo's report (stack/report.py) adds
only its charts on top, so both count the same way:

    tally = Tally(load_labels(path))    # or Tally() without ground truth
    tally.add(parse_verdict(data, attributes, publish_time))
    tally.live()                        # cheap: the figures a live display refreshes
    tally.summary()                     # the final report, a JSON-ready dict

Vocabulary. *Flagged* is block or review (a person or a rule stopped it); *caught* is a
fraud that was flagged, *missed* one that was allowed. *Delay* is the verdict's publish time
minus its input's publish time (the `source_publish_time` attribute): queueing, the detector
and the verdict publish, not the watcher's own pull. Recall counts the labelled frauds that
have a verdict so far, not those still in flight; `summary(lost_are_missed=True)` also counts,
once a stream is over, the labelled frauds whose verdict never came (the demo knows its
stream exactly; a watcher that joins a subscription midway does not).

`summary()` keys (stable; ratios are None when undefined, e.g. without labels):

    verdicts, duplicates            verdicts counted; redeliveries ignored
    decisions                       {"allow", "review", "block"} -> count (+ any other value)
    delay_ms                        {"count", "p50", "p95", "p99", "max"} in ms (None if none)
    labelled, unlabelled, frauds    verdicts with / without a label; labelled frauds
    caught_block, caught_flagged    frauds blocked; frauds blocked or reviewed
    precision_block, recall_block, precision_flagged, recall_flagged
    confusion                       {"block" | "flagged": {"tp", "fp", "fn", "tn"}}
    by_scenario                     {"1" | "2" | "3" | "unknown": {"name", "frauds", "caught",
                                     "blocked", "missed", "amount", "amount_stopped",
                                     "amount_missed"}}
    amount_stopped                  fraud amount blocked
    amount_reviewed                 fraud amount sent to review
    amount_missed                   fraud amount allowed
    top_rules                       [{"rule", "action", "shadow", "fired", "labelled", "frauds",
                                     "precision"}], most fired first (verdict `reasons[]`;
                                     action and shadow as the rule first fired)
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import orjson

from publisher.labels import SCENARIOS, Label

__all__ = [
    "DECISIONS",
    "FLAGGED",
    "RateMeter",
    "Reason",
    "Tally",
    "Verdict",
    "parse_time",
    "parse_verdict",
    "percentile",
    "ratio",
]

log = logging.getLogger(__name__)

DECISIONS = ("allow", "review", "block")
#: Decisions that stop a transaction or send it to a person.
FLAGGED = frozenset({"review", "block"})
#: How many of the latest delays the live lag percentiles are taken over.
RECENT_DELAYS = 1_000
#: How many rules `summary()` lists.
TOP_RULES = 10
_FRACTION = re.compile(r"\.(\d+)")


def parse_time(text: str) -> dt.datetime:
    """Parse an RFC 3339 time ("2026-01-02T03:04:05.123456789Z"); nanoseconds are truncated.

    Raises:
        ValueError: not an RFC 3339 time with a zone.
    """
    trimmed = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text.strip(), count=1)
    parsed = dt.datetime.fromisoformat(trimmed)
    if parsed.tzinfo is None:
        raise ValueError(f"time has no zone: {text!r}")
    return parsed


class Reason(NamedTuple):
    """A rule that fired, as a verdict's `reasons[]` names it.

    Attributes:
        rule: the rule's id.
        action: what the rule asks for ("block", "review"...), None when the verdict omits it.
        shadow: the rule runs in shadow mode: it is reported but does not decide.
    """

    rule: str
    action: str | None = None
    shadow: bool = False


@dataclass(frozen=True)
class Verdict:
    """What a report keeps of one verdict message.

    Attributes:
        transaction_id: from the attribute or the body; None if neither has it.
        decision: "allow", "review", "block", or "unknown" when the message has none.
        delay: seconds from the input's publish to the verdict's publish, if measurable.
        amount: the transaction's amount as the verdict repeats it, if it is a number.
        reasons: the rules that fired (`reasons[]`), most severe first.
        score: the model's score, if the verdict has one.
    """

    transaction_id: str | None
    decision: str
    delay: float | None
    amount: float | None = None
    reasons: tuple[Reason, ...] = ()
    score: float | None = None


def _number(value: object) -> float | None:
    """A verdict's amount or score: a JSON number or a decimal string (as the contract allows)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        amount = float(value)
    except ValueError:
        return None
    return amount if math.isfinite(amount) else None


def _reasons(reasons: object) -> tuple[Reason, ...]:
    if not isinstance(reasons, list):
        return ()
    return tuple(
        Reason(
            reason["rule"],
            reason["action"] if isinstance(reason.get("action"), str) else None,
            reason.get("shadow") is True,
        )
        for reason in reasons
        if isinstance(reason, dict) and isinstance(reason.get("rule"), str)
    )


def parse_verdict(
    data: bytes, attributes: Mapping[str, str], publish_time: dt.datetime | None
) -> Verdict:
    """Read one verdict message: decision and id from the attributes first, then the body.

    Never raises: a message that is not a verdict is counted with decision "unknown".
    """
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        body = {}
    decision = attributes.get("decision")
    if decision is None and isinstance(body.get("decision"), str):
        decision = body["decision"]
    transaction_id = attributes.get("transaction_id")
    if transaction_id is None and isinstance(body.get("transaction_id"), str):
        transaction_id = body["transaction_id"]
    delay = None
    source = attributes.get("source_publish_time")
    if source and publish_time is not None:
        try:
            delay = (publish_time - parse_time(source)).total_seconds()
        except ValueError:
            log.warning("source_publish_time: not an RFC 3339 time, got %r", source)
    return Verdict(
        transaction_id,
        decision or "unknown",
        delay,
        _number(body.get("amount")),
        _reasons(body.get("reasons")),
        _number(body.get("score")),
    )


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def ratio(part: int, whole: int) -> float | None:
    """part / whole to 4 places, as every ratio of the report; None when whole is 0."""
    return round(part / whole, 4) if whole else None


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


@dataclass
class _Matrix:
    """Confusion counts for one definition of "predicted fraud"."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, predicted: bool, fraud: bool) -> None:
        if predicted:
            if fraud:
                self.tp += 1
            else:
                self.fp += 1
        elif fraud:
            self.fn += 1
        else:
            self.tn += 1

    @property
    def precision(self) -> float | None:
        return ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return ratio(self.tp, self.tp + self.fn)

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}


@dataclass
class _Scenario:
    frauds: int = 0
    blocked: int = 0
    reviewed: int = 0
    amount_stopped: float = 0.0
    amount_reviewed: float = 0.0
    amount_missed: float = 0.0

    def add(self, decision: str, amount: float) -> None:
        self.frauds += 1
        if decision == "block":
            self.blocked += 1
            self.amount_stopped += amount
        elif decision in FLAGGED:
            self.reviewed += 1
            self.amount_reviewed += amount
        else:
            self.amount_missed += amount


@dataclass
class _Rule:
    action: str | None
    shadow: bool
    fired: int = 0
    labelled: int = 0
    frauds: int = 0


def _scenario_key(label: Label) -> str:
    return "unknown" if label.scenario is None else str(label.scenario)


@dataclass
class Tally:
    """Running counts of verdicts; a transaction seen twice (a redelivery) counts once.

    Args:
        labels: transaction id -> truth; None when there is no ground truth.

    Besides the counts it keeps every delay (`delays`, seconds, in arrival order) and the
    score of every labelled verdict that has one (`scores`, (score, is fraud)), for charts.
    """

    labels: Mapping[str, Label] | None = None
    total: int = field(default=0, init=False)
    duplicates: int = field(default=0, init=False)
    decisions: Counter[str] = field(default_factory=Counter, init=False)
    delays: list[float] = field(default_factory=list, init=False)
    recent_delays: deque[float] = field(
        default_factory=lambda: deque(maxlen=RECENT_DELAYS), init=False
    )
    scores: list[tuple[float, bool]] = field(default_factory=list, init=False)
    seen: set[str] = field(default_factory=set, init=False)
    unlabelled: int = field(default=0, init=False)
    block: _Matrix = field(default_factory=_Matrix, init=False)
    flagged: _Matrix = field(default_factory=_Matrix, init=False)
    scenarios: dict[str, _Scenario] = field(default_factory=dict, init=False)
    rules: dict[str, _Rule] = field(default_factory=dict, init=False)

    def add(self, verdict: Verdict) -> bool:
        """Count a verdict; False if its transaction was already counted."""
        if verdict.transaction_id is not None:
            if verdict.transaction_id in self.seen:
                self.duplicates += 1
                return False
            self.seen.add(verdict.transaction_id)
        self.total += 1
        self.decisions[verdict.decision] += 1
        if verdict.delay is not None:
            self.delays.append(verdict.delay)
            self.recent_delays.append(verdict.delay)
        label = None
        if self.labels is not None and verdict.transaction_id is not None:
            label = self.labels.get(verdict.transaction_id)
        fired: dict[str, Reason] = {}  # a rule listed twice fired once
        for reason in verdict.reasons:
            fired.setdefault(reason.rule, reason)
        for reason in fired.values():
            counts = self.rules.setdefault(reason.rule, _Rule(reason.action, reason.shadow))
            counts.fired += 1
            if label is not None:
                counts.labelled += 1
                counts.frauds += label.is_fraud
        if label is None:
            self.unlabelled += 1
            return True
        if verdict.score is not None:
            self.scores.append((verdict.score, label.is_fraud))
        self.block.add(verdict.decision == "block", label.is_fraud)
        self.flagged.add(verdict.decision in FLAGGED, label.is_fraud)
        if label.is_fraud:
            scenario = self.scenarios.setdefault(_scenario_key(label), _Scenario())
            scenario.add(verdict.decision, verdict.amount or 0.0)
        return True

    def add_all(self, verdicts: Iterable[Verdict]) -> None:
        """Count many verdicts (a recorded file, a test)."""
        for verdict in verdicts:
            self.add(verdict)

    @property
    def labelled(self) -> int:
        return self.total - self.unlabelled

    def lost_frauds(self) -> list[Label]:
        """The labelled frauds that have no verdict (yet)."""
        if self.labels is None:
            return []
        return [
            label for tid, label in self.labels.items() if label.is_fraud and tid not in self.seen
        ]

    def _decisions(self) -> dict[str, int]:
        decisions = {name: self.decisions.get(name, 0) for name in DECISIONS}
        decisions.update({k: v for k, v in self.decisions.items() if k not in decisions})
        return decisions

    def _quality(self, block: _Matrix, flagged: _Matrix) -> dict[str, Any]:
        return {
            "labelled": self.labelled,
            "unlabelled": self.unlabelled,
            "frauds": block.tp + block.fn,
            "caught_block": block.tp,
            "caught_flagged": flagged.tp,
            "precision_block": block.precision,
            "recall_block": block.recall,
            "precision_flagged": flagged.precision,
            "recall_flagged": flagged.recall,
        }

    def live(self) -> dict[str, Any]:
        """The figures a live display shows; lag over the latest RECENT_DELAYS verdicts.

        Keys: verdicts, duplicates, decisions, lag_ms {"p50", "p99"} (None before any delay),
        and those of `summary()` from labelled to recall_flagged.
        """
        lag: dict[str, float | None] = {"p50": None, "p99": None}
        if self.recent_delays:
            recent = sorted(self.recent_delays)
            lag = {"p50": _ms(percentile(recent, 0.50)), "p99": _ms(percentile(recent, 0.99))}
        return {
            "verdicts": self.total,
            "duplicates": self.duplicates,
            "decisions": self._decisions(),
            "lag_ms": lag,
            **self._quality(self.block, self.flagged),
        }

    def delay_ms(self) -> dict[str, float | int | None]:
        """p50/p95/p99/max of the delay over every verdict, in milliseconds."""
        if not self.delays:
            return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
        ordered = sorted(self.delays)
        return {
            "count": len(ordered),
            "p50": _ms(percentile(ordered, 0.50)),
            "p95": _ms(percentile(ordered, 0.95)),
            "p99": _ms(percentile(ordered, 0.99)),
            "max": _ms(ordered[-1]),
        }

    def summary(self, top: int = TOP_RULES, *, lost_are_missed: bool = False) -> dict[str, Any]:
        """The final report as a JSON-ready dict (keys in the module docstring).

        Args:
            top: how many rules `top_rules` lists.
            lost_are_missed: the labels are exactly the stream's transactions and no verdict
                is still on its way, so a labelled fraud without a verdict was lost: it counts
                as missed (a false negative, in `frauds` and in its scenario, amount unknown).
        """
        block, flagged = self.block, self.flagged
        scenarios = self.scenarios
        if lost_are_missed:
            lost = self.lost_frauds()
            block = replace(block, fn=block.fn + len(lost))
            flagged = replace(flagged, fn=flagged.fn + len(lost))
            scenarios = {key: replace(s) for key, s in scenarios.items()}
            for label in lost:
                scenarios.setdefault(_scenario_key(label), _Scenario()).add("lost", 0.0)
        by_scenario = {}
        for key in sorted(scenarios, key=lambda k: (not k.isdigit(), k.zfill(9))):
            s = scenarios[key]
            caught = s.blocked + s.reviewed
            by_scenario[key] = {
                "name": SCENARIOS.get(int(key), f"scenario {key}") if key.isdigit() else key,
                "frauds": s.frauds,
                "caught": caught,
                "blocked": s.blocked,
                "missed": s.frauds - caught,
                "amount": round(s.amount_stopped + s.amount_reviewed + s.amount_missed, 2),
                "amount_stopped": round(s.amount_stopped, 2),
                "amount_missed": round(s.amount_missed, 2),
            }
        ranked = sorted(self.rules.items(), key=lambda item: (-item[1].fired, item[0]))[:top]
        return {
            "verdicts": self.total,
            "duplicates": self.duplicates,
            "decisions": self._decisions(),
            "delay_ms": self.delay_ms(),
            **self._quality(block, flagged),
            "confusion": {"block": block.as_dict(), "flagged": flagged.as_dict()},
            "by_scenario": by_scenario,
            "amount_stopped": round(sum(s.amount_stopped for s in scenarios.values()), 2),
            "amount_reviewed": round(sum(s.amount_reviewed for s in scenarios.values()), 2),
            "amount_missed": round(sum(s.amount_missed for s in scenarios.values()), 2),
            "top_rules": [
                {
                    "rule": rule,
                    "action": counts.action,
                    "shadow": counts.shadow,
                    "fired": counts.fired,
                    "labelled": counts.labelled,
                    "frauds": counts.frauds,
                    "precision": ratio(counts.frauds, counts.labelled),
                }
                for rule, counts in ranked
            ],
        }


class RateMeter:
    """Events per second over a sliding window of wall time (times are passed in: pure).

    Args:
        window: seconds the rate is averaged over.
    """

    def __init__(self, window: float = 5.0) -> None:
        self._window = window
        self._samples: deque[tuple[float, int]] = deque()

    def observe(self, now: float, total: int) -> None:
        """Record that `total` events had happened by `now` (monotonic seconds)."""
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()

    @property
    def rate(self) -> float:
        """Events per second across the window; 0 before two observations."""
        if len(self._samples) < 2:
            return 0.0
        (start, first), (end, last) = self._samples[0], self._samples[-1]
        return (last - first) / (end - start) if end > start else 0.0
