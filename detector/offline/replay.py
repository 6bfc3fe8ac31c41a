"""Offline replay (backtest): run the detection core over a file of transactions.

The same `Detector` as the functions (decode, state, model, rules) runs over the transactions
in file order, which must be event-time order (as `python -m publisher simulate` writes it;
a line out of order is processed where it stands, like a late delivery, and counted). State
lives in a `MemoryStore`. Each label becomes known at its transaction's time plus the delay
and is recorded in the store just before the first transaction at or after that moment
(`detector.offline.labels`, which training reuses), as the feedback function would have recorded it.

Differences from the live functions, on purpose: a verdict's ``decided_at`` is the
transaction's event time (so the output is a pure function of the input), and
``message_id`` is null (``line-N`` for a transaction without a transaction_id, which becomes
its id too). A transaction without a timestamp takes the latest event time seen.
Invalid lines are counted (they would be dead-lettered) and skipped.

A large file is replayed on one process per core (`detector.offline.parallel`: shards in event time,
each warmed up on the history it needs, with the verdicts of one process; `--workers 1` to
use one).
"""

from __future__ import annotations

import gc
import heapq
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from detector.engine import Detector, Observed, Request, Verdict
from detector.errors import InputError, MessageError
from detector.offline.evaluate import auc_roc, average_precision
from detector.offline.labels import Timed
from detector.state import LabelOutcome, LabelPlace
from detector.state.base import Label
from detector.transaction import Transaction, decode

