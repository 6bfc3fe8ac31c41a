"""Offline replay (backtest): run the detection core over a file of transactions.

    python -m detector replay --input tx.jsonl --output verdicts.jsonl \\
        [--labels labels.jsonl --label-delay 7d] [--rules FILE] [--model MODEL|none]

The same `Detector` as the functions (decode, state, model, rules) runs over the transactions
in file order, which must be event-time order (as `python -m publisher simulate` writes it;
a line out of order is processed where it stands, like a late delivery, and counted). State
lives in a `MemoryStore`. Each label becomes known at its transaction's time plus the delay
and is recorded in the store just before the first transaction at or after that moment
(`merge_labels`, which training reuses), as the feedback function would have recorded it.

Differences from the live functions, on purpose: a verdict's ``decided_at`` is the
transaction's event time (so the output is a pure function of the input), and
``message_id`` is null (``line-N`` for a transaction without a transaction_id, which becomes
its id too). A transaction without a timestamp takes the latest event time seen.
Invalid lines are counted (they would be dead-lettered) and skipped.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import orjson

from detector.engine import Detector
from detector.errors import ConfigError, MessageError
from detector.transaction import Transaction, decode

log = logging.getLogger(__name__)

T = TypeVar("T")

_DELAY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([dhms]?)\s*$")
_UNIT = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}


class ReplayError(ConfigError):
    """Unusable replay input or option (a file, a label line, a delay)."""


def parse_delay(text: str) -> float:
    """Seconds of a delay like "7d", "12h", "15m", "90s" or "0".

    Raises:
        ReplayError: not a non-negative number with an optional unit d, h, m or s.
    """
    match = _DELAY.match(text)
    if match is None:
        raise ReplayError(f"--label-delay: expected a number and one of d, h, m, s, got {text!r}")
    return float(match.group(1)) * _UNIT[match.group(2)]


def parse_time(text: str) -> datetime:
    """A date (YYYY-MM-DD, midnight UTC) or an RFC 3339 date-time.

    Raises:
        ReplayError: neither.
    """
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ReplayError(f"expected a date YYYY-MM-DD or an RFC 3339 time, got {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def read_labels(path: Path) -> dict[str, bool]:
    """Labels by transaction_id from a JSON-lines file of {"transaction_id", "is_fraud"}.

    Raises:
        ReplayError: the file cannot be read, or a line is not a label (names the line).
    """
    labels: dict[str, bool] = {}
    try:
        with path.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    item = orjson.loads(line)
                except orjson.JSONDecodeError:
                    raise ReplayError(f"{path}:{number}: not a JSON object") from None
                tid = item.get("transaction_id") if isinstance(item, dict) else None
                fraud = item.get("is_fraud") if isinstance(item, dict) else None
                if not isinstance(tid, str) or not tid or not isinstance(fraud, bool):
                    raise ReplayError(
                        f"{path}:{number}: a label needs a transaction_id string and an "
                        f"is_fraud boolean, got {line[:120]!r}"
                    )
                labels[tid] = fraud
    except OSError as error:
        raise ReplayError(f"--labels: cannot read {str(path)!r} ({error.strerror})") from None
    return labels


@dataclass(frozen=True, slots=True)
class KnownLabel:
    """A label at the moment it becomes known (transaction time + delay)."""

    transaction_id: str
    is_fraud: bool
    known_at: float


@dataclass(frozen=True, slots=True)
class Timed(Generic[T]):
    """A stream item at its event time (epoch seconds)."""

    time: float
    transaction_id: str
    item: T


def merge_labels(
    stream: Iterable[Timed[T]], labels: Mapping[str, bool], delay: float
) -> Iterator[Timed[T] | KnownLabel]:
    """Interleave labels with the transactions they label, at the moment they become known.

    The label of a transaction at time t becomes known at t + delay and is yielded just
    before the first transaction at or after that moment; labels never known before the
    stream ends are not yielded (nothing would see them). Replay and training both use this,
    so a model learns from exactly the fraud counts that live scoring sees.
    """
    pending: list[tuple[float, int, str, bool]] = []
    sequence = 0
    for timed in stream:
        while pending and pending[0][0] <= timed.time:
            known_at, _, tid, fraud = heapq.heappop(pending)
            yield KnownLabel(tid, fraud, known_at)
        yield timed
        label = labels.get(timed.transaction_id)
        if label is not None:
            heapq.heappush(pending, (timed.time + delay, sequence, timed.transaction_id, label))
            sequence += 1


@dataclass(frozen=True, slots=True)
class Decoded:
    """One input line, decoded and validated."""

    raw: dict[str, Any]
    transaction: Transaction
    moment: datetime


#: A decoded line: (event time in epoch seconds, transaction_id, raw, transaction, moment).
Row = tuple[float, str, dict[str, Any], Transaction, datetime]


@dataclass
class Stream:
    """Reads transactions from JSON lines, in file order, as `Timed` items; counts problems."""

    lines: Iterable[bytes]
    until: float | None = None
    invalid: int = 0
    out_of_order: int = 0
    untimed: int = 0
    examples: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Timed[Decoded]]:
        for when, tid, raw, transaction, moment in self.rows():
            yield Timed(when, tid, Decoded(raw, transaction, moment))

    def rows(self) -> Iterator[Row]:
        """The same items as plain `Row` tuples: no objects per line but the tuple."""
        latest = float("-inf")
        latest_moment: datetime | None = None
        for number, line in enumerate(self.lines, 1):
            if not line.strip():
                continue
            try:
                raw, transaction = decode(line)
            except MessageError as error:
                self.invalid += 1
                if len(self.examples) < 5:
                    self.examples.append(f"line {number}: {error}")
                    log.warning("line %d skipped (would be dead-lettered): %s", number, error)
                continue
            moment = transaction.timestamp
            if moment is None:
                if latest_moment is None:
                    self.invalid += 1
                    if len(self.examples) < 5:
                        self.examples.append(f"line {number}: no timestamp and none before it")
                    continue
                self.untimed += 1
                moment = latest_moment
            when = moment.timestamp()
            if self.until is not None and when >= self.until:
                return
            if when < latest:
                self.out_of_order += 1
            else:
                latest, latest_moment = when, moment
            tid = transaction.transaction_id or f"line-{number}"
            yield when, tid, raw, transaction, moment


@dataclass
class Outcome:
    """What a replay did; `summary` renders it."""

    transactions: int = 0
    labels_injected: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    invalid: int = 0
    out_of_order: int = 0
    untimed: int = 0
    labelled: int = 0
    frauds: int = 0
    flagged_frauds: int = 0
    blocked_frauds: int = 0
    rule_hits: Counter[str] = field(default_factory=Counter)
    rule_fraud_hits: Counter[str] = field(default_factory=Counter)
    scores: list[tuple[float, bool]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Transactions per second of wall time."""
        return self.transactions / self.seconds if self.seconds else 0.0

    @property
    def cpu_rate(self) -> float:
        """Transactions per second of this process's CPU time (robust to a busy machine)."""
        return self.transactions / self.cpu_seconds if self.cpu_seconds else 0.0


