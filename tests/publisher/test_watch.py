"""The watcher: counts by decision, end-to-end delay, and accuracy against labels."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from google.cloud import pubsub_v1
from hypothesis import given
from hypothesis import strategies as st

from publisher.errors import InputError
from publisher.watch import Tally, Verdict, format_report, load_labels, parse_time, parse_verdict
from stack import services

UTC = dt.UTC
PUBLISHED = dt.datetime(2026, 1, 2, 3, 4, 5, 500_000, tzinfo=UTC)


def test_verdict_from_attributes() -> None:
    """Decision, id and delay come from the attributes when present."""
    verdict = parse_verdict(
        b"not even json",
        {
            "decision": "block",
            "transaction_id": "t1",
            "source_publish_time": "2026-01-02T03:04:05.250Z",
        },
        PUBLISHED,
    )
    assert verdict == Verdict("t1", "block", pytest.approx(0.25))


def test_verdict_from_body_when_attributes_lack_it() -> None:
    """Without attributes the body's decision and transaction_id are used; no delay."""
    verdict = parse_verdict(b'{"transaction_id":"t2","decision":"review"}', {}, PUBLISHED)
    assert verdict == Verdict("t2", "review", None)


def test_verdict_without_decision_is_unknown() -> None:
    """A message with no decision anywhere is counted as unknown, not dropped."""
    assert parse_verdict(b"[]", {}, None).decision == "unknown"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-02T03:04:05Z", dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T03:04:05.123456789Z", dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)),
        ("2026-01-02T03:04:05.1+00:00", dt.datetime(2026, 1, 2, 3, 4, 5, 100000, tzinfo=UTC)),
    ],
)
def test_rfc3339_times_parse(text: str, expected: dt.datetime) -> None:
    """Publish times with 0 to 9 fraction digits and Z or an offset parse exactly (to us)."""
    assert parse_time(text) == expected


def test_time_without_zone_is_refused() -> None:
    """A naive time cannot be compared with a publish time."""
    with pytest.raises(ValueError, match="no zone"):
        parse_time("2026-01-02T03:04:05")


def test_tally_counts_redeliveries_once() -> None:
    """A verdict for an already-counted transaction is a duplicate."""
    tally = Tally()
    assert tally.add(Verdict("t1", "allow", 0.1))
    assert not tally.add(Verdict("t1", "allow", 0.2))
    assert (tally.total, tally.duplicates, tally.delays) == (1, 1, [0.1])


def test_confusion_matrix_precision_and_recall() -> None:
    """Block is predicted fraud; review is counted separately by truth."""
    tally = Tally()
    decisions = {
        "a": "block",
        "b": "block",
        "c": "allow",
        "d": "review",
        "e": "allow",
        "f": "allow",
    }
    for tid, decision in decisions.items():
        tally.add(Verdict(tid, decision, None))
    truth = {"a": True, "b": False, "c": True, "d": True, "e": False}
    quality = tally.report(truth, "count", 1.0)["labels"]
    assert quality["confusion"] == {"tp": 1, "fp": 1, "fn": 2, "tn": 1}
    assert (quality["precision"], quality["recall"]) == (0.5, pytest.approx(1 / 3, abs=1e-4))
    assert quality["review"] == {"fraud": 1, "genuine": 0}
    assert (quality["labelled"], quality["unlabelled"]) == (5, 1)


@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=200))
def test_delay_percentiles_are_ordered_observations(delays: list[float]) -> None:
    """p50 <= p95 <= p99 <= max, each one of the observed delays."""
    tally = Tally()
    for i, delay in enumerate(delays):
        tally.add(Verdict(f"t{i}", "allow", delay))
    report = tally.delay_ms()
    assert report["p50"] <= report["p95"] <= report["p99"] <= report["max"]  # type: ignore[operator]
    assert report["max"] == round(max(delays) * 1000, 1)


def test_text_report_shows_the_numbers() -> None:
    """The human report has counts, percentiles and the matrix."""
    tally = Tally()
    tally.add(Verdict("a", "block", 0.010))
    tally.add(Verdict("b", "allow", 0.030))
    text = format_report(tally.report({"a": True, "b": True}, "idle", 2.0))
    assert "decisions: allow 1, review 0, block 1" in text
    assert "p50 10.0" in text and "p99 30.0" in text
    assert "precision 1.000, recall 0.500" in text


def test_labels_file_errors_name_the_line(tmp_path: Path) -> None:
    """A labels file with a bad line is refused with its number."""
    path = tmp_path / "labels.jsonl"
    path.write_text('{"transaction_id":"t1","is_fraud":false}\n{oops\n')
    with pytest.raises(InputError, match=rf"--labels: {path}:2: not JSON"):
        load_labels(path)
    with pytest.raises(InputError, match="cannot read"):
        load_labels(tmp_path / "missing.jsonl")


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


@pytest.mark.integration
def test_watch_reports_verdicts_from_a_subscription(
    pubsub_env: dict[str, str], tmp_path: Path
) -> None:
    """Verdict-shaped messages give counts, delays and a confusion matrix in --json."""
    topic, subscription = _verdict_topic("verdicts")
    labels = tmp_path / "labels.jsonl"
    labels.write_bytes(
        b"".join(
            b'{"transaction_id":"t%d","is_fraud":%s,"scenario":null}\n'
            % (i, b"true" if i % 10 == 0 else b"false")
            for i in range(120)
        )
    )
    publisher = pubsub_v1.PublisherClient()
    source = (dt.datetime.now(UTC) - dt.timedelta(seconds=2)).isoformat().replace("+00:00", "Z")
    futures = []
    for i in range(120):
        decision = "block" if i % 20 == 0 else "review" if i % 10 == 0 else "allow"
        body = orjson.dumps({"transaction_id": f"t{i}", "decision": decision})
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
    result = _watch(
        "--subscription", subscription, "--labels", str(labels), "--count", "120", "--json",
        env=pubsub_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert report["verdicts"] == 120 and report["stopped_by"] == "count"
    assert report["decisions"] == {"allow": 108, "review": 6, "block": 6}
    assert 2000 <= report["delay_ms"]["p50"] < 30_000  # publish time - a source 2 s earlier
    assert report["labels"]["confusion"] == {"tp": 6, "fp": 0, "fn": 6, "tn": 108}
    assert report["labels"]["review"] == {"fraud": 6, "genuine": 0}
    assert (report["labels"]["precision"], report["labels"]["recall"]) == (1.0, 0.5)


@pytest.mark.integration
def test_watch_fails_when_nothing_arrives(pubsub_env: dict[str, str]) -> None:
    """An idle subscription ends with a report and a one-line error, exit 1."""
    _, subscription = _verdict_topic("quiet")
    result = _watch("--subscription", subscription, "--idle-timeout", "1", env=pubsub_env)
    assert result.returncode == 1
    assert "verdicts: 0" in result.stdout
    assert result.stderr.strip() == f"error: no verdict arrived on {subscription} within 1 s"
