"""The demo's stream: which simulated transactions, how fast, and which labels come back.

`DemoStream` says what to simulate and how to send it; `messages()` turns it into the
publisher's `Outgoing` messages plus the ground truth the report needs. The stream is the
publisher's simulator (the Fraud Detection Handbook's model) with three choices of the demo's
own, so that a two-minute run on a laptop shows fraud being caught as it would be at scale
(the numbers behind them: BENCHMARKS.md, "Demo"):

- a small population keeps the handbook's neighbourhoods: the radius within which a customer
  uses terminals grows as terminals get fewer, so each customer still uses about 78 of them
  and each terminal serves about 39 customers. With the book's radius and a few hundred
  terminals a stolen card's frauds would pile up on two or three terminals;
- compromises (terminals and cards) happen `compromise_factor` times as often as in the
  handbook, so that a stream short enough to publish in a minute or so holds hundreds of
  frauds rather than dozens;
- labels are chargebacks: only frauds are reported back, `label_delay` after the transaction
  in event time. The detector's features count reported frauds; a genuine label changes none.

`run()` is the edge: it publishes with the publisher's own paced loop in a thread, pulls the
verdicts from a subscription into a `stack.report.Tally`, shows live figures (those of
`python -m publisher watch`), and reads how many labels record_feedback applied from its log
(one JSON entry per label, with `outcome`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from publisher.labels import Label
from publisher.pacing import RatePacer, SystemClock
from publisher.publish import Outgoing, StreamOptions, StreamSummary, make_publisher, stream
from publisher.report import RateMeter, Verdict, parse_verdict
from publisher.simulate import BOOK_CUSTOMERS, BOOK_TERMINALS, SimulationConfig, records
from stack.report import Tally

__all__ = ["DemoStream", "Run", "label_outcomes", "messages", "publish", "run", "warm_up"]

# The handbook compromises 2 of its 10,000 terminals and 3 of its 5,000 customers a day.
_BOOK_TERMINALS_A_DAY = 2.0
_BOOK_CUSTOMERS_A_DAY = 3.0
_BOOK_RADIUS = 5.0


@dataclass(frozen=True)
class DemoStream:
    """What the demo streams; the defaults are `python -m stack demo`'s.

    Attributes:
        seed, customers, terminals, days, from_day: as the simulator's (`SimulationConfig`).
        compromise_factor: compromises per day relative to the handbook's, scaled to the
            population as the simulator scales them.
        rate: messages per second, steady.
        label_delay: seconds of event time from a fraud to its chargeback.
        count: send at most this many transactions (None: all).
        warm_up: seconds of warm-up traffic at `rate` before the stream (see `warm_up()`).
    """

    seed: int = 7
    customers: int = 150
    terminals: int = 300
    days: int = 40
    from_day: int = 14
    compromise_factor: float = 4.0
    rate: float = 100.0
    label_delay: float = 7 * 86_400
    count: int | None = None
    warm_up: float = 10.0

    @property
    def radius(self) -> float:
        """The book's radius scaled so that as many terminals (~78) are near each customer."""
        return _BOOK_RADIUS * math.sqrt(BOOK_TERMINALS / self.terminals)

    def simulation(self) -> SimulationConfig:
        """The simulator's configuration for this stream."""
        return SimulationConfig(
            seed=self.seed,
            customers=self.customers,
            terminals=self.terminals,
            days=self.days,
            from_day=self.from_day,
            radius=self.radius,
            terminals_compromised_per_day=(
                _BOOK_TERMINALS_A_DAY * self.terminals / BOOK_TERMINALS * self.compromise_factor
            ),
            customers_compromised_per_day=(
                _BOOK_CUSTOMERS_A_DAY * self.customers / BOOK_CUSTOMERS * self.compromise_factor
            ),
        )

    @property
    def start(self) -> dt.date:
        return self.simulation().start


def messages(config: DemoStream) -> tuple[list[Outgoing], dict[str, Label]]:
    """The messages to publish, in event-time order, and the truth of each transaction.

    Each transaction carries its label line (for the side file) and, when it is a fraud, the
    chargeback to send to the feedback topic once `label_delay` of event time has passed.
    """
    outgoing: list[Outgoing] = []
    truth: dict[str, Label] = {}
    for record in records(config.simulation()):
        if config.count is not None and len(outgoing) >= config.count:
            break
        truth[record.transaction_id] = Label(record.is_fraud, record.scenario)
        outgoing.append(
            Outgoing(
                data=record.data,
                attributes={"transaction_id": record.transaction_id},
                event_time=record.event_time,
                label=record.label_json(),
                feedback=record.feedback_json() if record.is_fraud else None,
            )
        )
    return outgoing, truth