def replay(
    detector: Detector,
    lines: Iterable[bytes],
    write: Callable[[bytes], Any] | None = None,
    *,
    labels: Mapping[str, bool] | None = None,
    label_delay: float = 0.0,
    until: datetime | None = None,
    progress: Callable[[int], None] | None = None,
) -> Outcome:
    """Decide on every transaction of `lines` in order, injecting labels as they become known.

    Args:
        detector: the detection core; its store should be a fresh `MemoryStore`.
        lines: JSON transactions, one per item, in event-time order.
        write: receives each verdict as one JSON line (with newline).
        labels: ground truth by transaction_id, injected after `label_delay` seconds and used
            for the precision and recall of the outcome.
        until: stop at the first transaction at or after this time.
        progress: called with the count of transactions every 100,000.
    """
    outcome = Outcome()
    stream = Stream(lines, until.timestamp() if until is not None else None)
    truth = labels or {}
    store = detector.store
    decide = detector.decide
    scored = detector.model is not None and bool(truth)
    # The store keeps millions of small objects alive: the cyclic collector would walk them
    # all again and again (about half the run time) while finding nothing to free.
    was_enabled = gc.isenabled()
    gc.disable()
    started = time.perf_counter()
    cpu_started = time.process_time()
    # `merge_labels` inlined on plain tuples: the generator, `Timed`/`Decoded` objects and
    # isinstance checks per line cost about as much as the rules.
    pending: list[tuple[float, int, str, bool]] = []
    sequence = 0
    heappush, heappop = heapq.heappush, heapq.heappop
    record_label = store.record_label if store is not None else None
    get_truth = truth.get
    decisions = outcome.decisions
    rule_hits = outcome.rule_hits
    rule_fraud_hits = outcome.rule_fraud_hits
    scores = outcome.scores
    dumps = orjson.dumps
    newline = orjson.OPT_APPEND_NEWLINE
    count = labelled = frauds = flagged = blocked = injected = 0
    try:
        for when, tid, raw, transaction, moment in stream.rows():
            while pending and pending[0][0] <= when:
                _, _, label_id, label_fraud = heappop(pending)
                if record_label is not None:
                    record_label(label_id, label_fraud)
                injected += 1
            verdict = decide(
                raw,
                transaction,
                # A transaction without an id gets "line-N" (deterministic) rather than a
                # random one: its verdict's transaction_id and message_id.
                message_id=None if transaction.transaction_id else tid,
                default_time=moment,
                decided_at=moment,
            )
            count += 1
            decision = verdict.decision
            decisions[decision] += 1
            body = verdict.body
            if write is not None:
                write(dumps(body, option=newline))
            fraud = get_truth(tid)
            if fraud is not None:
                labelled += 1
                if scored:
                    scores.append((verdict.score, fraud))
                heappush(pending, (when + label_delay, sequence, tid, fraud))
                sequence += 1
                if fraud:
                    frauds += 1
                    if decision != "allow":
                        flagged += 1
                    if decision == "block":
                        blocked += 1
            reasons = body["reasons"]
            if reasons:
                for reason in reasons:
                    rule = reason["rule"]
                    rule_hits[rule] += 1
                    if fraud:
                        rule_fraud_hits[rule] += 1
            if progress is not None and count % 100_000 == 0:
                progress(count)
    finally:
        outcome.transactions = count
        outcome.labels_injected = injected
        outcome.labelled = labelled
        outcome.frauds = frauds
        outcome.flagged_frauds = flagged
        outcome.blocked_frauds = blocked
        outcome.seconds = time.perf_counter() - started
        outcome.cpu_seconds = time.process_time() - cpu_started
        if was_enabled:
            gc.enable()
    outcome.invalid = stream.invalid
    outcome.out_of_order = stream.out_of_order
    outcome.untimed = stream.untimed
    return outcome


