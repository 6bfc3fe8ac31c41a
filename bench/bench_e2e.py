"""End to end on the local Pub/Sub emulator: detect_fraud against a pass-through function.

Usage: .venv/bin/python bench/bench_e2e.py [--quick] [--settings 1x8,1x16,2x8] [--rounds N]

Both functions run under functions-framework at the same time, each behind its own push
subscription (to ``{url}/projects/P/topics/T``, as Pub/Sub pushes to Cloud Functions), each
publishing to its own results topic, which this script pulls with a streaming subscriber:

- ``detect_fraud`` (detector/main.py, default ruleset, state in memory);
- ``passthrough`` (bench/passthrough/main.py): decodes and republishes the message unchanged
  through the detector's own `PubSubVerdictSink`, no detection.

Each round, for one functions-framework setting (``WORKERS`` x ``THREADS``):

1. Maximum throughput: publish N transactions as fast as the client can, to one function, then
   the other; throughput = verdicts per second between the first and the last verdict (the
   emulator's publish times of the verdicts). Also the CPU seconds the function's processes
   (gunicorn master and workers) used per 1,000 transactions.
2. Delay at half the pass-through's maximum rate: publish at a steady rate (half the maximum
   the pass-through reached in this round) to each function in turn; delay = the verdict's
   publish time - the transaction's publish time (the ``source_publish_time`` attribute both
   functions set), both taken by the emulator's clock; p50, p95, p99.
3. The emulator's own ceiling: the same burst pushed to a null endpoint in this process that
   answers 204 at once (no function, no republish), with the peak number of pushes in flight.
   The emulator keeps only about two pushes in flight per subscription (a null endpoint that
   waits 20 ms gets ~90 pushes/s), so through it throughput is about 2 / request latency.
4. Direct push: the same push requests POSTed straight to each function from ``--concurrency``
   connections (default 16), as real Pub/Sub does when it raises push concurrency under load:
   what the function itself can do, and what WORKERS and THREADS change. A third function,
   ``detect_fraud`` with ``MODEL_PATH=none``, runs here too: how much of the gap is the model's.

Transactions come from the project's simulator, enriched like bench_detect.py; each function
instance sees each transaction once and in event-time order. ``--quick`` runs one tiny round
(the smoke test).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _report  # noqa: E402
from bench_detect import enrich  # noqa: E402

from publisher.simulate import SimulationConfig, records  # noqa: E402
from stack.services import free_port, function_server, pubsub_emulator, unique  # noqa: E402

PROJECT = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stream(customers: int) -> Iterator[bytes]:
    """Enriched simulated transactions, endlessly, each with a fresh transaction_id."""
    config = SimulationConfig(seed=11, customers=customers, terminals=2 * customers, days=3650)
    for record in records(config):
        yield enrich(record.data)


# --- CPU accounting ---------------------------------------------------------------------


def sessions_with(marker: str) -> set[int]:
    """Session ids of the processes whose command line contains marker."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if marker in cmdline:
                found.add(_stat(entry)[3])
        except (OSError, IndexError, ValueError):
            continue
    return found


