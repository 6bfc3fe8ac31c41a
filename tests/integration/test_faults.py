"""Faults during a stream through the emulator: the store, the function, the results topic and
the emulator itself fail and come back while transactions flow. Afterwards every transaction
has a verdict, and a last one shows each earlier one counted once in state."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from google.cloud import pubsub_v1

from stack import services
from tests.helpers.pubsub import PROJECT, create_topic, pull, subscription_path, topic_path

pytestmark = pytest.mark.integration

RULES = """
version: "faults"
rules:
  - id: history
    description: "{by_customer.count_1d} earlier transactions of this customer in 1 day"
    condition: by_customer.count_1d >= 0
    action: review
"""
START = datetime(2025, 3, 1, tzinfo=UTC)


def kill(process: services.Process) -> None:
    """SIGKILL the service's whole group: no chance to finish what it holds."""
    os.killpg(process.popen.pid, signal.SIGKILL)
    process.popen.wait(timeout=10)


def durable_redis(workdir: Path, port: int) -> services.Process:
    """redis-server on `port` writing every command to an append-only file in `workdir`
    before it answers, so one started again there after a SIGKILL has all the state."""
    binary = services.store_binary()
    assert binary is not None
    argv = services.store_command(binary, port, workdir)
    argv[argv.index("--appendonly") + 1] = "yes"
    process = services.start(
        [*argv, "--appendfsync", "always"], workdir / f"redis-{time.time_ns()}.log"
    )
    deadline = time.monotonic() + 30
    with redis.Redis(port=port) as client:
        while True:
            try:
                client.ping()
                return process
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, process.output()
                time.sleep(0.05)


@dataclass
class Stream:
    """One customer's transactions pushed through the emulator to `detect_fraud` on a fixed
    port, and what came out: verdicts by transaction_id, and dead letters."""

    workdir: Path
    redis_url: str
    function_port: int = field(default_factory=services.free_port)
    publisher: Any = field(default_factory=pubsub_v1.PublisherClient)
    subscriber: Any = field(default_factory=pubsub_v1.SubscriberClient)
    tx: str = field(default_factory=lambda: services.unique("tx"))
    results: str = field(default_factory=lambda: services.unique("res"))
    dead: str = field(default_factory=lambda: services.unique("dead"))
    customer: str = field(default_factory=lambda: services.unique("cust"))
    watch: str = ""
    dead_watch: str = ""
    sent: int = 0
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    dead_letters: int = 0
    function: services.Process | None = None

    def create(self) -> None:
        """The topics and subscriptions: the push one to the function, a pull one on each of
        the results and dead-letter topics for the test to read."""
        for topic in (self.tx, self.results, self.dead):
            create_topic(self.publisher, topic)
        self.watch = self.subscribe(self.results)
        self.dead_watch = self.subscribe(self.dead)
        endpoint = f"http://127.0.0.1:{self.function_port}/projects/{PROJECT}/topics/{self.tx}"
        # No retry_policy: with one (1 to 2 s of backoff) the emulator stops redelivering some
        # messages after their second 500, though the function failed each time; without,
        # it keeps pushing a failed message again until it is acked.
        self.subscriber.create_subscription(
            request={
                "name": subscription_path(services.unique("push")),
                "topic": topic_path(self.tx),
                "push_config": {"push_endpoint": endpoint},
            }
        )

    def subscribe(self, topic: str) -> str:
        name = subscription_path(services.unique("watch"))
        self.subscriber.create_subscription(request={"name": name, "topic": topic_path(topic)})
        return name

    def start_function(self) -> None:
        """Start the function on its port; the log of an earlier one is kept aside."""
        log = self.workdir / f"detect_fraud-{self.function_port}.log"
        if log.exists():
            log.rename(log.with_suffix(f".{time.time_ns()}.log"))
        (self.workdir / "rules.yaml").write_text(RULES)
        env = {
            "REDIS_URL": self.redis_url,
            "RESULTS_TOPIC": self.results,
            "DEAD_LETTER_TOPIC": self.dead,
            "RULES_FILE": str(self.workdir / "rules.yaml"),
            "MODEL_PATH": "none",
            "PUBLISH_TIMEOUT": "3",
        }
        self.function = services.start_function(
            "detect_fraud", "cloudevent", env, self.workdir, port=self.function_port
        )

    def logs(self) -> str:
        """Everything every function process of the stream logged."""
        return "".join(p.read_text() for p in sorted(self.workdir.glob("detect_fraud-*.log")))

    def failed(self, reason: str) -> set[str]:
        """The message ids of the transactions the function failed for `reason`, to have them
        redelivered."""
        return {
            orjson.loads(line)["message_id"]
            for line in self.logs().splitlines()
            if "will be redelivered" in line and reason in line
        }

    def send(self, count: int) -> None:
        """Publish the next `count` transactions, a minute apart in event time."""
        futures = []
        for _ in range(count):
            moment = START + timedelta(minutes=self.sent)
            data = {
                "transaction_id": f"{self.customer}-{self.sent}",
                "amount": 10.0 + self.sent,
                "customer_id": self.customer,
                "timestamp": moment.isoformat().replace("+00:00", "Z"),
            }
            futures.append(self.publisher.publish(topic_path(self.tx), orjson.dumps(data)))
            self.sent += 1
        for future in futures:
            future.result(30)

    def collect(self, timeout: float = 60) -> None:
        """Read verdicts until every transaction sent has one, or timeout."""
        deadline = time.monotonic() + timeout
        while self.missing() and time.monotonic() < deadline:
            # One message asked for: the pull returns with what came, not after the timeout.
            for message in pull(self.subscriber, self.watch, 1, timeout=1):
                body = orjson.loads(message.data)
                self.verdicts.setdefault(body["transaction_id"], body)

    def count_dead_letters(self) -> None:
        """Read the dead letters so far: one pull, which the emulator holds a few seconds
        when there are none."""
        self.dead_letters += len(pull(self.subscriber, self.dead_watch, 100, timeout=0.1))

    def missing(self) -> list[str]:
        wanted = (f"{self.customer}-{n}" for n in range(self.sent))
        return [t for t in wanted if t not in self.verdicts]

    def check(self, fault: str) -> None:
        """Send a last transaction after all verdicts are in: its count of earlier ones must
        be every one sent before, each once. Prints the counts, then asserts them."""
        self.collect()
        earlier = self.sent
        self.send(1)
        self.collect(timeout=30)
        self.count_dead_letters()
        lost = self.missing()
        last = self.verdicts.get(f"{self.customer}-{earlier}")
        counted = int(last["reasons"][0]["values"]["by_customer.count_1d"]) if last else None
        double = counted - earlier if counted is not None else "no verdict"
        print(
            f"\nfaults, {fault}: {self.sent} transactions sent, {len(self.verdicts)} verdicts, "
            f"{self.dead_letters} dead letters, lost: {len(lost)}, "
            f"double counts: {double}"
        )
        assert lost == [], f"{len(lost)} transactions without a verdict: {lost[:5]}"
        assert self.dead_letters == 0
        assert counted == earlier, f"the last transaction saw {counted} earlier, not {earlier}"


