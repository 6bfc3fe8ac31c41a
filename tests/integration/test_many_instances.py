"""Many instances, one state: two gunicorn workers of detect_fraud and record_feedback on one
redis-server decide a stream as the backtest does, labels included."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from google.cloud import pubsub_v1

from detector.cli import main as cli
from stack import services
from tests.helpers.pubsub import PROJECT, create_subscription, create_topic, pull, topic_path

pytestmark = pytest.mark.integration

START = datetime(2024, 5, 1, tzinfo=UTC)
LABEL_DELAY = timedelta(hours=6)

RULES = """
version: "many-instances"
rules:
  - id: terminal-reported
    description: "{by_terminal.fraud_count_30d} reported frauds at this terminal"
    condition: by_terminal.fraud_count_30d >= 1
    action: review
  - id: card-velocity
    description: "{by_card.count_1h} earlier transactions on this card in 1 h"
    condition: by_card.count_1h >= 2
    action: review
  - id: large
    description: "{amount} over 400"
    condition: amount > 400
    action: block
"""


def stream(run: str, count: int) -> tuple[list[dict[str, object]], dict[str, bool]]:
    """Transactions 20 minutes apart over 4 customers, 3 cards and 5 terminals, with labels:
    every transaction at terminal 0 after the first hour is fraud."""
    transactions, labels = [], {}
    for n in range(count):
        terminal = f"{run}-t{(n * 7) % 5}"
        tx = {
            "transaction_id": f"{run}-{n}",
            "amount": float((n * 131) % 500 + 5),
            "customer_id": f"{run}-c{n % 4}",
            "card_id": f"{run}-k{n % 3}",
            "terminal_id": terminal,
            "timestamp": (START + timedelta(minutes=20 * n)).isoformat().replace("+00:00", "Z"),
        }
        transactions.append(tx)
        labels[str(tx["transaction_id"])] = terminal.endswith("-t0") and n > 3
    return transactions, labels


def workers_of(url: str) -> list[int]:
    """Process ids of the children of the functions-framework serving `url` (its port)."""
    port = url.rsplit(":", 1)[1]
    procs = [p for p in Path("/proc").iterdir() if p.name.isdigit()]
    masters = set()
    for proc in procs:
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"--port" in args
            and port.encode() in args
            and b"functions-framework" in b" ".join(args)
        ):
            masters.add(proc.name)
    children = []
    for proc in procs:
        try:
            parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue
        if parent in masters:
            children.append(int(proc.name))
    return children


def essence(verdict: dict[str, object]) -> tuple[object, ...]:
    """What must not depend on where a transaction was decided."""
    reasons = verdict["reasons"]
    assert isinstance(reasons, list)
    return (
        verdict["transaction_id"],
        verdict["decision"],
        verdict["score"],
        [(r["rule"], r["values"]) for r in reasons],
    )


def test_two_workers_and_the_feedback_function_decide_as_the_backtest(
    pubsub_env: dict[str, str], redis_url: str, workdir: Path
) -> None:
    """Published one at a time, each label just before the first transaction at or after its
    transaction's time plus the delay (as the backtest injects it), the stream gets from
    two processes sharing Redis the verdicts `python -m detector replay` gives it."""
    run = services.unique("many")
    transactions, labels = stream(run, 60)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    tx, results, dead, feedback = (services.unique(n) for n in ("tx", "res", "dead", "fb"))
    for name in (tx, results, dead, feedback):
        create_topic(publisher, name)
    watch = create_subscription(subscriber, services.unique("watch"), results)
    rules = workdir / "rules.yaml"
    rules.write_text(RULES)
    env = {
        **pubsub_env,
        # A database of its own: the store's event-time watermark is global to a database,
        # and this stream's would make other tests' older transactions late.
        "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/7",
        "RESULTS_TOPIC": results,
        "DEAD_LETTER_TOPIC": dead,
        "RULES_FILE": str(rules),
    }
    live: list[dict[str, object]] = []
    with (
        services.function_server(
            "detect_fraud", "cloudevent", {**env, "WORKERS": "2"}, workdir
        ) as detect,
        services.function_server("record_feedback", "cloudevent", env, workdir) as record,
    ):
        for topic, url in ((tx, detect), (feedback, record)):
            create_subscription(
                subscriber,
                services.unique("push"),
                topic,
                push_endpoint=f"{url}/projects/{PROJECT}/topics/{topic}",
            )
        assert len(workers_of(detect)) == 2  # gunicorn forked two processes to decide
        pending = [t for t in transactions if labels[str(t["transaction_id"])]]
        record_log = next(workdir.glob("record_feedback-*.log"))
        applied = 0
        for item in transactions:
            moment = datetime.fromisoformat(str(item["timestamp"]))
            while (
                pending
                and datetime.fromisoformat(str(pending[0]["timestamp"])) + (LABEL_DELAY) <= moment
            ):
                label = {"transaction_id": pending.pop(0)["transaction_id"], "is_fraud": True}
                publisher.publish(topic_path(feedback), orjson.dumps(label)).result(30)
                applied += 1
                deadline = time.monotonic() + 30
                while record_log.read_text().count('"outcome":"applied"') < applied:
                    assert time.monotonic() < deadline, "a label was not applied in 30 s"
                    time.sleep(0.05)
            publisher.publish(topic_path(tx), orjson.dumps(item)).result(30)
            [verdict] = pull(subscriber, watch, 1)
            live.append(orjson.loads(verdict.data))
    stream_file, labels_file = workdir / "tx.jsonl", workdir / "labels.jsonl"
    stream_file.write_bytes(b"".join(orjson.dumps(t) + b"\n" for t in transactions))
    labels_file.write_bytes(
        b"".join(
            orjson.dumps({"transaction_id": tid, "is_fraud": True}) + b"\n"
            for tid, fraud in labels.items()
            if fraud
        )
    )
    out = workdir / "replayed.jsonl"
    argv = ["replay", "--input", str(stream_file), "--output", str(out), "--rules", str(rules)]
    argv += ["--labels", str(labels_file), "--label-delay", "6h", "--workers", "1"]
    assert cli(argv) == 0
    replayed = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [essence(v) for v in live] == [essence(v) for v in replayed]
    decisions = {str(v["decision"]) for v in live}
    assert {"review", "block"} <= decisions  # velocity, reported frauds and amounts all fired
    assert any(r["rule"] == "terminal-reported" for v in live for r in v["reasons"])  # type: ignore[attr-defined]
    assert applied >= 3 and not pending[:0]  # labels reached the detector and changed verdicts