def warm_up(config: DemoStream, before: float) -> list[Outgoing]:
    """Transactions that warm the path up before the measured stream, and are not reported.

    A fresh stack is slow for its first seconds (the emulator's push ramps up, each function
    makes its first connections): at 100/s the first verdicts queued for up to 2 s, and after
    5 s of warm-up still for up to 1.1 s (BENCHMARKS.md, "Demo"). A real deployment keeps warm
    instances; the demo sends `warm_up` seconds of traffic at the same rate first. Their customers, cards and terminals are their own, and their event times
    precede the stream's (`before`) by a day, so no feature of the stream sees them.
    """
    count = round(config.warm_up * config.rate)
    start = before - 86_400
    return [
        Outgoing(
            data=orjson.dumps(
                {
                    "transaction_id": f"warm-up-{i:05d}",
                    "timestamp": dt.datetime.fromtimestamp(start + i, dt.UTC).isoformat(),
                    "customer_id": f"warm-up-{i % 50}",
                    "card_id": f"warm-up-{i % 50}",
                    "terminal_id": f"warm-up-{i % 20}",
                    "amount": 20.0 + i % 80,
                }
            ),
            attributes={"transaction_id": f"warm-up-{i:05d}"},
            event_time=start + i,
        )
        for i in range(count)
    ]


def publish(
    config: DemoStream,
    outgoing: list[Outgoing],
    project: str,
    emulator: str,
    topic: str,
    feedback_topic: str,
    on_sent: Callable[[int], None] | None = None,
    first: list[Outgoing] | None = None,
) -> StreamSummary:
    """Send the messages at `config.rate`, chargebacks to `feedback_topic`; returns the counts.

    `first` (the warm-up) goes before, at the same rate; `on_sent` counts only `outgoing`.

    Raises:
        publisher.errors.PublisherError: a topic is missing or a publish failed.
    """
    publisher = make_publisher("batch", project, emulator)
    try:
        sink = publisher.topic(publisher.check_topic(topic, "--topic"))
        feedback = publisher.topic(publisher.check_topic(feedback_topic, "--feedback-topic"))
        options = StreamOptions(
            label_delay=config.label_delay, pacer=RatePacer(config.rate, SystemClock())
        )

        def counted() -> Iterator[Outgoing]:
            yield from first or ()
            for number, message in enumerate(outgoing, start=1):
                yield message
                if on_sent is not None:
                    on_sent(number)

        summary = stream(counted(), sink, options, feedback=feedback)
        sink.close()
        feedback.close()
        publisher.wait()
    finally:
        publisher.close()
    return summary


@dataclass(frozen=True)
class Run:
    """How a demo run went: the report, and whether every verdict arrived."""

    report: dict[str, Any]
    complete: bool


def label_outcomes(log: Path) -> Counter[str]:
    """What record_feedback did with each label, counted from its JSON log lines.

    The service logs one entry per label with an `outcome` field (`applied`, `changed`,
    `duplicate` or `unknown`, see `detector.state.LabelOutcome`).
    """
    outcomes: Counter[str] = Counter()
    try:
        text = log.read_bytes()
    except OSError:
        return outcomes
    for line in text.splitlines():
        if b'"outcome"' not in line:
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("outcome"), str):
            outcomes[entry["outcome"]] += 1
    return outcomes


class Display(Protocol):
    """Where live figures go; `stack.console.LiveView` draws them in the terminal.

    `live` is `Tally.live()`, `rate` verdicts per second over the last few seconds.
    """

    def update(
        self, live: Mapping[str, Any], rate: float, sent: int, total: int, elapsed: float
    ) -> None: ...