def _stat(entry: Path) -> list[int]:
    text = (entry / "stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # state ppid pgrp session ... utime(11) stime(12) after the comm field
    return [0, int(fields[1]), int(fields[2]), int(fields[3]), int(fields[11]), int(fields[12])]


def cpu_seconds(sessions: set[int]) -> float:
    """User + system CPU seconds of every live process in these sessions."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat(entry)
        except (OSError, IndexError, ValueError):
            continue
        if fields[3] in sessions:
            total += fields[4] + fields[5]
    return total / CLOCK_TICKS


# --- results collection -----------------------------------------------------------------


@dataclass
class Collector:
    """Verdicts of one results subscription, keyed by transaction_id (redeliveries dropped)."""

    seen: dict[str, tuple[float, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.arrived = threading.Condition(self.lock)

    def __call__(self, message: Any) -> None:
        transaction_id = orjson.loads(message.data)["transaction_id"]
        published = message.publish_time.timestamp()
        source = datetime.fromisoformat(message.attributes["source_publish_time"]).timestamp()
        message.ack()
        with self.arrived:
            self.seen.setdefault(transaction_id, (source, published))
            self.arrived.notify_all()

    def wait(self, ids: Sequence[str], timeout: float) -> list[tuple[float, float]]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                missing = sum(1 for i in ids if i not in self.seen)
                left = deadline - time.monotonic()
                if missing == 0 or left <= 0:
                    break
                self.arrived.wait(min(left, 0.5))
            return [self.seen[i] for i in ids if i in self.seen]


class NullEndpoint:
    """A push endpoint that answers 204 at once: the emulator's own push ceiling."""

    def __init__(self) -> None:
        self.delay = 0.0  # seconds each answer waits, to see how many pushes run at once
        self.times: list[float] = []
        self.inflight = 0
        self.peak = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                with lock:
                    outer.inflight += 1
                    outer.peak = max(outer.peak, outer.inflight)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if outer.delay:
                    time.sleep(outer.delay)
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with lock:
                    outer.inflight -= 1
                    outer.times.append(time.perf_counter())

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the pipeline -----------------------------------------------------------------------


@dataclass
class Target:
    """One function (or the null endpoint) wired to its topics."""

    name: str
    topic: str
    collector: Collector | None
    sessions: set[int]
    source: Iterator[bytes] | None = None
    url: str = ""


class Bench:
    def __init__(self, host: str) -> None:
        from google.cloud import pubsub_v1

        os.environ["PUBSUB_EMULATOR_HOST"] = host
        self.pubsub_v1 = pubsub_v1
        self.publisher = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(max_messages=200, max_latency=0.005),
        )
        self.subscriber = pubsub_v1.SubscriberClient()
        self.pulls: list[Any] = []

    def topic(self, prefix: str) -> str:
        name = unique(prefix)
        self.publisher.create_topic(name=f"projects/{PROJECT}/topics/{name}")
        return name

    def push(self, topic: str, url: str) -> None:
        self.subscriber.create_subscription(
            request={
                "name": f"projects/{PROJECT}/subscriptions/{unique('push')}",
                "topic": f"projects/{PROJECT}/topics/{topic}",
                "push_config": {"push_endpoint": f"{url}/projects/{PROJECT}/topics/{topic}"},
                "ack_deadline_seconds": 60,
            }
        )

    def collect(self, results: str) -> Collector:
        name = f"projects/{PROJECT}/subscriptions/{unique('collect')}"
        self.subscriber.create_subscription(
            request={"name": name, "topic": f"projects/{PROJECT}/topics/{results}"}
        )
        collector = Collector()
        flow = self.pubsub_v1.types.FlowControl(max_messages=5000)
        self.pulls.append(self.subscriber.subscribe(name, collector, flow_control=flow))
        return collector

    def send(
        self, topic: str, payloads: Sequence[bytes], rate: float | None
    ) -> tuple[float, float]:
        """Publish payloads, at `rate` per second or as fast as possible; (start, end) times."""
        path = f"projects/{PROJECT}/topics/{topic}"
        pending = []
        start = time.perf_counter()
        for index, data in enumerate(payloads):
            if rate is not None:
                due = start + index / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            pending.append(self.publisher.publish(path, data))
        futures.wait(pending, timeout=120)
        for future in pending:
            future.result(timeout=0)
        return start, time.perf_counter()

    def close(self) -> None:
        for pull in self.pulls:
            pull.cancel()
        for pull in self.pulls:
            with contextlib.suppress(Exception):
                pull.result(timeout=5)
        self.subscriber.close()
        self.publisher.transport.close()