def _ratio(part: int, whole: int) -> str:
    return f"{part / whole:.3f}" if whole else "n/a"


def summary(outcome: Outcome) -> str:
    """A human-readable report: decisions; with labels, precision/recall overall and per rule."""
    from detector.evaluate import auc_roc, average_precision

    lines = [
        f"transactions: {outcome.transactions:,} in {outcome.seconds:.1f} s "
        f"({outcome.rate:,.0f}/s; {outcome.cpu_rate:,.0f}/s of CPU time)",
        "decisions: "
        + ", ".join(f"{d} {outcome.decisions.get(d, 0):,}" for d in ("allow", "review", "block")),
    ]
    if outcome.invalid or outcome.out_of_order or outcome.untimed:
        lines.append(
            f"input: {outcome.invalid:,} invalid (skipped), {outcome.out_of_order:,} out of "
            f"event-time order, {outcome.untimed:,} without timestamp"
        )
    if outcome.labelled:
        flagged = outcome.decisions.get("review", 0) + outcome.decisions.get("block", 0)
        blocked = outcome.decisions.get("block", 0)
        lines.append(
            f"labels: {outcome.labelled:,} transactions labelled, {outcome.frauds:,} fraud; "
            f"{outcome.labels_injected:,} labels injected into the state"
        )
        lines.append(
            f"review+block: precision {_ratio(outcome.flagged_frauds, flagged)}, "
            f"recall {_ratio(outcome.flagged_frauds, outcome.frauds)}"
        )
        lines.append(
            f"block: precision {_ratio(outcome.blocked_frauds, blocked)}, "
            f"recall {_ratio(outcome.blocked_frauds, outcome.frauds)}"
        )
        if outcome.scores:
            scores = [s for s, _ in outcome.scores]
            truth = [f for _, f in outcome.scores]
            lines.append(
                f"model score: AUC ROC {auc_roc(scores, truth):.3f}, "
                f"average precision {average_precision(scores, truth):.3f}"
            )
    if outcome.rule_hits:
        lines.append("rules (hits, precision when labelled):")
        for rule, hits in outcome.rule_hits.most_common():
            precision = (
                f", precision {_ratio(outcome.rule_fraud_hits[rule], hits)}"
                if outcome.labelled
                else ""
            )
            lines.append(f"  {rule}: {hits:,} hits{precision}")
    return "\n".join(lines)


