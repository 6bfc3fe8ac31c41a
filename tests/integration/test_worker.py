"""The streaming-pull worker against the real emulator and redis-server, as a user runs it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from google.cloud import pubsub_v1

from stack import services
from stack.services import ROOT
from tests.helpers.pubsub import (
    PROJECT,
    Received,
    create_subscription,
    create_topic,
    pull,
    topic_path,
)

pytestmark = pytest.mark.integration

#: Rules that show state in every verdict: a shadow rule that always fires and reports the
#: customer's earlier transactions, and a block on a terminal with reported fraud.
RULES = """
version: "worker-test"
rules:
  - id: terminal-reported
    description: "{by_terminal.fraud_count_30d} reported frauds at this terminal in 30 days"
    condition: by_terminal.fraud_count_30d >= 1
    action: block
  - id: customer-history
    description: "{by_customer.count_30d} earlier transactions of this customer in 30 days"
    condition: by_customer.count_30d >= 0
    action: review
    shadow: true
"""


@dataclass
class Wiring:
    """Fresh topics and subscriptions, and the worker's environment and arguments."""

    publisher: pubsub_v1.PublisherClient
    subscriber: pubsub_v1.SubscriberClient
    transactions: str
    feedback: str
    results_topic: str
    results: str
    dead_letters: str
    feedback_dead_letters: str
    env: dict[str, str]
    args: list[str]
    workdir: Path
    started: list[services.Worker] = field(default_factory=list)

    def send(self, data: bytes, **attributes: str) -> str:
        return str(
            self.publisher.publish(topic_path(self.transactions), data, **attributes).result(30)
        )

    def send_many(self, items: list[bytes]) -> list[str]:
        futures = [self.publisher.publish(topic_path(self.transactions), data) for data in items]
        return [str(future.result(60)) for future in futures]

    def start(self, *extra: str) -> services.Worker:
        """A worker on these subscriptions, stopped at the end of the test at the latest."""
        worker = services.start_worker([*self.args, *extra], self.env, self.workdir)
        self.started.append(worker)
        return worker

    def verdicts_until(self, count: int) -> dict[str, list[Received]]:
        """Pull verdicts until `count` distinct transactions have one; by transaction_id."""
        got: dict[str, list[Received]] = defaultdict(list)
        deadline = time.monotonic() + 60
        while len(got) < count and time.monotonic() < deadline:
            for message in pull(self.subscriber, self.results, 100, timeout=0.5):
                got[message.attributes["transaction_id"]].append(message)
        return got


def wire(
    pubsub_env: dict[str, str], workdir: Path, *, create_results: bool = True, **env: str
) -> Iterator[Wiring]:
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    names = {n: services.unique(n) for n in ("tx", "fb", "verdicts", "dead", "fb-dead")}
    for name in names.values():
        if name != names["verdicts"] or create_results:
            create_topic(publisher, name)
    pull_tx = create_subscription(
        subscriber, services.unique("worker"), names["tx"], ack_deadline_seconds=10
    )
    pull_fb = create_subscription(subscriber, services.unique("worker-fb"), names["fb"])
    results = (
        create_subscription(subscriber, services.unique("watch"), names["verdicts"])
        if create_results
        else ""
    )
    dead = create_subscription(subscriber, services.unique("dead-keep"), names["dead"])
    fb_dead = create_subscription(subscriber, services.unique("fb-dead-keep"), names["fb-dead"])
    (workdir / "rules.yaml").write_text(RULES)
    full_env = {
        **pubsub_env,
        "RESULTS_TOPIC": names["verdicts"],
        "DEAD_LETTER_TOPIC": names["dead"],
        "FEEDBACK_DEAD_LETTER_TOPIC": names["fb-dead"],
        "RULES_FILE": str(workdir / "rules.yaml"),
        "MODEL_PATH": "none",
        "PUBLISH_TIMEOUT": "5",
        **env,
    }
    args = ["--subscription", pull_tx.rsplit("/", 1)[1], "--feedback-subscription", pull_fb]
    wiring = Wiring(
        publisher,
        subscriber,
        names["tx"],
        names["fb"],
        names["verdicts"],
        results,
        dead,
        fb_dead,
        full_env,
        [*args, "--log-interval", "1s"],
        workdir,
    )
    try:
        yield wiring
    finally:
        for worker in wiring.started:
            worker.process.stop()
    publisher.transport.close()
    subscriber.close()


@pytest.fixture()
def wiring(pubsub_env: dict[str, str], workdir: Path) -> Iterator[Wiring]:
    yield from wire(pubsub_env, workdir)


def transaction(tx_id: str, customer: str, timestamp: str, **extra: Any) -> bytes:
    return orjson.dumps(
        {
            "transaction_id": tx_id,
            "amount": 25.0,
            "customer_id": customer,
            "terminal_id": f"term-{customer}",
            "timestamp": timestamp,
            **extra,
        }
    )