def batch(target: Target, count: int, run: str) -> tuple[list[bytes], list[str]]:
    """Next `count` transactions of this target's stream, ids made unique to the run."""
    assert target.source is not None
    payloads, ids = [], []
    for index in range(count):
        tx = orjson.loads(next(target.source))
        tx["transaction_id"] = f"{run}-{index}"
        ids.append(tx["transaction_id"])
        payloads.append(orjson.dumps(tx))
    return payloads, ids


@dataclass
class Burst:
    throughput: float  # verdicts per second
    received: int
    sent: int
    cpu_per_1000: float  # CPU seconds of the function's processes per 1,000 transactions
    publish_rate: float  # what the publisher achieved


def burst(bench: Bench, target: Target, count: int, timeout: float) -> Burst:
    run = unique(f"max-{target.name}")
    payloads, ids = batch(target, count, run)
    assert target.collector is not None
    cpu_before = cpu_seconds(target.sessions)
    start, end = bench.send(target.topic, payloads, None)
    got = target.collector.wait(ids, timeout)
    cpu = cpu_seconds(target.sessions) - cpu_before
    published = sorted(p for _, p in got)
    span = published[-1] - published[0] if len(published) > 1 else float("nan")
    return Burst(
        throughput=(len(published) - 1) / span if span and span > 0 else float("nan"),
        received=len(got),
        sent=count,
        cpu_per_1000=cpu / max(len(got), 1) * 1000,
        publish_rate=count / (end - start),
    )


def null_burst(bench: Bench, null: NullEndpoint, topic: str, count: int, timeout: float) -> float:
    null.times.clear()
    null.peak = 0
    payloads = [b'{"amount": 1, "customer_id": "c"}'] * count
    bench.send(topic, payloads, None)
    deadline = time.monotonic() + timeout
    while len(null.times) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    times = sorted(null.times)
    if len(times) < 2:
        return float("nan")
    return (len(times) - 1) / (times[-1] - times[0])


@dataclass
class Direct:
    throughput: float  # requests answered per second
    p50: float  # request latency, ms
    p99: float
    failed: int


def direct(target: Target, count: int, concurrency: int) -> Direct:
    """POST push requests straight to the function from `concurrency` connections at once.

    What the function can do when pushes are not limited by the emulator (which keeps only
    about two in flight per subscription): real Pub/Sub raises push concurrency with success.
    """
    import http.client

    run = unique(f"direct-{target.name}")
    payloads, _ = batch(target, count, run)
    path = f"/projects/{PROJECT}/topics/{target.topic}"
    bodies = [
        orjson.dumps(
            {
                "message": {
                    "data": base64.b64encode(data).decode(),
                    "attributes": {},
                    "messageId": f"{run}-{index}",
                    "publishTime": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                },
                "subscription": f"projects/{PROJECT}/subscriptions/direct",
            }
        )
        for index, data in enumerate(payloads)
    ]
    host, port = target.url.removeprefix("http://").split(":")
    queue = iter(bodies)
    lock = threading.Lock()
    latencies: list[float] = []
    failures = [0]

    def worker() -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {"Content-Type": "application/json"}
        while True:
            with lock:
                body = next(queue, None)
            if body is None:
                break
            began = time.perf_counter()
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            took = time.perf_counter() - began
            with lock:
                latencies.append(took * 1000)
                if response.status >= 300:
                    failures[0] += 1
        connection.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return Direct(
        throughput=count / elapsed,
        p50=_report.percentile(latencies, 50),
        p99=_report.percentile(latencies, 99),
        failed=failures[0],
    )


@dataclass
class Delays:
    p50: float
    p95: float
    p99: float
    received: int
    sent: int
    samples: list[float] = field(default_factory=list, repr=False)


def steady(bench: Bench, target: Target, rate: float, seconds: float, timeout: float) -> Delays:
    count = max(int(rate * seconds), 20)
    run = unique(f"rate-{target.name}")
    payloads, ids = batch(target, count, run)
    assert target.collector is not None
    bench.send(target.topic, payloads, rate)
    got = target.collector.wait(ids, timeout)
    delays = [(published - source) * 1000 for source, published in got]
    return Delays(
        p50=_report.percentile(delays, 50),
        p95=_report.percentile(delays, 95),
        p99=_report.percentile(delays, 99),
        received=len(got),
        sent=count,
        samples=delays,
    )