def build_offline_detector(rules: Path | None, model: str | None) -> Detector:
    """A detector with a fresh memory store, the given (or default) rules and model.

    The store's windows are the live function's: the defaults plus the model's.
    """
    from detector.app import build_detector
    from detector.settings import Settings

    settings = Settings(project="", rules_file=rules, model_path=model)
    # No REDIS_URL in these settings: a fresh MemoryStore, which the Detector narrows to
    # the features each entity kind is read for.
    return build_detector(settings)


def _open_output(path: Path) -> IO[bytes]:
    try:
        return path.open("wb")
    except OSError as error:
        raise ReplayError(f"--output: cannot write {str(path)!r} ({error.strerror})") from None


def _open_input(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except OSError as error:
        raise ReplayError(f"--input: cannot read {str(path)!r} ({error.strerror})") from None


def run(args: argparse.Namespace) -> int:
    """`python -m detector replay`."""
    detector = build_offline_detector(args.rules, args.model)
    labels = read_labels(args.labels) if args.labels else None
    delay = parse_delay(args.label_delay)
    until = parse_time(args.until) if args.until else None

    def progress(count: int) -> None:
        print(f"replay: {count:,} transactions", file=sys.stderr, flush=True)

    with _open_input(args.input) as lines:
        if args.output is None:
            outcome = replay(
                detector, lines, labels=labels, label_delay=delay, until=until, progress=progress
            )
        else:
            with _open_output(args.output) as out:
                outcome = replay(
                    detector,
                    lines,
                    out.write,
                    labels=labels,
                    label_delay=delay,
                    until=until,
                    progress=progress,
                )
    print(summary(outcome))
    return 0


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `replay` with the `python -m detector` parser."""
    parser = commands.add_parser(
        "replay",
        help="backtest: run the detector over a JSON-lines file of transactions",
        description=__doc__.split("\n\n")[2] if __doc__ else None,
    )
    parser.add_argument("--input", type=Path, required=True, help="transactions, JSON lines")
    parser.add_argument("--output", type=Path, help="write verdicts here (JSON lines)")
    parser.add_argument("--labels", type=Path, help="ground truth, JSON lines")
    parser.add_argument(
        "--label-delay", default="7d", help="labels become known this long after the transaction"
    )
    parser.add_argument("--rules", type=Path, help="rules file (default: the bundled ruleset)")
    parser.add_argument(
        "--model", help="model artifact (default: the bundled model; 'none' for rules only)"
    )
    parser.add_argument("--until", help="stop at the first transaction at or after this time")
    parser.set_defaults(run=run)