def stamp(second: int) -> str:
    """An RFC 3339 time `second` seconds after 2024-05-01T10:00:00Z."""
    return f"2024-05-01T{10 + second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}Z"


def reason(verdict: dict[str, Any], rule: str) -> dict[str, Any] | None:
    return next((r for r in verdict["reasons"] if r["rule"] == rule), None)


def collect(
    subscriber: pubsub_v1.SubscriberClient,
    subscription: str,
    wanted: set[str],
    timeout: float = 60,
) -> dict[str, list[Received]]:
    """Pull verdicts until every transaction_id in `wanted` has one, or timeout; by id."""
    got: dict[str, list[Received]] = defaultdict(list)
    deadline = time.monotonic() + timeout
    while not wanted <= got.keys() and time.monotonic() < deadline:
        for message in pull(subscriber, subscription, 1000, timeout=1):
            got[message.attributes["transaction_id"]].append(message)
    return got


def wait_for_log(path: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged in {path} within {timeout} s")


def log_entries(worker: services.Worker) -> list[dict[str, Any]]:
    entries = []
    for line in worker.process.output().splitlines():
        if line.startswith("{"):
            entries.append(orjson.loads(line))
    return entries


BAD = [
    (b"{{{", "invalid_json", "data: not valid UTF-8 JSON"),
    (b"[]", "invalid_json", "data: must be a JSON object, got list"),
    (b'{"amount": "lots", "customer_id": "c"}', "invalid_transaction", "amount: must be a number"),
    (
        b'{"amount": 5, "customer_id": "c", "decision": "allow"}',
        "invalid_transaction",
        "decision: is a verdict field",
    ),
]


def test_mixed_stream_gets_verdicts_dead_letters_and_labels(wiring: Wiring) -> None:
    """Valid transactions get verdicts, invalid ones dead letters as detect_fraud's; labels count."""
    customer = services.unique("cust")
    worker = wiring.start()
    good = {f"m-{i}": wiring.send(transaction(f"m-{i}", customer, stamp(i))) for i in range(30)}
    bad = {wiring.send(data, source="till-3"): (data, kind, error) for data, kind, error in BAD}
    verdicts = collect(wiring.subscriber, wiring.results, set(good))
    dead = pull(wiring.subscriber, wiring.dead_letters, len(bad), timeout=30)

    assert {tid: len(got) for tid, got in verdicts.items()} == dict.fromkeys(good, 1)
    for tid, [message] in verdicts.items():
        body = orjson.loads(message.data)
        assert body["message_id"] == good[tid]
        assert body["decision"] == "allow"
        assert message.attributes["decision"] == "allow"
        assert message.attributes["is_fraud"] == "false"
        assert message.attributes["rules_version"] == "worker-test"
        assert message.attributes["source_publish_time"].endswith("Z")
    # Each transaction saw those of the customer before it, whatever the batches were.
    counts = sorted(
        reason(orjson.loads(m.data), "customer-history")["values"]["by_customer.count_30d"]
        for [m] in verdicts.values()
    )
    assert counts == list(range(30))

    assert len(dead) == len(bad)
    for letter in dead:
        data, kind, error = bad[letter.attributes["message_id"]]
        assert letter.data == data
        assert letter.attributes["error_type"] == kind
        assert letter.attributes["error"].startswith(error)
        assert letter.attributes["source"] == "till-3"

    # A label through the feedback subscription makes the terminal's next transaction block;
    # an invalid label goes to the feedback dead-letter topic.
    wiring.publisher.publish(
        topic_path(wiring.feedback), orjson.dumps({"transaction_id": "m-0", "is_fraud": True})
    ).result(30)
    wiring.publisher.publish(
        topic_path(wiring.feedback), b'{"transaction_id": "m-1"}', kind="chargeback"
    ).result(30)
    wait_for_log(worker.process.log, "label fraud for m-0")
    [bad_label] = pull(wiring.subscriber, wiring.feedback_dead_letters, 1)
    assert bad_label.attributes["error_type"] == "invalid_label"
    assert bad_label.attributes["error"].startswith("is_fraud: Field required")
    assert bad_label.attributes["kind"] == "chargeback"
    wiring.send(
        transaction("m-after", services.unique("cust"), stamp(100), terminal_id=f"term-{customer}")
    )
    [[after]] = collect(wiring.subscriber, wiring.results, {"m-after"}).values()
    assert orjson.loads(after.data)["decision"] == "block"

    # Progress lines: one per interval, counts and lag, no payloads.
    progress = [e for e in log_entries(worker) if "messages_per_s" in e]
    assert progress, worker.process.output()
    assert sum(e["verdicts"] for e in progress) >= 31
    assert sum(e["dead_letters"] for e in progress) == len(bad)
    assert all(e["severity"] == "INFO" for e in progress)
    assert any(e["lag_p99_ms"] is not None for e in progress)
    assert customer not in worker.process.output()  # no payload, no customer, at INFO
    worker.process.stop()
    assert worker.process.popen.returncode == 0


def wave_stream(customers: int, waves: int, run: str) -> list[list[bytes]]:
    """Transactions in waves: one per customer each, every entity its customer's own.

    Within a wave no two transactions share an entity, so the order Pub/Sub delivers a wave
    in cannot change a verdict; a wave is published once the previous one is decided.
    """
    amounts = [12.5, 80.0, 1500.0, 310.0, 45.25, 999.99, 7.0, 2400.0]
    stream = []
    for wave in range(waves):
        stream.append(
            [
                orjson.dumps(
                    {
                        "transaction_id": f"{run}-{wave}-{c}",
                        "amount": amounts[(wave * 3 + c) % len(amounts)] + c,
                        "customer_id": f"{run}-cust-{c}",
                        "card_id": f"{run}-card-{c}",
                        "terminal_id": f"{run}-term-{c}",
                        "merchant": f"{run}-shop-{c}",
                        "country": "FR" if c % 3 else "US",
                        "timestamp": stamp(wave * 600 + c * 7),
                    }
                )
                for c in range(customers)
            ]
        )
    return stream


def essence(verdict: dict[str, Any]) -> tuple[str, float, list[Any]]:
    return verdict["decision"], verdict["score"], verdict["reasons"]


def test_worker_function_and_replay_give_the_same_verdicts(
    pubsub_env: dict[str, str], workdir: Path
) -> None:
    """One stream through the worker, detect_fraud and replay: the same decisions, scores, reasons."""
    # The bundled rules and model, as deployed.
    for wiring in wire(pubsub_env, workdir, RULES_FILE="", MODEL_PATH=""):
        fn_results = services.unique("fn-verdicts")
        create_topic(wiring.publisher, fn_results)
        fn_watch = create_subscription(wiring.subscriber, services.unique("fn-watch"), fn_results)
        fn_env = {**wiring.env, "RESULTS_TOPIC": fn_results}
        stream = wave_stream(customers=12, waves=5, run=services.unique("eq"))
        by_worker: dict[str, dict[str, Any]] = {}
        by_function: dict[str, dict[str, Any]] = {}
        with (
            services.worker_process(wiring.args, wiring.env, workdir),
            services.function_server("detect_fraud", "cloudevent", fn_env, workdir) as url,
        ):
            create_subscription(
                wiring.subscriber,
                services.unique("push"),
                wiring.transactions,
                push_endpoint=f"{url}/projects/{PROJECT}/topics/{wiring.transactions}",
            )
            for wave in stream:
                ids = {orjson.loads(data)["transaction_id"] for data in wave}
                wiring.send_many(wave)
                for target, subscription in ((by_worker, wiring.results), (by_function, fn_watch)):
                    got = collect(wiring.subscriber, subscription, ids)
                    assert got.keys() == ids
                    target.update({tid: orjson.loads(m[0].data) for tid, m in got.items()})
        lines = workdir / "stream.jsonl"
        lines.write_bytes(b"".join(data + b"\n" for wave in stream for data in wave))
        replayed = workdir / "replayed.jsonl"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "detector",
                "replay",
                "--input",
                str(lines),
                "--output",
                str(replayed),
                "--workers",
                "1",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        by_replay = {
            v["transaction_id"]: v for v in map(orjson.loads, replayed.read_bytes().splitlines())
        }
        assert len(by_replay) == 60
        assert {t: essence(v) for t, v in by_worker.items()} == {
            t: essence(v) for t, v in by_replay.items()
        }
        assert {t: essence(v) for t, v in by_function.items()} == {
            t: essence(v) for t, v in by_replay.items()
        }
        # The stream exercises what could differ: state, the model and several decisions.
        assert {v["decision"] for v in by_replay.values()} >= {"allow", "block"}
        assert len({v["score"] for v in by_replay.values()}) > 10


def test_sigterm_finishes_what_it_holds_and_exits_within_10_seconds(wiring: Wiring) -> None:
    """SIGTERM while holding a batch: it decides, publishes and acks it, exits 0 in under 10 s."""
    run = services.unique("term")
    stream = [transaction(f"{run}-{i}", f"{run}-{i % 10}", stamp(i)) for i in range(300)]
    ids = {orjson.loads(data)["transaction_id"] for data in stream}
    # A batch waits up to 10 s to fill up to 1000: everything delivered is held, undecided.
    first = wiring.start("--batch-size", "1000", "--batch-wait", "10s", "--max-messages", "1000")
    wiring.send_many(stream)
    wait_for_log(first.process.log, '"held":300')
    assert pull(wiring.subscriber, wiring.results, 1, timeout=1) == []
    started = time.monotonic()
    first.process.popen.send_signal(signal.SIGTERM)
    status = first.process.popen.wait(15)
    took = time.monotonic() - started
    assert status == 0, first.process.output()[-3000:]
    assert took < 10
    got = collect(wiring.subscriber, wiring.results, ids, timeout=30)
    assert {tid: len(verdicts) for tid, verdicts in got.items()} == dict.fromkeys(ids, 1)
    # Acked: a new worker on the subscription gets none of them again.
    second = wiring.start()
    time.sleep(12)  # past the subscription's 10 s ack deadline
    assert pull(wiring.subscriber, wiring.results, 1, timeout=2) == []
    second.process.stop()


def test_sigkill_mid_batch_then_restart_loses_nothing_and_counts_once(
    pubsub_env: dict[str, str], redis_url: str, workdir: Path
) -> None:
    """SIGKILL mid-stream and a restart: every transaction gets a verdict, state counts it once."""
    for wiring in wire(pubsub_env, workdir, REDIS_URL=redis_url):
        run = services.unique("kill")
        customers = [f"{run}-c{c}" for c in range(10)]
        stream = [transaction(f"{run}-{i}", customers[i % 10], stamp(i)) for i in range(500)]
        ids = {orjson.loads(data)["transaction_id"] for data in stream}
        wiring.send_many(stream)
        # A 10 s lease: the emulator may route what comes back to the dead stream again, and
        # each such round costs a lease (300 s were seen for all to return at the default 60 s).
        first = wiring.start("--batch-size", "10", "--max-messages", "1000", "--lease", "10s")
        seen = wiring.verdicts_until(50)
        first.process.popen.send_signal(signal.SIGKILL)
        first.process.popen.wait(10)
        assert len(seen) < len(ids), "the stream ended before SIGKILL"

        second = wiring.start("--lease", "10s")
        # Unacked messages come back after the dead stream's lease.
        for tid, got in collect(wiring.subscriber, wiring.results, ids - seen.keys(), 150).items():
            seen[tid] += got
        assert seen.keys() == ids
        # One more transaction per customer, after all the others: its history holds each of
        # the customer's 50 transactions exactly once, redelivered ones included.
        probes = {f"{run}-probe-{c}": c for c in customers}
        for tid, customer in probes.items():
            wiring.send(transaction(tid, customer, stamp(600)))
        # The emulator may still route a probe to the killed stream until its lease ends.
        got = collect(wiring.subscriber, wiring.results, set(probes), timeout=150)
        second.process.stop()
        counts = {
            probes[tid]: reason(orjson.loads(m[0].data), "customer-history")["values"]
            for tid, m in got.items()
        }
        assert counts == {c: {"by_customer.count_30d": 50} for c in customers}


def test_publish_outage_is_redelivered_until_verdicts_arrive(
    pubsub_env: dict[str, str], workdir: Path
) -> None:
    """While the results topic is missing nothing is acked; once it exists every verdict arrives."""
    for wiring in wire(pubsub_env, workdir, create_results=False):
        worker = wiring.start()
        run = services.unique("outage")
        ids = {f"{run}-{i}" for i in range(5)}
        for i, tid in enumerate(sorted(ids)):
            wiring.send(transaction(tid, run, stamp(i)))
        wait_for_log(worker.process.log, "failed and will be redelivered")
        time.sleep(2)  # several deliveries fail: each is nacked, none acked
        create_topic(wiring.publisher, wiring.results_topic)
        watch = create_subscription(
            wiring.subscriber, services.unique("late-watch"), wiring.results_topic
        )
        got = collect(wiring.subscriber, watch, ids, timeout=60)
        worker.process.stop()
        assert got.keys() == ids
        progress = [e for e in log_entries(worker) if "messages_per_s" in e]
        assert sum(e["nacked"] for e in progress) >= 5
        assert sum(e["verdicts"] for e in progress) >= 5


def test_health_is_503_when_the_store_is_unreachable(
    pubsub_env: dict[str, str], workdir: Path
) -> None:
    """GET /healthz: 200 while pulling with Redis up, 503 once Redis is gone."""
    (workdir / "redis-gone").mkdir()
    with contextlib.ExitStack() as redis:
        url = redis.enter_context(services.redis_server(workdir / "redis-gone"))
        for wiring in wire(pubsub_env, workdir, REDIS_URL=url):
            worker = wiring.start()
            assert worker.healthy() == 200
            redis.close()  # stops redis-server
            deadline = time.monotonic() + 15
            while worker.healthy() != 503 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert worker.healthy() == 503
            worker.process.stop()
            assert worker.process.popen.returncode == 0