@dataclass
class Setting:
    workers: int
    threads: int

    @property
    def label(self) -> str:
        return f"{self.workers}x{self.threads}"


def parse_settings(text: str) -> list[Setting]:
    result = []
    for part in text.split(","):
        workers, _, threads = part.strip().partition("x")
        result.append(Setting(int(workers), int(threads)))
    return result


def run_setting(
    bench: Bench,
    host: str,
    setting: Setting,
    workdir: Path,
    args: argparse.Namespace,
    null: NullEndpoint,
) -> list[dict[str, Any]]:
    """All rounds for one WORKERS x THREADS setting; one dict of numbers per round."""
    rows = []
    env_common = {
        "PUBSUB_EMULATOR_HOST": host,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "WORKERS": str(setting.workers),
        "THREADS": str(setting.threads),
        "PUBLISH_TIMEOUT": "30",
    }
    targets: dict[str, Target] = {}
    with contextlib.ExitStack() as stack:
        for name, source, function, extra in (
            ("detector", ROOT / "detector" / "main.py", "detect_fraud", {}),
            ("passthrough", ROOT / "bench" / "passthrough" / "main.py", "passthrough", {}),
            # Only for the direct push: how much of the gap is the model's.
            ("nomodel", ROOT / "detector" / "main.py", "detect_fraud", {"MODEL_PATH": "none"}),
        ):
            results, dead = bench.topic(f"{name}-out"), bench.topic(f"{name}-dead")
            env = {**env_common, **extra, "RESULTS_TOPIC": results, "DEAD_LETTER_TOPIC": dead}
            url = stack.enter_context(function_server(function, "cloudevent", env, workdir, source))
            topic = bench.topic(f"{name}-in")
            collector = bench.collect(results)
            bench.push(topic, url)
            port = url.rsplit(":", 1)[1]
            targets[name] = Target(
                name, topic, collector, sessions_with(f"--port {port}"), stream(args.customers), url
            )
        null_topic = bench.topic("null-in")
        bench.push(null_topic, null.url)
        # Warm up: the first requests import and connect the Pub/Sub client.
        for target in targets.values():
            burst(bench, target, 20, args.timeout)
        rounds = args.rounds if setting == args.first_setting else args.other_rounds
        for number in range(rounds):
            row: dict[str, Any] = {"setting": setting.label}
            # Alternate who goes first, so drift within a round favours neither.
            order = ["passthrough", "detector"] if number % 2 == 0 else ["detector", "passthrough"]
            for name in order:
                row[f"{name}_max"] = burst(bench, targets[name], args.count, args.timeout)
            row["null_max"] = null_burst(bench, null, null_topic, args.count, args.timeout)
            row["null_peak"] = null.peak
            for name in [*order, "nomodel"]:
                row[f"{name}_direct"] = direct(targets[name], args.count, args.concurrency)
            rate = row["passthrough_max"].throughput / 2
            row["rate"] = rate
            for name in order:
                row[f"{name}_delay"] = steady(
                    bench, targets[name], rate, args.seconds, args.timeout
                )
            rows.append(row)
            _print_round(row)
    return rows


def _print_round(row: dict[str, Any]) -> None:
    p, d = row["passthrough_max"], row["detector_max"]
    pd, dd = row["passthrough_delay"], row["detector_delay"]
    print(
        f"  round {row['setting']}: max {d.throughput:.0f}/s vs {p.throughput:.0f}/s "
        f"(null {row['null_max']:.0f}/s); at {row['rate']:.0f}/s p99 {dd.p99:.0f} ms vs "
        f"{pd.p99:.0f} ms; CPU s/1000 tx {d.cpu_per_1000:.2f} vs {p.cpu_per_1000:.2f}",
        file=sys.stderr,
    )


