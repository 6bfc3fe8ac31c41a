"""Benchmark of the publisher: messages per second to a local Pub/Sub emulator.

Starts its own emulator (tests/services.py), creates a fresh topic with one subscription
(so the emulator stores every message, as in a real run), and measures:

1. publish: pre-built simulated transactions through each publisher
   (`BatchPublisher`, the default, and `LibraryPublisher`, google-cloud-pubsub's
   PublisherClient.publish), from the first send to the last confirmed future;
2. simulate: the whole `simulate` path (generation + labels + publishing) as the CLI runs it;
3. file: the book-scale `simulate --out` (1.75 M rows) with labels (skipped with --quick).

    .venv/bin/python bench/bench_publisher.py            # 200,000 messages per run
    .venv/bin/python bench/bench_publisher.py --quick    # seconds: the smoke test
    .venv/bin/python bench/bench_publisher.py --json     # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from google.cloud import pubsub_v1  # noqa: E402

from publisher.publish import (  # noqa: E402
    BatchPublisher,
    FileSink,
    LibraryPublisher,
    Outgoing,
    Publisher,
    StreamOptions,
    stream,
)
from publisher.simulate import SimulationConfig, records, write_jsonl  # noqa: E402
from stack import services  # noqa: E402

PROJECT = "bench"


def fresh_topic() -> str:
    """A new topic with one subscription; returns the topic name."""
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    name = services.unique("bench")
    path = publisher.topic_path(PROJECT, name)
    publisher.create_topic(name=path)
    subscriber.create_subscription(
        name=subscriber.subscription_path(PROJECT, name + "-sub"), topic=path
    )
    publisher.stop()
    subscriber.close()
    return name


def bench_publish(kind: str, messages: list[tuple[bytes, dict[str, str]]], host: str) -> float:
    """Messages/s through one publisher, until every future is confirmed."""
    topic = fresh_topic()
    publisher: Publisher = (
        BatchPublisher(PROJECT, host) if kind == "batch" else LibraryPublisher(PROJECT, host)
    )
    sink = publisher.topic(topic)
    started = time.perf_counter()
    for data, attributes in messages:
        sink.send(data, attributes)
    publisher.wait()
    elapsed = time.perf_counter() - started
    publisher.close()
    assert publisher.published == len(messages), (publisher.published, len(messages))
    return len(messages) / elapsed


def bench_simulate(config: SimulationConfig, count: int, host: str) -> float:
    """Messages/s of generation + labels + publishing, as `simulate --count N` runs it."""
    topic = fresh_topic()
    publisher = BatchPublisher(PROJECT, host)
    messages = (
        Outgoing(
            data=r.data,
            attributes={"transaction_id": r.transaction_id},
            event_time=r.event_time,
            label=r.label_json(),
            feedback=r.feedback_json(),
        )
        for r in records(config)
    )
    with tempfile.TemporaryDirectory() as tmp:
        labels = FileSink(Path(tmp) / "labels.jsonl", "--labels")
        started = time.perf_counter()
        summary = stream(messages, publisher.topic(topic), StreamOptions(count=count), labels)
        publisher.wait()
        elapsed = time.perf_counter() - started
        labels.close()
    publisher.close()
    assert summary.sent == count == publisher.published
    return count / elapsed


def bench_file(config: SimulationConfig, directory: Path) -> tuple[int, float]:
    """(rows, seconds) to write the transactions and labels files."""
    started = time.perf_counter()
    with (
        (directory / "out.jsonl").open("wb") as out,
        (directory / "labels.jsonl").open("wb") as lab,
    ):
        rows, _ = write_jsonl(config, out, lab)
    return rows, time.perf_counter() - started


def machine() -> dict[str, Any]:
    one, five, _ = os.getloadavg()
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_1m": round(one, 2),
        "load_5m": round(five, 2),
        "google-cloud-pubsub": metadata.version("google-cloud-pubsub"),
        "numpy": metadata.version("numpy"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small runs, for the smoke test")
    parser.add_argument("--messages", type=int, help="messages per publish run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    count = args.messages or (3_000 if args.quick else 200_000)
    config = SimulationConfig(seed=1)
    messages = [
        (r.data, {"transaction_id": r.transaction_id})
        for r in itertools.islice(records(config), count)
    ]
    results: dict[str, Any] = {"command": " ".join(sys.argv), "machine": machine()}
    results["messages"] = count
    with tempfile.TemporaryDirectory() as tmp, services.pubsub_emulator(Path(tmp)) as host:
        os.environ["PUBSUB_EMULATOR_HOST"] = host
        os.environ["GOOGLE_CLOUD_PROJECT"] = PROJECT
        fresh_topic()  # warm the emulator's JVM before timing anything
        results["publish_batch_msgs_per_s"] = round(bench_publish("batch", messages, host))
        results["publish_library_msgs_per_s"] = round(bench_publish("library", messages, host))
        results["simulate_msgs_per_s"] = round(bench_simulate(config, count, host))
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            rows, seconds = bench_file(SimulationConfig(), Path(tmp))
        results["file_rows"] = rows
        results["file_seconds"] = round(seconds, 1)
    if args.json:
        print(orjson.dumps(results).decode())
    else:
        for key, value in results.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
