"""The demo's report: publisher.report's figures for the demo's stream, plus its charts.

Every figure the watcher also shows (decisions, precision and recall for block and for
flagged, confusion, frauds by scenario, fraud amounts, rules, delay percentiles) is counted
by `publisher.report.Tally`, so that `python -m publisher watch --labels` and the demo count
the same way. This layer adds only what the demo knows or draws:

- its stream exactly: a verdict for a transaction it did not publish (the warm-up's) is left
  out, and once the stream is over a fraud whose verdict never came is missed, so recall is
  over every fraud published (`summary(lost_are_missed=True)`);
- when each verdict arrived, the labels sent and applied, the stream's rate and length;
- the series of the HTML page's charts (stack/report_html.py).

`Tally.report()` is a JSON-ready dict whose top-level names are stable: `decisions`,
`precision_block`, `recall_block`, `precision_flagged`, `recall_flagged`, `labels_applied`,
`delay_ms` with `p50`/`p95`/`p99`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from publisher.labels import Label
from publisher.report import DECISIONS, Verdict, percentile, ratio
from publisher.report import Tally as Figures

__all__ = ["Tally"]

THRESHOLDS = tuple(round(0.01 * step, 2) for step in range(1, 100))
SCORE_BINS = 20
DELAY_BINS = 24


@dataclass
class Tally:
    """The demo's verdicts against `truth`, every transaction of its stream by id.

    `figures` counts them (a redelivery once, with the first verdict); `unknown` counts the
    verdicts of transactions outside the stream, which no figure includes.
    """

    truth: Mapping[str, Label]
    figures: Figures = field(init=False)
    unknown: int = field(default=0, init=False)
    # (seconds into the run, decision, delay) of each verdict counted, for the time series.
    _arrivals: list[tuple[float, str, float | None]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.figures = Figures(self.truth)

    @property
    def verdicts(self) -> int:
        return self.figures.total

    @property
    def duplicates(self) -> int:
        return self.figures.duplicates

    def add(self, verdict: Verdict, at: float) -> bool:
        """Count a verdict that arrived `at` seconds into the run; False if not counted."""
        if verdict.transaction_id not in self.truth:
            self.unknown += 1
            return False
        if not self.figures.add(verdict):
            return False
        self._arrivals.append((at, verdict.decision, verdict.delay))
        return True

    def live(self) -> dict[str, Any]:
        """The live figures, as `publisher watch` shows them (`publisher.report.Tally.live`)."""
        return self.figures.live()

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
        summary = self.figures.summary(top_rules, lost_are_missed=True)
        return {
            "transactions": len(self.truth),
            "verdicts": summary["verdicts"],
            "missing": len(self.truth) - summary["verdicts"],
            "duplicates": summary["duplicates"],
            "rate": round(rate, 1),
            "seconds": round(seconds, 1),
            "frauds": summary["frauds"],
            "decisions": summary["decisions"],
            "precision_block": summary["precision_block"],
            "recall_block": summary["recall_block"],
            "precision_flagged": summary["precision_flagged"],
            "recall_flagged": summary["recall_flagged"],
            "confusion": summary["confusion"],
            # The demo's tables under the names its JSON has always had.
            "scenarios": [
                {
                    "scenario": int(key) if key.isdigit() else 0,
                    "name": row["name"],
                    "frauds": row["frauds"],
                    "blocked": row["blocked"],
                    "reviewed": row["caught"] - row["blocked"],
                    "missed": row["missed"],
                }
                for key, row in summary["by_scenario"].items()
            ],
            "fraud_amount": {
                "blocked": summary["amount_stopped"],
                "reviewed": summary["amount_reviewed"],
                "let_through": summary["amount_missed"],
            },
            "rules": [
                {
                    "rule": row["rule"],
                    "action": row["action"],
                    "shadow": row["shadow"],
                    "fired": row["fired"],
                    "fraud": row["frauds"],
                    "precision": row["precision"],
                }
                for row in summary["top_rules"]
            ],
            "labels_sent": labels_sent,
            "labels_applied": labels_applied,
            "delay_ms": summary["delay_ms"],
            "charts": {
                "score_histogram": _score_histogram(self.figures.scores),
                "threshold_curve": _threshold_curve(self.figures.scores, summary["frauds"]),
                "delay_histogram": _delay_histogram(sorted(self.figures.delays)),
                "decisions_over_time": self._over_time(),
            },
        }

    def _over_time(self, bucket: float = 2.0) -> dict[str, Any]:
        """Verdicts per second by decision, and the delay's p99, per `bucket` seconds of arrival."""
        if not self._arrivals:
            return {
                "bucket_s": bucket,
                "start_s": [],
                **{d: [] for d in DECISIONS},
                "delay_p99_ms": [],
            }
        first = min(at for at, _, _ in self._arrivals)
        last = max(at for at, _, _ in self._arrivals)
        count = int((last - first) // bucket) + 1
        series = {d: [0.0] * count for d in DECISIONS}
        delays: list[list[float]] = [[] for _ in range(count)]
        for at, decision, delay in self._arrivals:
            index = int((at - first) // bucket)
            if decision in series:
                series[decision][index] += 1 / bucket
            if delay is not None:
                delays[index].append(delay)
        return {
            "bucket_s": bucket,
            "start_s": [round(first + i * bucket, 1) for i in range(count)],
            **{d: [round(v, 2) for v in values] for d, values in series.items()},
            "delay_p99_ms": [
                round(percentile(sorted(d), 0.99) * 1000, 1) if d else None for d in delays
            ],
        }


def _score_histogram(scores: Sequence[tuple[float, bool]]) -> dict[str, list[float] | list[int]]:
    """Counts of frauds and of genuine transactions in equal score bins from 0 to 1."""
    fraud = [0] * SCORE_BINS
    genuine = [0] * SCORE_BINS
    for score, is_fraud in scores:
        index = min(SCORE_BINS - 1, max(0, int(score * SCORE_BINS)))
        (fraud if is_fraud else genuine)[index] += 1
    edges = [round(i / SCORE_BINS, 4) for i in range(SCORE_BINS + 1)]
    return {"edges": edges, "fraud": fraud, "genuine": genuine}


def _threshold_curve(
    scores: Sequence[tuple[float, bool]], frauds: int
) -> list[dict[str, float | None]]:
    """Precision and recall of `score > t` alone, for t from 0.01 to 0.99, over `frauds`."""
    scored = sorted(scores, reverse=True)
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
                "precision": ratio(hits, flagged),
                "recall": ratio(hits, frauds),
            }
        )
    curve.reverse()
    return curve


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
