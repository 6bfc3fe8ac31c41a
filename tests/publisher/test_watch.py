"""The watcher against the emulator: live figures while verdicts come, then the final report."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import orjson
import pytest
from google.cloud import pubsub_v1

from publisher.labels import label_json
from stack import services

pytestmark = pytest.mark.integration

UTC = dt.UTC


def _verdict_topic(prefix: str) -> tuple[str, str]:
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path("fraud-test", services.unique(prefix))
    publisher.create_topic(name=topic)
    subscription = services.unique(prefix + "-sub")
    subscriber.create_subscription(
        name=subscriber.subscription_path("fraud-test", subscription), topic=topic
    )
    return topic, subscription


def _watch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "publisher", "watch", *args],
        cwd=services.ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _decision(i: int) -> str:
    return "block" if i % 20 == 0 else "review" if i % 10 == 0 else "allow"


def _publish_verdicts(topic: str, numbers: Iterable[int]) -> None:
    """Verdict-shaped messages as detect_fraud publishes them, input published 2 s earlier.

    Transaction i: decision block every 20th, review every other 10th, else allow; amount
    i + 0.5; rule "every-tenth" (action review) fires on block and review, "seventh" (no
    action given) on every 7th.
    """
    publisher = pubsub_v1.PublisherClient()
    source = (dt.datetime.now(UTC) - dt.timedelta(seconds=2)).isoformat().replace("+00:00", "Z")
    futures = []
    for i in numbers:
        decision = _decision(i)
        reasons = [{"rule": "every-tenth", "action": "review"}] if i % 10 == 0 else []
        reasons += [{"rule": "seventh"}] if i % 7 == 0 else []
        body = orjson.dumps(
            {"transaction_id": f"t{i}", "amount": i + 0.5, "decision": decision, "reasons": reasons}
        )
        futures.append(
            publisher.publish(
                topic,
                body,
                transaction_id=f"t{i}",
                decision=decision,
                is_fraud=str(decision == "block").lower(),
                source_publish_time=source,
            )
        )
    for future in futures:
        future.result(timeout=30)


def _labels(path: Path, count: int) -> Path:
    """Every 10th transaction is fraud, of scenario 1 if it is an even ten, else 2; also t5."""
    lines = []
    for i in range(count):
        fraud = i % 10 == 0 or i == 5
        scenario = (1 if i % 20 == 0 else 2) if fraud else None
        lines.append(label_json(f"t{i}", fraud, scenario) + b"\n")
    path.write_bytes(b"".join(lines))
    return path


def test_watch_reports_verdicts_from_a_subscription(
    pubsub_env: dict[str, str], tmp_path: Path
) -> None:
    """Verdicts give decisions, delays, accuracy for block and flagged, scenarios and rules."""
    topic, subscription = _verdict_topic("verdicts")
    labels = _labels(tmp_path / "labels.jsonl", 120)
    _publish_verdicts(topic, range(120))
    result = _watch(
        "--subscription", subscription, "--labels", str(labels), "--count", "120", "--json",
        env=pubsub_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert report["verdicts"] == 120 and report["stopped_by"] == "count"
    assert report["decisions"] == {"allow": 108, "review": 6, "block": 6}
    assert 2000 <= report["delay_ms"]["p50"] <= report["delay_ms"]["p99"] < 30_000
    # 13 frauds: the 12 tens (6 blocked, 6 reviewed) and t5 (allowed).
    assert report["confusion"]["block"] == {"tp": 6, "fp": 0, "fn": 7, "tn": 107}
    assert report["confusion"]["flagged"] == {"tp": 12, "fp": 0, "fn": 1, "tn": 107}
    assert (report["precision_block"], report["recall_block"]) == (1.0, 0.4615)
    assert (report["precision_flagged"], report["recall_flagged"]) == (1.0, 0.9231)
    assert report["by_scenario"]["1"]["frauds"] == report["by_scenario"]["1"]["blocked"] == 6
    assert report["by_scenario"]["2"] | {"name": ""} == {
        "name": "",
        "frauds": 7,
        "caught": 6,
        "blocked": 0,
        "missed": 1,
        "amount": 368.5,  # 10.5 + 30.5 + ... + 110.5, and 5.5
        "amount_stopped": 0.0,
        "amount_missed": 5.5,
    }
    assert (report["amount_stopped"], report["amount_missed"]) == (303.0, 5.5)
    assert report["top_rules"] == [
        {
            "rule": "seventh",
            "action": None,
            "shadow": False,
            "fired": 18,
            "labelled": 18,
            "frauds": 2,
            "precision": 0.1111,
        },
        {
            "rule": "every-tenth",
            "action": "review",
            "shadow": False,
            "fired": 12,
            "labelled": 12,
            "frauds": 12,
            "precision": 1.0,
        },
    ]


def test_watch_prints_live_lines_when_not_on_a_terminal(
    pubsub_env: dict[str, str], tmp_path: Path
) -> None:
    """Piped, the watcher prints plain lines of live figures, then the text report."""
    topic, subscription = _verdict_topic("live")
    labels = _labels(tmp_path / "labels.jsonl", 100)
    _publish_verdicts(topic, range(50))
    watcher = subprocess.Popen(
        [
            sys.executable, "-m", "publisher", "watch", "--subscription", subscription,
            "--labels", str(labels), "--count", "100", "--interval", "0.5",
        ],
        cwd=services.ROOT, env={**os.environ, **pubsub_env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(3)  # the watcher starts, receives the first half and reports it
    _publish_verdicts(topic, range(50, 100))
    stdout, stderr = watcher.communicate(timeout=120)
    assert watcher.returncode == 0, stderr
    live = [line for line in stdout.splitlines() if line.startswith("watch: ")]
    assert any(line.startswith("watch: 50 verdicts") for line in live), stdout
    assert live[-1].startswith("watch: 100 verdicts"), stdout
    assert "allow 90, review 5, block 5; lag p50 " in live[-1]
    assert "frauds caught 10 of 11 (blocked 5)" in live[-1]
    assert "flagged precision 1.000 recall 0.909; block precision 1.000 recall 0.455" in live[-1]
    report = stdout[stdout.index("verdicts: 100 in") :]
    assert "decisions: allow 90, review 5, block 5" in report
    assert "2 compromised terminal" in report and "every-tenth" in report
    assert "\x1b[" not in stdout  # no terminal control codes in a pipe


def test_watch_fails_when_nothing_arrives(pubsub_env: dict[str, str]) -> None:
    """An idle subscription ends with a report and a one-line error, exit 1."""
    _, subscription = _verdict_topic("quiet")
    result = _watch("--subscription", subscription, "--idle-timeout", "1", env=pubsub_env)
    assert result.returncode == 1
    assert "verdicts: 0" in result.stdout
    assert result.stderr.strip() == f"error: no verdict arrived on {subscription} within 1 s"