def report(rows: Sequence[dict[str, Any]], args_concurrency: int) -> None:
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_setting.setdefault(row["setting"], []).append(row)

    def med(values: Sequence[float]) -> float:
        return statistics.median(values)

    print("Maximum throughput (verdicts/s, median of rounds):\n")
    table = []
    for label, group in by_setting.items():
        d = med([r["detector_max"].throughput for r in group])
        p = med([r["passthrough_max"].throughput for r in group])
        ratio = med([r["detector_max"].throughput / r["passthrough_max"].throughput for r in group])
        table.append(
            (
                label,
                f"{d:.0f}",
                f"{p:.0f}",
                f"{ratio * 100:.0f} %",
                f"{med([r['null_max'] for r in group]):.0f}",
                f"{max(r['null_peak'] for r in group)}",
                f"{med([r['detector_max'].cpu_per_1000 for r in group]):.2f}",
                f"{med([r['passthrough_max'].cpu_per_1000 for r in group]):.2f}",
                f"{med([r['passthrough_max'].publish_rate for r in group]):.0f}",
                _lost(group, "detector_max") + " / " + _lost(group, "passthrough_max"),
            )
        )
    print(
        _report.table(
            ["WORKERS x THREADS", "detect_fraud", "pass-through", "detector / pass-through",
             "null endpoint (emulator ceiling)", "null: pushes in flight (peak)",
             "detector CPU s / 1000 tx", "pass-through CPU s / 1000 tx",
             "publisher msgs/s", "missing (detector / pass-through)"],
            table,
        )
    )  # fmt: skip
    print(
        f"\nDirect push, {args_concurrency} connections straight to the function (no emulator "
        "in front; requests/s and latency in ms, median of rounds):\n"
    )
    table = []
    for label, group in by_setting.items():
        dd = [r["detector_direct"] for r in group]
        pp = [r["passthrough_direct"] for r in group]
        nn = [r["nomodel_direct"] for r in group]
        ratio = med([a.throughput / b.throughput for a, b in zip(dd, pp, strict=True)])
        ratio_n = med([a.throughput / b.throughput for a, b in zip(nn, pp, strict=True)])
        table.append(
            (
                label,
                f"{med([x.throughput for x in dd]):.0f}",
                f"{med([x.throughput for x in pp]):.0f}",
                f"{ratio * 100:.0f} %",
                f"{med([x.throughput for x in nn]):.0f} ({ratio_n * 100:.0f} %)",
                f"{med([x.p50 for x in dd]):.1f}",
                f"{med([x.p99 for x in dd]):.1f}",
                f"{med([x.p50 for x in pp]):.1f}",
                f"{med([x.p99 for x in pp]):.1f}",
                f"{sum(x.failed for x in dd)} / {sum(x.failed for x in pp)}",
            )
        )
    print(
        _report.table(
            ["WORKERS x THREADS", "detect_fraud /s", "pass-through /s",
             "detector / pass-through", "detect_fraud, MODEL_PATH=none /s",
             "detector p50", "p99", "pass-through p50", "p99",
             "failed (detector / pass-through)"],
            table,
        )
    )  # fmt: skip
    print(
        "\nDelay publish-to-verdict at half the pass-through's maximum rate (ms; percentiles "
        "of every round's delays pooled; per-round p99 ratios in brackets):\n"
    )
    table = []
    for label, group in by_setting.items():
        pooled = {
            name: [x for r in group for x in r[f"{name}_delay"].samples]
            for name in ("detector", "passthrough")
        }
        pct = {
            (name, q): _report.percentile(values, q)
            for name, values in pooled.items()
            for q in (50, 95, 99)
        }
        rounds = ", ".join(
            f"{r['detector_delay'].p99 / r['passthrough_delay'].p99:.2f}" for r in group
        )
        table.append(
            (
                label,
                f"{med([r['rate'] for r in group]):.0f}",
                f"{pct['detector', 50]:.0f}",
                f"{pct['detector', 95]:.0f}",
                f"{pct['detector', 99]:.0f}",
                f"{pct['passthrough', 50]:.0f}",
                f"{pct['passthrough', 95]:.0f}",
                f"{pct['passthrough', 99]:.0f}",
                f"{pct['detector', 99] / pct['passthrough', 99]:.2f}x ({rounds})",
                _lost(group, "detector_delay") + " / " + _lost(group, "passthrough_delay"),
            )
        )
    print(
        _report.table(
            ["WORKERS x THREADS", "rate /s", "detector p50", "p95", "p99",
             "pass-through p50", "p95", "p99", "p99 detector / pass-through",
             "missing (detector / pass-through)"],
            table,
        )
    )  # fmt: skip
    first = next(iter(by_setting.values()))
    ratio = med([r["detector_max"].throughput / r["passthrough_max"].throughput for r in first])
    p99 = _report.percentile(
        [x for r in first for x in r["detector_delay"].samples], 99
    ) / _report.percentile([x for r in first for x in r["passthrough_delay"].samples], 99)
    print(
        f"\nTarget (default setting {first[0]['setting']}): throughput >= 90 % of the "
        f"pass-through: {'met' if ratio >= 0.9 else 'missed'} ({ratio * 100:.0f} %); "
        f"p99 <= 1.2x the pass-through's: {'met' if p99 <= 1.2 else 'missed'} ({p99:.2f}x)"
    )