@pytest.fixture()
def stream(pubsub_env: dict[str, str], redis_url: str, workdir: Path) -> Iterator[Stream]:
    """A stream on the session's emulator and redis-server, its function started."""
    stream = Stream(workdir, redis_url)
    stream.create()
    stream.start_function()
    try:
        yield stream
    finally:
        if stream.function is not None:
            stream.function.stop()


def wait_for(condition: Any, what: str, timeout: float = 30) -> None:
    """Poll `condition()` until true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not in {timeout} s: {what}"
        time.sleep(0.05)


def test_redis_killed_and_restarted(pubsub_env: dict[str, str], workdir: Path) -> None:
    """Transactions sent while redis-server is dead fail and are redelivered until a
    redis-server is back on the same port with the state it had."""
    port = services.free_port()
    store = durable_redis(workdir, port)
    stream = Stream(workdir, f"redis://127.0.0.1:{port}/0")
    stream.create()
    try:
        stream.start_function()
        stream.send(10)
        stream.collect()
        kill(store)
        stream.send(10)
        wait_for(lambda: len(stream.failed("unreachable")) == 10, "each failing on the store")
        store = durable_redis(workdir, port)
        stream.check("redis-server killed and restarted")
    finally:
        if stream.function is not None:
            stream.function.stop()
        store.stop()


def test_function_killed_mid_stream_and_restarted(stream: Stream) -> None:
    """The function is SIGKILLed while it works through a batch and started again on its
    port: what it held and what came while it was dead is delivered again."""
    stream.send(10)
    stream.collect()
    stream.send(20)
    wait_for(
        lambda: stream.logs().count("review transaction") > 10, "a verdict of the second batch"
    )
    assert stream.function is not None
    kill(stream.function)
    decided = stream.logs().count("review transaction")
    stream.send(5)
    time.sleep(2)  # the emulator's pushes meet a closed port
    stream.start_function()
    print(f"\n{decided - 10} of 20 decided when the function was killed")
    stream.check("the function killed mid-stream and restarted")


def test_results_topic_deleted_and_recreated(stream: Stream) -> None:
    """While the results topic is gone every verdict publish fails, and the transactions are
    redelivered until it is back."""
    stream.send(10)
    stream.collect()
    stream.publisher.delete_topic(topic=topic_path(stream.results))
    stream.send(10)
    wait_for(lambda: len(stream.failed("Topic not found")) == 10, "each failing to publish")
    # The test's subscription on the new topic must exist before the function can publish a
    # verdict there, or that verdict is not delivered to it: the function is paused meanwhile.
    assert stream.function is not None
    os.killpg(stream.function.popen.pid, signal.SIGSTOP)
    try:
        create_topic(stream.publisher, stream.results)
        stream.watch = stream.subscribe(stream.results)
    finally:
        os.killpg(stream.function.popen.pid, signal.SIGCONT)
    stream.check("the results topic deleted and re-created")


def test_emulator_restarted(redis_url: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulator is stopped and started again on its port, empty: once the topics and
    subscriptions are re-created, the function publishes the verdicts of new transactions
    through the client it already had."""
    port = services.free_port()
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{port}")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    stream = Stream(workdir, redis_url)
    before, after = workdir / "emulator-before", workdir / "emulator-after"
    before.mkdir()
    after.mkdir()
    try:
        with services.pubsub_emulator(before, port):
            stream.create()
            stream.start_function()
            stream.send(10)
            stream.collect()
            stream.count_dead_letters()
        with services.pubsub_emulator(after, port):
            stream.create()
            stream.send(10)
            stream.check("the emulator restarted")
    finally:
        if stream.function is not None:
            stream.function.stop()