def run(
    config: DemoStream,
    outgoing: list[Outgoing],
    truth: dict[str, Label],
    *,
    project: str,
    emulator: str,
    subscription: str,
    feedback_log: Path,
    idle_timeout: float,
    display: Display | None = None,
) -> Run:
    """Publish the stream, collect its verdicts and the labels applied; returns the report.

    The Pub/Sub client of this process must point at the emulator (PUBSUB_EMULATOR_HOST).

    Raises:
        publisher.errors.PublisherError: publishing failed.
        RuntimeError: the verdict subscription failed.
    """
    from google.api_core import exceptions
    from google.cloud import pubsub_v1
    from google.cloud.pubsub_v1 import types

    tally = Tally(truth)
    meter = RateMeter()
    inbox: queue.SimpleQueue[Verdict] = queue.SimpleQueue()

    def on_message(message: Any) -> None:
        inbox.put(parse_verdict(message.data, dict(message.attributes), message.publish_time))
        message.ack()

    subscriber = pubsub_v1.SubscriberClient()
    pull = subscriber.subscribe(
        subscriber.subscription_path(project, subscription),
        on_message,
        flow_control=types.FlowControl(max_messages=2_000),
    )
    sent = 0
    stream_start: float | None = None  # when the first message of the stream (not warm-up) went
    outcome: dict[str, Any] = {}

    def on_sent(number: int) -> None:
        nonlocal sent, stream_start
        if stream_start is None:
            stream_start = time.monotonic()
        sent = number

    def publishing() -> None:
        try:
            outcome["summary"] = publish(
                config,
                outgoing,
                project,
                emulator,
                "transactions",
                "fraud-feedback",
                on_sent,
                first=warm,
            )
        except BaseException as error:  # handed to the main thread, which raises it
            outcome["error"] = error

    warm = warm_up(config, outgoing[0].event_time) if outgoing else []
    start = time.monotonic()
    publisher = threading.Thread(target=publishing, name="demo-publish", daemon=True)
    publisher.start()
    last_verdict = last_counted = start
    drawn = 0.0
    try:
        while tally.verdicts < len(truth):
            if pull.done():
                raise RuntimeError(
                    f"pulling verdicts from {subscription} failed: {pull.exception()}"
                )
            observed: Verdict | None
            try:
                observed = inbox.get(timeout=0.1)
            except queue.Empty:
                observed = None
            now = time.monotonic()
            if observed is not None:
                if tally.add(observed, now - start):
                    last_counted = now
                last_verdict = now
            if "error" in outcome:
                raise outcome["error"]
            if not publisher.is_alive() and now - last_verdict > idle_timeout:
                break
            if display is not None and now - drawn >= 0.25:
                drawn = now
                meter.observe(now, tally.verdicts)
                display.update(tally.live(), meter.rate, sent, len(outgoing), now - start)
    finally:
        pull.cancel()
        # The pull is over either way; how it ended does not change the report.
        with contextlib.suppress(exceptions.GoogleAPICallError, TimeoutError, CancelledError):
            pull.result(timeout=10)
        subscriber.close()
    publisher.join()
    if "error" in outcome:
        raise outcome["error"]
    summary: StreamSummary = outcome["summary"]
    if display is not None:
        elapsed = last_counted - start
        display.update(tally.live(), meter.rate, sent, len(outgoing), elapsed)
    # The stream's time: first message sent (after the warm-up) to the last verdict counted.
    seconds = last_counted - (stream_start if stream_start is not None else start)
    applied = _wait_for_labels(feedback_log, summary.feedback_sent, idle_timeout)
    report = tally.report(
        rate=config.rate,
        seconds=seconds,
        labels_sent=summary.feedback_sent,
        labels_applied=applied["applied"] + applied["changed"],
    )
    report["labels_outcomes"] = dict(applied)
    report["published_rate"] = round(summary.rate, 1)
    report["warm_up"] = {"transactions": len(warm), "verdicts": tally.unknown}
    return Run(report, complete=tally.verdicts == len(truth))


def _wait_for_labels(log: Path, sent: int, idle_timeout: float) -> Counter[str]:
    """Outcomes in record_feedback's log, once all `sent` labels are there.

    Gives up when the count has not grown for `idle_timeout` seconds: a label that keeps
    failing is redelivered by Pub/Sub for longer than a demo should wait.
    """
    previous = -1
    grew = time.monotonic()
    while True:
        outcomes = label_outcomes(log)
        total = sum(outcomes.values())
        now = time.monotonic()
        if total != previous:
            previous, grew = total, now
        if total >= sent or now - grew > idle_timeout:
            return outcomes
        time.sleep(0.2)