def _lost(group: Sequence[dict[str, Any]], key: str) -> str:
    return str(sum(r[key].sent - r[key].received for r in group))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny round (smoke test)")
    parser.add_argument("--settings", help="WORKERSxTHREADS list, e.g. 1x8,1x16,2x8")
    parser.add_argument("--rounds", type=int, help="rounds of the first setting (default 3)")
    parser.add_argument("--other-rounds", type=int, help="rounds of the other settings (1)")
    parser.add_argument("--count", type=int, help="transactions per maximum-throughput burst")
    parser.add_argument("--seconds", type=float, help="length of each steady-rate run")
    parser.add_argument(
        "--concurrency", type=int, default=16, help="connections of the direct-push run"
    )
    parser.add_argument("--timeout", type=float, default=120, help="wait for verdicts (s)")
    parser.add_argument("--customers", type=int, default=2000, help="simulated customers")
    parser.add_argument("--logs", type=Path, help="keep the functions' and emulator's logs here")
    args = parser.parse_args(argv)
    default_threads = (os.cpu_count() or 1) * 4  # functions-framework's own default
    settings = parse_settings(
        args.settings or (f"1x{default_threads}" if args.quick else f"1x{default_threads},1x16,2x8")
    )
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.other_rounds = args.other_rounds or 1
    args.first_setting = settings[0]
    args.count = args.count or (60 if args.quick else 2000)
    args.seconds = args.seconds or (2.0 if args.quick else 15.0)
    if args.quick:
        args.customers = 50

    print(_report.header("End to end on the emulator (bench/bench_e2e.py)"))
    print(
        f"Settings {', '.join(s.label for s in settings)} (functions-framework default "
        f"1x{default_threads} here: WORKERS=1, THREADS=4 x CPUs); {args.rounds} round(s) of the first, "
        f"{args.other_rounds} of the others; "
        f"bursts of {args.count}; steady runs of {args.seconds:g} s. Everything (emulator, "
        "both functions, publisher and collector) shares this machine.\n"
    )
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if args.logs is not None:
            args.logs.mkdir(parents=True, exist_ok=True)
            workdir = args.logs
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        host = stack.enter_context(pubsub_emulator(workdir))
        bench = Bench(host)
        null = NullEndpoint()
        try:
            for setting in settings:
                rows += run_setting(bench, host, setting, workdir, args, null)
        finally:
            null.close()
            bench.close()
    report(rows, args.concurrency)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
