"""The watcher: what downstream subscribers of the verdict topic receive.

Pure core: `parse_verdict()` turns one message into a `Verdict`, `Tally` counts verdicts by
decision, keeps end-to-end delays (verdict publish time - `source_publish_time` attribute)
and, given labels, builds the confusion matrix (predicted fraud = decision "block").
Edge: `watch()` runs a streaming pull on a subscription until N verdicts or an idle timeout.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import queue
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from publisher.errors import ConfigError, InputError, PubSubError
from publisher.progress import Progress

logger = logging.getLogger(__name__)

DECISIONS = ("allow", "review", "block")
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


@dataclass(frozen=True)
class Verdict:
    """What the watcher keeps of one verdict message.

    Attributes:
        transaction_id: from the attribute or the body; None if neither has it.
        decision: "allow", "review", "block", or "unknown" when the message has none.
        delay: seconds from the input's publish to the verdict's publish, if measurable.
    """

    transaction_id: str | None
    decision: str
    delay: float | None


def parse_verdict(
    data: bytes, attributes: Mapping[str, str], publish_time: dt.datetime | None
) -> Verdict:
    """Read decision, transaction id and delay from a verdict message, attributes first."""
    decision = attributes.get("decision")
    transaction_id = attributes.get("transaction_id")
    if decision is None or transaction_id is None:
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, dict):
            if decision is None and isinstance(body.get("decision"), str):
                decision = body["decision"]
            if transaction_id is None and isinstance(body.get("transaction_id"), str):
                transaction_id = body["transaction_id"]
    delay = None
    source = attributes.get("source_publish_time")
    if source and publish_time is not None:
        try:
            delay = (publish_time - parse_time(source)).total_seconds()
        except ValueError:
            logger.warning("source_publish_time: not an RFC 3339 time, got %r", source)
    return Verdict(transaction_id, decision or "unknown", delay)


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty list."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Tally:
    """Running counts of verdicts; duplicates (same transaction id) are counted once."""

    decisions: Counter[str] = field(default_factory=Counter)
    delays: list[float] = field(default_factory=list)
    seen: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0
    total: int = 0

    def add(self, verdict: Verdict) -> bool:
        """Count a verdict; False if its transaction was already counted (a redelivery)."""
        if verdict.transaction_id is not None:
            if verdict.transaction_id in self.seen:
                self.duplicates += 1
                return False
            self.seen[verdict.transaction_id] = verdict.decision
        self.total += 1
        self.decisions[verdict.decision] += 1
        if verdict.delay is not None:
            self.delays.append(verdict.delay)
        return True

    def delay_ms(self) -> dict[str, float | int | None]:
        """p50/p95/p99/max of the end-to-end delay in milliseconds."""
        if not self.delays:
            return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
        ordered = sorted(self.delays)
        return {
            "count": len(ordered),
            "p50": round(percentile(ordered, 0.50) * 1000, 1),
            "p95": round(percentile(ordered, 0.95) * 1000, 1),
            "p99": round(percentile(ordered, 0.99) * 1000, 1),
            "max": round(ordered[-1] * 1000, 1),
        }

    def quality(self, labels: Mapping[str, bool]) -> dict[str, Any]:
        """Confusion matrix, precision and recall against ground truth (block = fraud)."""
        tp = fp = fn = tn = review_fraud = review_genuine = unlabelled = 0
        for transaction_id, decision in self.seen.items():
            truth = labels.get(transaction_id)
            if truth is None:
                unlabelled += 1
                continue
            blocked = decision == "block"
            tp += truth and blocked
            fp += (not truth) and blocked
            fn += truth and not blocked
            tn += (not truth) and not blocked
            if decision == "review":
                review_fraud += truth
                review_genuine += not truth
        return {
            "labelled": tp + fp + fn + tn,
            "unlabelled": unlabelled,
            "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None,
            "review": {"fraud": review_fraud, "genuine": review_genuine},
        }

    def report(
        self, labels: Mapping[str, bool] | None, stopped_by: str, seconds: float
    ) -> dict[str, Any]:
        """The final report as a JSON-ready dict."""
        decisions = {name: self.decisions.get(name, 0) for name in DECISIONS}
        decisions.update({k: v for k, v in self.decisions.items() if k not in decisions})
        result: dict[str, Any] = {
            "verdicts": self.total,
            "duplicates": self.duplicates,
            "stopped_by": stopped_by,
            "seconds": round(seconds, 3),
            "decisions": decisions,
            "delay_ms": self.delay_ms(),
        }
        if labels is not None:
            result["labels"] = self.quality(labels)
        return result

    def status(self) -> str:
        """A short live summary for the progress line."""
        parts = "  ".join(f"{name} {self.decisions.get(name, 0):,}" for name in DECISIONS)
        if self.delays:
            recent = sorted(self.delays[-1000:])
            parts += f"  p95 {percentile(recent, 0.95) * 1000:,.0f} ms"
        return "  |  " + parts


def format_report(report: Mapping[str, Any]) -> str:
    """The report as text for people."""
    lines = [
        f"verdicts: {report['verdicts']:,} in {report['seconds']:.1f} s "
        f"(stopped by {report['stopped_by']}; {report['duplicates']:,} duplicates ignored)",
        "decisions: "
        + ", ".join(f"{name} {count:,}" for name, count in report["decisions"].items()),
    ]
    delay = report["delay_ms"]
    if delay["count"]:
        lines.append(
            f"delay publish->verdict (ms, n={delay['count']:,}): p50 {delay['p50']}, "
            f"p95 {delay['p95']}, p99 {delay['p99']}, max {delay['max']}"
        )
    else:
        lines.append("delay publish->verdict: no source_publish_time attributes seen")
    labels = report.get("labels")
    if labels is not None:
        c = labels["confusion"]

        def ratio(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        lines += [
            f"labelled: {labels['labelled']:,} (unlabelled {labels['unlabelled']:,})",
            f"precision {ratio(labels['precision'])}, recall {ratio(labels['recall'])} "
            "(predicted fraud = block)",
            "confusion:           truth fraud  truth genuine",
            f"  block             {c['tp']:>11,}  {c['fp']:>13,}",
            f"  allow or review   {c['fn']:>11,}  {c['tn']:>13,}",
            f"review: {labels['review']['fraud']:,} fraud, {labels['review']['genuine']:,} genuine",
        ]
    return "\n".join(lines)


def load_labels(path: Path) -> dict[str, bool]:
    """Read a labels file (JSON lines with transaction_id and is_fraud).

    Raises:
        InputError: the file is missing, unreadable, or a line is not a label.
    """
    labels: dict[str, bool] = {}
    try:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    item = orjson.loads(line)
                except orjson.JSONDecodeError as error:
                    raise InputError(f"--labels: {path}:{number}: not JSON ({error})") from error
                if not (
                    isinstance(item, dict)
                    and isinstance(item.get("transaction_id"), str)
                    and isinstance(item.get("is_fraud"), bool)
                ):
                    raise InputError(
                        f"--labels: {path}:{number}: must be an object with "
                        "transaction_id (string) and is_fraud (boolean)"
                    )
                labels[item["transaction_id"]] = item["is_fraud"]
    except OSError as error:
        raise InputError(f"--labels: cannot read {path}: {error.strerror}") from error
    return labels


@dataclass(frozen=True)
class WatchOptions:
    """When to stop: after `count` verdicts, or `idle_timeout` seconds without one."""

    count: int | None = None
    idle_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.count is not None and self.count < 1:
            raise ConfigError(f"--count: must be >= 1, got {self.count}")
        if not self.idle_timeout > 0:
            raise ConfigError(f"--idle-timeout: must be > 0, got {self.idle_timeout}")


def watch(
    project: str,
    subscription: str,
    options: WatchOptions,
    emulator_host: str | None = None,
    progress: Progress | None = None,
    now: Callable[[], float] = time.monotonic,
) -> tuple[Tally, str, float]:
    """Pull verdicts from a subscription until done; returns (tally, stopped_by, seconds).

    Raises:
        PubSubError: the subscription does not exist or Pub/Sub cannot be reached.
    """
    from google.api_core import exceptions
    from google.auth.exceptions import GoogleAuthError
    from google.cloud import pubsub_v1
    from google.cloud.pubsub_v1 import types

    from publisher.publish import check_exists, client_error

    try:
        subscriber = pubsub_v1.SubscriberClient()
    except GoogleAuthError as error:
        raise client_error(error, emulator_host) from error
    path = (
        subscription
        if subscription.startswith("projects/")
        else subscriber.subscription_path(project, subscription)
    )
    check_exists(
        lambda p, **kw: subscriber.get_subscription(subscription=p, **kw),
        "subscription",
        path,
        "--subscription",
        emulator_host,
    )

    inbox: queue.SimpleQueue[Verdict] = queue.SimpleQueue()

    def on_message(message: Any) -> None:
        inbox.put(parse_verdict(message.data, dict(message.attributes), message.publish_time))
        message.ack()

    tally = Tally()
    start = now()
    stopped_by = "idle"
    pull = subscriber.subscribe(
        path, on_message, flow_control=types.FlowControl(max_messages=2_000)
    )
    try:
        last = now()
        while options.count is None or tally.total < options.count:
            if pull.done():
                raise PubSubError(f"--subscription: pulling from {path} failed: {pull.exception()}")
            try:
                verdict = inbox.get(timeout=min(0.5, options.idle_timeout))
            except queue.Empty:
                if now() - last >= options.idle_timeout:
                    break
                continue
            last = now()
            tally.add(verdict)
            if progress is not None:
                progress.update(tally.total, tally.status())
        else:
            stopped_by = "count"
    except KeyboardInterrupt:
        stopped_by = "interrupt"
    finally:
        pull.cancel()
        try:
            pull.result(timeout=10)
        except (exceptions.GoogleAPICallError, TimeoutError, CancelledError):
            # The pull is over either way; how it ended does not change the report.
            logger.debug("streaming pull ended", exc_info=True)
        subscriber.close()
        if progress is not None:
            progress.close()
    return tally, stopped_by, now() - start
