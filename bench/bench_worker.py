"""The streaming-pull worker on the local Pub/Sub emulator against a consumer that only acks.

Usage: .venv/bin/python bench/bench_worker.py [--quick] [--states memory,redis] [--count N]
       [--seconds S] [--rounds N]

One emulator; for each state store (memory, then Redis on a throwaway redis-server), a fresh
topic with two pull subscriptions, one read by each consumer, alternating in every round:

- ``ack-only``: a streaming-pull subscriber in this process whose callback only acks (the
  library's defaults but flow control, which is the worker's: 5,000 messages);
- ``worker``: ``python -m detector worker`` as deployed (its default flags, the bundled model,
  the bundled ruleset plus one shadow rule that reports the customer's count), publishing to a
  results topic that this process pulls the same way.

Each round:

1. Maximum throughput: N transactions are published while neither consumer runs, then one
   consumer drains them. Throughput = N / (last - first), by message: the ack-only consumer's
   receive times; the worker's verdicts' publish times (the emulator's clock). The worker starts
   on the backlog; its CPU time (user + system, /proc) minus that of an idle start (imports,
   rules, model), / N; and its peak RSS.
2. Delay at half the ack-only maximum of this round: both consumers run, transactions are
   published at a steady rate for S seconds; delay = receive time - publish time (ack-only) and
   verdict publish time - transaction publish time (worker); p50 and p99 of each.

Then nothing lost, nothing counted twice: every transaction has a verdict (duplicates
counted), and one more transaction per customer gets a verdict whose reported count equals the
number of that customer's transactions (once each, whatever was redelivered).
``--quick`` runs one tiny round on memory state (the smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _report import header, percentile, table  # noqa: E402
from google.cloud import pubsub_v1  # noqa: E402

from detector.rules import default_ruleset_path  # noqa: E402
from stack import services  # noqa: E402

PROJECT = "bench-worker"
FLOW = 5_000  # the worker's default --max-messages, given to the ack-only consumer too
COUNT_RULE = {
    "id": "customer-count",
    "description": "{by_customer.count_30d} earlier transactions of this customer",
    "condition": "by_customer.count_30d >= 0",
    "action": "review",
    "shadow": True,
}


@dataclass
class Received:
    """What a streaming subscriber saw: (transaction id, delay or time) per message."""

    times: list[float] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    ids: Counter[str] = field(default_factory=Counter)
    counts: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self.lock:
            self.times.clear()
            self.delays.clear()


class Stream:
    """Transactions of `customers` customers, ids and timestamps in order (0.01 s apart)."""

    def __init__(self, run: str, customers: int, seed: int = 7) -> None:
        self.run = run
        self.customers = customers
        self.random = random.Random(seed)
        self.sent = 0
        self.per_customer: Counter[str] = Counter()

    def next(self) -> bytes:
        i = self.sent
        self.sent += 1
        customer = f"{self.run}-c{self.random.randrange(self.customers)}"
        self.per_customer[customer] += 1
        second = i / 100
        return orjson.dumps(
            {
                "transaction_id": f"{self.run}-{i}",
                "amount": round(self.random.lognormvariate(3.5, 1.0), 2),
                "customer_id": customer,
                "card_id": customer + "-card",
                "terminal_id": f"{self.run}-t{self.random.randrange(self.customers * 2)}",
                "merchant": f"shop-{self.random.randrange(50)}",
                "country": "FR",
                "timestamp": f"2024-05-01T{int(second // 3600):02d}:"
                f"{int(second // 60 % 60):02d}:{second % 60:06.3f}Z",
            }
        )


def ack_only(received: Received) -> Any:
    def callback(message: Any) -> None:
        now = time.time()
        with received.lock:
            received.times.append(now)
            received.delays.append(now - message.publish_time.timestamp())
        message.ack()

    return callback


def verdicts(received: Received) -> Any:
    def callback(message: Any) -> None:
        published = message.publish_time.timestamp()
        source = message.attributes.get("source_publish_time")
        body = orjson.loads(message.data)
        with received.lock:
            received.times.append(published)
            if source:
                received.delays.append(published - _parse(source))
            received.ids[body["transaction_id"]] += 1
            for reason in body["reasons"]:
                if reason["rule"] == COUNT_RULE["id"]:
                    received.counts[body["transaction_id"]] = reason["values"][
                        "by_customer.count_30d"
                    ]
        message.ack()

    return callback


def _parse(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_for(received: Received, count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with received.lock:
            if len(received.times) >= count:
                return True
        time.sleep(0.05)
    return False


def publish(
    publisher: Any, topics: str | tuple[str, ...], items: list[bytes], rate: float | None
) -> None:
    """Publish items to each topic, at `rate` per second (None: as fast as possible)."""
    started = time.monotonic()
    futures = []
    for i, data in enumerate(items):
        if rate:
            lag = started + i / rate - time.monotonic()
            if lag > 0:
                time.sleep(lag)
        for topic in (topics,) if isinstance(topics, str) else topics:
            futures.append(publisher.publish(topic, data))
    for future in futures:
        future.result(60)


def rate_of(times: list[float]) -> float:
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else float("nan")


@dataclass
class Case:
    state: str
    throughput: list[tuple[float, float]] = field(default_factory=list)  # (ack-only, worker)
    cpu_ms: list[float] = field(default_factory=list)
    delays: list[tuple[float, float, float, float]] = field(default_factory=list)
    rss_mb: float = 0.0
    sent: int = 0
    missing: int = 0
    duplicates: int = 0
    miscounted: int = 0
    probes: int = 0


def run_case(
    state: str, emulator: str, redis_url: str | None, args: argparse.Namespace, workdir: Path
) -> Case:
    case = Case(state)
    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=500, max_latency=0.01)
    )
    subscriber = pubsub_v1.SubscriberClient()
    names = {n: services.unique(n) for n in ("verdicts", "dead", "watch")}

    def topic(name: str) -> str:
        path = f"projects/{PROJECT}/topics/{name}"
        publisher.create_topic(name=path)
        return path

    def subscription(source: str) -> str:
        # A fresh subscription for every consumer that starts: the emulator keeps routing
        # messages to a subscription's closed streams, each held for the 60 s lease.
        path = f"projects/{PROJECT}/subscriptions/{services.unique('sub')}"
        subscriber.create_subscription(
            request={"name": path, "topic": source, "ack_deadline_seconds": 60}
        )
        return path

    topic(names["verdicts"])
    topic(names["dead"])
    watch_path = subscription(f"projects/{PROJECT}/topics/{names['verdicts']}")
    rules = yaml.safe_load(default_ruleset_path().read_text())
    rules["rules"].append(COUNT_RULE)
    (workdir / "rules.yaml").write_text(yaml.safe_dump(rules))
    env = {
        "PUBSUB_EMULATOR_HOST": emulator,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "RESULTS_TOPIC": names["verdicts"],
        "DEAD_LETTER_TOPIC": names["dead"],
        "RULES_FILE": str(workdir / "rules.yaml"),
        **({"REDIS_URL": redis_url} if redis_url else {}),
    }
    acked, decided = Received(), Received()
    flow = pubsub_v1.types.FlowControl(max_messages=FLOW)
    watch = subscriber.subscribe(watch_path, verdicts(decided), flow)
    # The CPU a worker spends starting (imports, rules, model) and idling, subtracted below.
    idle_topic = topic(services.unique("idle"))
    idle = services.start_worker(["--subscription", subscription(idle_topic)], env, workdir)
    time.sleep(1.0)
    start_cpu = cpu_seconds(idle.process.popen.pid)
    idle.process.stop()
    probes: dict[str, int] = {}
    stream = Stream(services.unique("b"), args.customers)
    try:
        for last in [False] * (args.rounds - 1) + [True]:
            stream = Stream(services.unique("b"), args.customers)
            tx_ack, tx_work = topic(services.unique("tx-ack")), topic(services.unique("tx-work"))
            backlog = [stream.next() for _ in range(args.count)]
            # 1. Maximum throughput: the same backlog drained by each consumer alone.
            first_ack = subscription(tx_ack)
            worker_sub = subscription(tx_work)
            publish(publisher, (tx_ack, tx_work), backlog, None)
            acked.clear()
            pulling = subscriber.subscribe(first_ack, ack_only(acked), flow)
            wait_for(acked, args.count, args.timeout)
            pulling.cancel()
            pulling.result()
            ack_rate = rate_of(acked.times)
            decided.clear()
            worker = services.start_worker(["--subscription", worker_sub], env, workdir)
            pid = worker.process.popen.pid
            wait_for(decided, args.count, args.timeout)
            case.cpu_ms.append((cpu_seconds(pid) - start_cpu) * 1000 / args.count)
            case.throughput.append((ack_rate, rate_of(decided.times)))
            # 2. Delay at half the ack-only maximum, both consumers running.
            rate = ack_rate / 2
            steady = [stream.next() for _ in range(int(rate * args.seconds))]
            acked.clear()
            decided.clear()
            pulling = subscriber.subscribe(subscription(tx_ack), ack_only(acked), flow)
            publish(publisher, (tx_ack, tx_work), steady, rate)
            wait_for(acked, len(steady), args.timeout)
            wait_for(decided, len(steady), args.timeout)
            pulling.cancel()
            pulling.result()
            case.delays.append(
                (
                    percentile(acked.delays, 50),
                    percentile(acked.delays, 99),
                    percentile(decided.delays, 50),
                    percentile(decided.delays, 99),
                )
            )
            if last:
                # Nothing lost, nothing counted twice: one more transaction per customer.
                for customer in sorted(stream.per_customer):
                    probe = f"{customer}-probe"
                    probes[probe] = stream.per_customer[customer]
                    data = orjson.loads(stream.next())
                    stream.per_customer[data["customer_id"]] -= 1
                    data.update(
                        transaction_id=probe, customer_id=customer, card_id=customer + "-card"
                    )
                    publisher.publish(tx_work, orjson.dumps(data)).result(60)
                deadline = time.monotonic() + args.timeout
                while set(probes) - decided.counts.keys() and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(1)
                case.rss_mb = peak_rss_mb(pid)
            worker.process.stop()
            case.sent += stream.sent
    finally:
        watch.cancel()
        subscriber.close()
    # Every transaction of the last round has a verdict; duplicates are counted over all rounds.
    ids = {f"{stream.run}-{i}" for i in range(stream.sent - len(probes))} | set(probes)
    case.missing = len(ids - decided.ids.keys())
    case.duplicates = sum(n - 1 for n in decided.ids.values() if n > 1)
    case.probes = len(probes)
    case.miscounted = sum(1 for p, n in probes.items() if decided.counts.get(p) != n)
    return case


def report(cases: Sequence[Case]) -> str:
    rows = []
    for case in cases:
        ack = statistics.median(a for a, _ in case.throughput)
        work = statistics.median(w for _, w in case.throughput)
        ratio = statistics.median(w / a for a, w in case.throughput)
        cpu = statistics.median(case.cpu_ms)
        a50, a99, w50, w99 = (statistics.median(d[i] for d in case.delays) for i in range(4))
        rows.append(
            [
                case.state,
                f"{ack:,.0f}",
                f"{work:,.0f}",
                f"{ratio:.0%}",
                f"{cpu:.3f}",
                f"{case.rss_mb:.0f}",
                f"{a50 * 1000:.0f} / {a99 * 1000:.0f}",
                f"{w50 * 1000:.0f} / {w99 * 1000:.0f}",
                f"{statistics.median(d[3] / d[1] for d in case.delays):.2f}x",
                f"{case.missing} / {case.duplicates} / {case.miscounted} of {case.probes}",
            ]
        )
    lines = [
        table(
            [
                "state",
                "ack-only tx/s",
                "worker tx/s",
                "worker / ack-only",
                "worker CPU ms/tx",
                "worker peak RSS MB",
                "ack-only delay p50 / p99 ms",
                "worker delay p50 / p99 ms",
                "p99 worker / ack-only",
                "lost / duplicate verdicts / miscounted customers",
            ],
            rows,
        ),
        "",
        "Targets (ratios within one run, medians of rounds): throughput >= 90 % of the "
        "ack-only consumer's; CPU <= 0.5 ms per transaction; p99 delay at half rate <= 1.2x; "
        "nothing lost or counted twice.",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def store(state: str, workdir: Path, url: str | None) -> Iterator[str | None]:
    if state == "memory":
        yield None
    elif url:
        yield url
    else:
        (workdir / "redis").mkdir(exist_ok=True)
        with services.redis_server(workdir / "redis") as started:
            yield started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny round (smoke test)")
    parser.add_argument("--states", help="memory,redis (default both; --quick: memory)")
    parser.add_argument("--redis-url", help="use this Redis instead of starting redis-server")
    parser.add_argument("--count", type=int, help="transactions per burst (default 20000)")
    parser.add_argument("--seconds", type=float, help="length of the steady run (default 20)")
    parser.add_argument("--rounds", type=int, help="rounds per state (default 3)")
    parser.add_argument("--customers", type=int, default=1000, help="customers in the stream")
    parser.add_argument("--timeout", type=float, default=180, help="wait for a phase (s)")
    args = parser.parse_args(argv)
    states = (args.states or ("memory" if args.quick else "memory,redis")).split(",")
    args.count = args.count or (300 if args.quick else 20_000)
    args.seconds = args.seconds or (2.0 if args.quick else 20.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.quick:
        args.customers = min(args.customers, 20)
    print(header("Streaming-pull worker against an ack-only consumer"))
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with services.pubsub_emulator(workdir) as emulator:
            os.environ["PUBSUB_EMULATOR_HOST"] = emulator
            for state in states:
                with store(state, workdir, args.redis_url) as url:
                    cases.append(run_case(state, emulator, url, args, workdir))
    print(f"{args.rounds} round(s) of {args.count:,} transactions, steady {args.seconds:g} s\n")
    print(report(cases))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