__all__ = [
    "Outcome",
    "Replayer",
    "Stream",
    "open_input",
    "open_output",
    "replay",
    "replay_path",
    "summary",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decoded:
    """One input line, decoded and validated."""

    raw: dict[str, Any]
    transaction: Transaction
    moment: datetime


#: A label not yet known: (known at, sequence, transaction_id, is_fraud, where its
#: transaction is recorded, when known).
_Pending = tuple[float, int, str, bool, LabelPlace | None]

#: A decoded line: (event time in epoch seconds, transaction_id, raw, transaction, moment).
Row = tuple[float, str, dict[str, Any], Transaction, datetime]


@dataclass
class Stream:
    """Reads transactions from JSON lines, in file order, as `Timed` items; counts problems.

    Resumable: after `rows` ends, point `lines` at the next lines (and `number` at the line
    number before them) and call it again; what it has seen carries over.
    """

    lines: Iterable[bytes]
    until: float | None = None
    #: Lines more than this many seconds behind the latest are counted in `behind`.
    lateness: float = float("inf")
    invalid: int = 0
    out_of_order: int = 0
    untimed: int = 0
    behind: int = 0
    examples: list[str] = field(default_factory=list)
    #: Number of the last line read (1-based line numbers).
    number: int = 0
    #: The latest event time seen (epoch seconds), and as a datetime.
    latest: float = float("-inf")
    latest_moment: datetime | None = None
    #: A line at or after `until` was reached: nothing more is read.
    stopped: bool = False

    def __iter__(self) -> Iterator[Timed[Decoded]]:
        for when, tid, raw, transaction, moment in self.rows():
            yield Timed(when, tid, Decoded(raw, transaction, moment))

    def rows(self) -> Iterator[Row]:
        """The same items as plain `Row` tuples: no objects per line but the tuple."""
        if self.stopped:
            return
        latest, latest_moment = self.latest, self.latest_moment
        until, lateness = self.until, self.lateness
        number = self.number
        try:
            for number, line in enumerate(self.lines, self.number + 1):
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
                if until is not None and when >= until:
                    self.stopped = True
                    return
                if when < latest:
                    self.out_of_order += 1
                    if when < latest - lateness:
                        self.behind += 1
                else:
                    latest, latest_moment = when, moment
                tid = transaction.transaction_id or f"line-{number}"
                yield when, tid, raw, transaction, moment
        finally:
            self.number = number
            self.latest, self.latest_moment = latest, latest_moment


@dataclass
class Outcome:
    """What a replay did; `summary` renders it."""

    transactions: int = 0
    labels_injected: int = 0
    #: Injected labels that no entity could count any more (`LabelOutcome.UNKNOWN`).
    labels_unknown: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    invalid: int = 0
    out_of_order: int = 0
    untimed: int = 0
    #: Lines more than the allowed lateness behind the latest (see `Stream.lateness`).
    behind: int = 0
    labelled: int = 0
    frauds: int = 0
    flagged_frauds: int = 0
    blocked_frauds: int = 0
    rule_hits: Counter[str] = field(default_factory=Counter)
    rule_fraud_hits: Counter[str] = field(default_factory=Counter)
    scores: list[tuple[float, bool]] = field(default_factory=list)
    #: Processes that shared the work (`detector.offline.parallel`).
    workers: int = 1

    @property
    def rate(self) -> float:
        """Transactions per second of wall time."""
        return self.transactions / self.seconds if self.seconds else 0.0

    @property
    def cpu_rate(self) -> float:
        """Transactions per second of this process's CPU time (robust to a busy machine)."""
        return self.transactions / self.cpu_seconds if self.cpu_seconds else 0.0


class Replayer:
    """The replay loop, resumable: feed it lines in order, deciding on them or only warming up.

    `warm` gives lines to the state store as `decide` would (labels included) and counts
    nothing; `decide` decides on each line and counts it in `outcome`. A shard of a parallel
    replay (`detector.offline.parallel`) warms up on the retention before its first line, then decides.
    """

    def __init__(
        self,
        detector: Detector,
        write: Callable[[bytes], Any] | None = None,
        *,
        labels: Mapping[str, bool] | None = None,
        label_delay: float = 0.0,
        until: datetime | None = None,
        lateness: float = float("inf"),
        progress: Callable[[int], None] | None = None,
        batch: int = 1,
    ) -> None:
        self.detector = detector
        #: Transactions decided together (`Detector.decide_many`: one state-store call, one
        #: Redis round trip), up to the next label that becomes known; 1 decides one by one.
        self.batch = batch
        self.write = write
        self.truth = labels or {}
        self.label_delay = label_delay
        self.progress = progress
        self.outcome = Outcome()
        self.stream = Stream((), until.timestamp() if until is not None else None, lateness)
        # Labels not yet known (`_Pending`), taken in order. They come in order while lines
        # do (a constant delay after event time), so they queue in a deque; a label that
        # would come before the last queued (after a line out of order) goes to a heap
        # instead, which costs more per label.
        self.pending: deque[_Pending] = deque()
        self.early: list[_Pending] = []
        self.sequence = 0
        self._record_label = detector.record_label if detector.store is not None else None
        #: Labels the store could not count (unknown to every entity), since the start.
        self.unknown = 0

    def _due(self, when: float) -> Iterator[_Pending]:
        """Take the labels known by event time `when`, in order."""
        pending, early = self.pending, self.early
        while True:
            if pending and pending[0][0] <= when:
                yield heapq.heappop(early) if early and early[0] < pending[0] else pending.popleft()
            elif early and early[0][0] <= when:
                yield heapq.heappop(early)
            else:
                return

    def _inject(self, when: float) -> int:
        """Record in the store the labels known by event time `when`; how many there were."""
        record_label = self._record_label
        count = 0
        for label in self._due(when):
            if (
                record_label is not None
                and record_label(label[2], label[3]) is LabelOutcome.UNKNOWN
            ):
                self.unknown += 1
            count += 1
        return count

    def _expect(
        self, when: float, transaction_id: str, fraud: bool, place: LabelPlace | None = None
    ) -> None:
        """The label of a transaction at `when` becomes known `label_delay` later."""
        label = (when + self.label_delay, self.sequence, transaction_id, fraud, place)
        self.sequence += 1
        if self.pending and label < self.pending[-1]:
            heapq.heappush(self.early, label)
        else:
            self.pending.append(label)

    def warm(self, lines: Iterable[bytes], first: int = 1) -> None:
        """Record lines `first`, `first + 1`, ... in the state store, deciding nothing."""
        stream = self.stream
        stream.lines, stream.number = lines, first - 1
        counts = (stream.invalid, stream.out_of_order, stream.untimed, stream.behind)
        examples = list(stream.examples)
        record = self.detector.record
        pending, early, inject, expect, get_truth = (
            self.pending,
            self.early,
            self._inject,
            self._expect,
            self.truth.get,
        )
        with _collector_paused():
            for when, tid, _, transaction, moment in stream.rows():
                if (pending and pending[0][0] <= when) or (early and early[0][0] <= when):
                    inject(when)
                record(transaction, tid, moment)
                fraud = get_truth(tid)
                if fraud is not None:
                    expect(when, tid, fraud)
        stream.invalid, stream.out_of_order, stream.untimed, stream.behind = counts
        stream.examples[:] = examples

    def decide(self, lines: Iterable[bytes], first: int = 1) -> Outcome:
        """Decide on lines `first`, `first + 1`, ...; returns the outcome so far."""
        outcome = self.outcome
        stream = self.stream
        stream.lines, stream.number = lines, first - 1
        detector = self.detector
        decide = detector.decide
        progress = self.progress
        scored = detector.model is not None and bool(self.truth)
        # `merge_labels` on plain tuples, its queues checked inline: the generator, `Timed`/
        # `Decoded` objects and isinstance checks per line cost about as much as the rules.
        pending, early, inject, expect, get_truth = (
            self.pending,
            self.early,
            self._inject,
            self._expect,
            self.truth.get,
        )
        write = self.write
        decisions = outcome.decisions
        rule_hits = outcome.rule_hits
        rule_fraud_hits = outcome.rule_fraud_hits
        scores = outcome.scores
        dumps = orjson.dumps
        newline = orjson.OPT_APPEND_NEWLINE
        count, labelled, frauds = outcome.transactions, outcome.labelled, outcome.frauds
        flagged, blocked = outcome.flagged_frauds, outcome.blocked_frauds
        injected = outcome.labels_injected
        unknown = self.unknown
        self.injected = injected
        started = time.perf_counter()
        cpu_started = time.process_time()

        singly = self.batch <= 1

        def one_by_one() -> Iterator[tuple[float, str, Verdict]]:
            for when, tid, raw, transaction, moment in stream.rows():
                if (pending and pending[0][0] <= when) or (early and early[0][0] <= when):
                    self.injected += inject(when)
                verdict = decide(
                    raw,
                    transaction,
                    # A transaction without an id gets "line-N" (deterministic) rather
                    # than a random one: its verdict's transaction_id and message_id.
                    message_id=None if transaction.transaction_id else tid,
                    default_time=moment,
                    decided_at=moment,
                )
                yield when, tid, verdict

        try:
            with _collector_paused():
                verdicts = one_by_one() if singly else self._batches(stream)
                for when, tid, verdict in verdicts:
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
                        if singly:
                            expect(when, tid, fraud)  # batches queue labels as they read
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
            outcome.labels_injected = self.injected
            outcome.labels_unknown += self.unknown - unknown
            outcome.labelled = labelled
            outcome.frauds = frauds
            outcome.flagged_frauds = flagged
            outcome.blocked_frauds = blocked
            outcome.seconds += time.perf_counter() - started
            outcome.cpu_seconds += time.process_time() - cpu_started
            outcome.invalid = stream.invalid
            outcome.out_of_order = stream.out_of_order
            outcome.untimed = stream.untimed
            outcome.behind = stream.behind
        return outcome

    def _batches(self, stream: Stream) -> Iterator[tuple[float, str, Verdict]]:
        """`decide`'s verdicts, decided `batch` at a time, the same as one by one.

        Each transaction's label is queued as its line is read, and the labels that become
        known on the way are recorded among the batch's transactions, in order, so what
        the store sees does not depend on any verdict. So the state call of the next batch
        (`Detector.observe_labelled`: one round trip to Redis) runs in a thread while this
        one's verdicts are decided: the store's time and the decisions' overlap.
        """
        detector = self.detector
        ahead: tuple[list[tuple[float, str]], Future[Observed]] | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="replay-state") as state:
            for rows, requests, labels in self._plan(stream):
                observing = state.submit(detector.observe_labelled, requests, labels)
                if ahead is not None:
                    yield from self._decided(*ahead)
                ahead = (rows, observing)
            if ahead is not None:
                yield from self._decided(*ahead)

    def _decided(
        self, rows: list[tuple[float, str]], observing: Future[Observed]
    ) -> Iterator[tuple[float, str, Verdict]]:
        observed = observing.result()
        self.unknown += observed.outcomes.count(LabelOutcome.UNKNOWN)
        for (when, tid), verdict in zip(rows, self.detector.verdicts(observed), strict=True):
            yield when, tid, verdict

    def _plan(
        self, stream: Stream
    ) -> Iterator[tuple[list[tuple[float, str]], list[Request], list[Label]]]:
        """The stream cut in batches: (event time, id) and request of each transaction, and
        the labels that become known among them, each before the first transaction at or
        after the time it is known."""
        detector, pending, early, expect = self.detector, self.pending, self.early, self._expect
        get_truth = self.truth.get
        rows: list[tuple[float, str]] = []
        requests: list[Request] = []
        labels: list[Label] = []
        for when, tid, raw, transaction, moment in stream.rows():
            if (pending and pending[0][0] <= when) or (early and early[0][0] <= when):
                for _, _, label_id, is_fraud, place in self._due(when):
                    labels.append(Label(len(rows), label_id, is_fraud, place))
                    self.injected += 1
            message_id = None if transaction.transaction_id else tid
            request = Request(raw, transaction, message_id, moment, moment)
            rows.append((when, tid))
            requests.append(request)
            fraud = get_truth(tid)
            if fraud is not None:
                expect(when, tid, fraud, detector.place(request))
            if len(rows) >= self.batch:
                yield rows, requests, labels
                rows, requests, labels = [], [], []
        if rows:
            yield rows, requests, labels


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the duration.

    The store keeps millions of small objects alive: the collector would walk them all again
    and again while finding nothing to free.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def replay(
    detector: Detector,
    lines: Iterable[bytes],
    write: Callable[[bytes], Any] | None = None,
    *,
    labels: Mapping[str, bool] | None = None,
    label_delay: float = 0.0,
    until: datetime | None = None,
    progress: Callable[[int], None] | None = None,
    batch: int = 1,
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
        batch: transactions decided with one state-store call (see `Replayer`), the same
            verdicts: worth it with state in Redis, one round trip a batch.
    """
    replayer = Replayer(
        detector,
        write,
        labels=labels,
        label_delay=label_delay,
        until=until,
        progress=progress,
        batch=batch,
    )
    return replayer.decide(lines)


def _ratio(part: int, whole: int) -> str:
    return f"{part / whole:.3f}" if whole else "n/a"


def summary(outcome: Outcome) -> str:
    """A human-readable report: decisions; with labels, precision/recall overall and per rule."""

    lines = [
        f"transactions: {outcome.transactions:,} in {outcome.seconds:.1f} s "
        f"({outcome.rate:,.0f}/s; {outcome.cpu_rate:,.0f}/s of CPU time"
        + (f"; {outcome.workers} processes)" if outcome.workers > 1 else ")"),
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
            + (
                f", {outcome.labels_unknown:,} of them too late to count (logged)"
                if outcome.labels_unknown
                else ""
            )
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


def open_output(path: Path) -> IO[bytes]:
    try:
        return path.open("wb")
    except OSError as error:
        raise InputError(f"--output: cannot write {str(path)!r} ({error.strerror})") from None


def open_input(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except OSError as error:
        raise InputError(f"--input: cannot read {str(path)!r} ({error.strerror})") from None


def replay_path(
    detector: Detector,
    path: Path,
    output: Path | None,
    labels: Mapping[str, bool] | None,
    label_delay: float,
    until: datetime | None,
    batch: int = 1,
) -> Outcome:
    """`replay` in this process over a file, verdicts to `output` (if any), progress on stderr.

    Raises:
        InputError: the input cannot be read or the output written.
    """

    def progress(count: int) -> None:
        print(f"replay: {count:,} transactions", file=sys.stderr, flush=True)

    with open_input(path) as lines:
        out = open_output(output) if output is not None else None
        try:
            return replay(
                detector,
                lines,
                out.write if out is not None else None,
                labels=labels,
                label_delay=label_delay,
                until=until,
                progress=progress,
                batch=batch,
            )
        finally:
            if out is not None:
                out.close()
