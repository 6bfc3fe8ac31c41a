"""Replay on several processes: the same verdicts and summary as one process, or a fallback."""

from __future__ import annotations

import datetime as dt
import os
import random
from pathlib import Path

import orjson
import pytest

from detector.cli import main as cli
from detector.engine import Detector
from detector.errors import InputError, MessageError
from detector.model import FORMAT, parse_model
from detector.offline import parallel
from detector.offline.labels import read_labels
from detector.offline.parallel import plan, replay_file
from detector.offline.replay import Outcome, replay, summary
from detector.rules import load_ruleset
from detector.state import MemoryStore, StateConfig, feature_names
from detector.transaction import decode
from detector.vocabulary import HOUR, variable_schema
from publisher.simulate import SimulationConfig, records

DAY = 86400.0
WINDOWS = (HOUR, 6 * HOUR, 1 * 86400)
LATENESS = 600.0

RULES = """\
version: "test-parallel"
rules:
  - id: card-velocity-1h
    description: "{by_card.count_1h} on this card in 1 h"
    condition: by_card.count_1h >= 2
    action: review
  - id: terminal-fraud
    description: "{by_terminal.fraud_count_1d} frauds at this terminal in 1 d"
    condition: by_terminal.fraud_count_1d >= 1
    action: review
  - id: quick-repeat
    description: "{by_customer.seconds_since_last} s since the last one"
    condition: has(by_customer.seconds_since_last) && by_customer.seconds_since_last < 120
    action: review
  - id: spike
    description: "amount {by_customer.amount_ratio_6h} times the 6-hour mean"
    condition: has(by_customer.amount_ratio_6h) && by_customer.amount_ratio_6h > 3
    action: review
  - id: model
    description: "score {score}"
    condition: score > 0.5
    action: block
"""

# Reads a 1-day fraud share and a 6-hour count, so scores move with labels and history.
MODEL = {
    "format": FORMAT,
    "version": "test-parallel",
    "features": ["amount", "by_terminal.fraud_share_1d", "by_customer.count_6h"],
    "missing": -1.0,
    "trees": [
        {
            "feature": [1, 0, -1, -1, -1],
            "threshold": [0.0, 150.0, 0.0, 0.0, 0.0],
            "left": [1, 2, -1, -1, -1],
            "right": [4, 3, -1, -1, -1],
            "value": [-2.0, -2.5, -3.0, -1.0, 1.0],
        },
        {
            "feature": [2, -1, -1],
            "threshold": [3.0, 0.0, 0.0],
            "left": [1, -1, -1],
            "right": [2, -1, -1],
            "value": [0.0, -0.2, 0.7],
        },
    ],
}


def detector(folder: Path) -> Detector:
    """A detector whose state keeps about a day, so that shards of a 12-day stream warm up."""
    config = StateConfig(windows=WINDOWS, allowed_lateness=LATENESS)
    rules_file = folder / "rules.yaml"
    rules_file.write_text(RULES)
    schema = variable_schema(
        {
            entity: feature_names(config.windows, entity)
            for entity in ("customer", "card", "terminal", "merchant")
        }
    )
    return Detector(
        load_ruleset(rules_file, schema), MemoryStore(config), parse_model(orjson.dumps(MODEL))
    )


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[bytes], dict[str, bool]]:
    """12 days of a small simulation, roughened: redeliveries, lines a few minutes late,
    lines without id or timestamp, invalid lines."""
    config = SimulationConfig(
        customers=150,
        terminals=300,
        days=12,
        start=dt.date(2018, 7, 1),
        terminals_compromised_per_day=1.0,
        customers_compromised_per_day=1.0,
    )
    lines: list[bytes] = []
    labels: dict[str, bool] = {}
    for record in records(config):
        lines.append(record.data)
        label = orjson.loads(record.label_json())
        labels[label["transaction_id"]] = label["is_fraud"]
    rng = random.Random(7)
    rough: list[bytes] = []
    for number, line in enumerate(lines):
        rough.append(line)
        roll = rng.random()
        if roll < 0.02:
            rough.append(line)  # a redelivery
        elif roll < 0.03 and number > 2 and seconds(lines[number - 2], line) < LATENESS:
            rough.append(lines[number - 2])  # a redelivery a little later
        elif roll < 0.035:
            item = orjson.loads(line)
            del item["transaction_id"]
            rough.append(orjson.dumps(item))
        elif roll < 0.04:
            item = orjson.loads(line)
            del item["timestamp"]
            item["transaction_id"] += "-untimed"
            rough.append(orjson.dumps(item))
        elif roll < 0.042:
            rough.append(b'{"amount": "lots"}')
    # Neighbours less than the lateness apart swapped: out of order, and still recorded.
    swapped = 0
    for number in rng.sample(range(1, len(rough) - 1), 400):
        pair = [orjson.loads(rough[number]), orjson.loads(rough[number + 1])]
        timed = all(isinstance(item, dict) and "timestamp" in item for item in pair)
        if timed and 0 < abs(seconds(rough[number], rough[number + 1])) < LATENESS:
            rough[number], rough[number + 1] = rough[number + 1], rough[number]
            swapped += 1
    assert len(rough) > 3000 and swapped > 10
    return rough, labels


def seconds(earlier: bytes, later: bytes) -> float:
    """Event time between two lines."""
    first, second = orjson.loads(earlier), orjson.loads(later)
    return (
        dt.datetime.fromisoformat(second["timestamp"])
        - dt.datetime.fromisoformat(first["timestamp"])
    ).total_seconds()


def sequential(folder: Path, lines: list[bytes], labels: dict[str, bool], **options: object):
    out: list[bytes] = []
    outcome = replay(detector(folder), lines, out.append, labels=labels, **options)  # type: ignore[arg-type]
    return b"".join(out), outcome


def written(folder: Path, lines: list[bytes]) -> Path:
    """The lines as a JSON-lines file."""
    path = folder / "tx.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def without_timing(outcome: Outcome) -> str:
    return summary(outcome).split("\n", 1)[1]


def test_recording_without_features_keeps_what_later_features_read(
    stream: tuple[list[bytes], dict[str, bool]], tmp_path: Path
) -> None:
    """A warm-up records with `Detector.record` (no features computed): afterwards the store
    gives every later transaction the features of a store that computed them all along."""
    lines, _ = stream
    rows = []
    for line in lines:
        try:
            _, transaction = decode(line)
        except MessageError:
            continue
        if transaction.timestamp is not None and transaction.transaction_id is not None:
            rows.append((transaction, transaction.transaction_id, transaction.timestamp))
    recorded, computed = detector(tmp_path), detector(tmp_path)
    half = len(rows) // 2
    for transaction, tid, moment in rows[:half]:
        recorded.record(transaction, tid, moment)
        computed.activation(transaction, tid, moment)
    for transaction, tid, moment in rows[half:]:
        assert recorded.activation(transaction, tid, moment) == computed.activation(
            transaction, tid, moment
        )


@pytest.mark.parametrize("workers", [2, 3])
def test_shards_give_the_verdicts_and_summary_of_one_process(
    stream: tuple[list[bytes], dict[str, bool]], tmp_path: Path, workers: int
) -> None:
    lines, labels = stream
    path = written(tmp_path, lines)
    expected, alone = sequential(tmp_path, lines, labels, label_delay=DAY / 2)

    shards = plan(path, workers, DAY + 2 * LATENESS)
    assert len(shards) == workers
    assert all(s.warm_from > 0 and s.warm_from < s.start for s in shards[1:])  # real warm-ups

    output = tmp_path / "verdicts.jsonl"
    outcome, problems = replay_file(
        detector(tmp_path), path, output, workers, labels=labels, label_delay=DAY / 2
    )
    assert problems == []
    assert outcome.workers == workers
    assert output.read_bytes() == expected
    assert without_timing(outcome) == without_timing(alone)
    assert outcome.out_of_order == alone.out_of_order > 0
    assert outcome.untimed == alone.untimed > 0
    assert outcome.invalid == alone.invalid > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rules.yaml",
        "tx.jsonl",
        "verdicts.jsonl",
    ]


def test_a_stop_time_inside_a_shard_stops_where_one_process_stops(
    stream: tuple[list[bytes], dict[str, bool]], tmp_path: Path
) -> None:
    lines, labels = stream
    path = written(tmp_path, lines)
    until = dt.datetime(2018, 7, 6, 13, tzinfo=dt.UTC)  # inside the second of three shards
    expected, alone = sequential(tmp_path, lines, labels, label_delay=DAY, until=until)
    output = tmp_path / "verdicts.jsonl"
    outcome, problems = replay_file(
        detector(tmp_path), path, output, 3, labels=labels, label_delay=DAY, until=until
    )
    assert problems == []
    assert output.read_bytes() == expected
    assert without_timing(outcome) == without_timing(alone)


def test_a_line_far_behind_in_a_later_shard_falls_back_to_one_process(
    stream: tuple[list[bytes], dict[str, bool]], tmp_path: Path
) -> None:
    """Scored against leftovers that depend on when each process forgot: not exact, so the
    file is replayed in one process and the reason given."""
    lines, labels = stream
    late = orjson.loads(lines[100])
    late["transaction_id"] = "very-late"
    lines = [*lines[:-50], orjson.dumps(late), *lines[-50:]]
    path = written(tmp_path, lines)
    expected, alone = sequential(tmp_path, lines, labels)
    output = tmp_path / "verdicts.jsonl"
    outcome, problems = replay_file(detector(tmp_path), path, output, 2, labels=labels)
    assert problems == ["shard 2: 1 line(s) more than the allowed lateness behind the stream"]
    assert outcome.workers == 1
    assert output.read_bytes() == expected
    assert without_timing(outcome) == without_timing(alone)


@pytest.mark.parametrize("workers", [2, 3])
def test_a_line_far_ahead_before_a_warm_up_falls_back_to_one_process(
    stream: tuple[list[bytes], dict[str, bool]], tmp_path: Path, workers: int
) -> None:
    """A timestamp days ahead moves the watermark of one process but not of a later shard."""
    lines, labels = stream
    ahead = orjson.loads(lines[200])
    ahead["transaction_id"] = "from-the-future"
    ahead["timestamp"] = "2018-07-11T00:00:00Z"
    lines = [*lines[:200], orjson.dumps(ahead), *lines[200:]]
    path = written(tmp_path, lines)
    expected, _ = sequential(tmp_path, lines, labels)
    output = tmp_path / "verdicts.jsonl"
    _, problems = replay_file(detector(tmp_path), path, output, workers, labels=labels)
    assert problems and "before its warm-up" in problems[0]
    assert output.read_bytes() == expected


class Exploding(dict[str, bool]):
    """Labels whose lookup fails for one transaction: a shard that crashes."""

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        if key == "t000001000":
            raise RuntimeError("boom")
        return super().get(key, default)


def test_a_failing_shard_fails_the_replay_and_leaves_no_part_files(
    stream: tuple[list[bytes], dict[str, bool]], tmp_path: Path
) -> None:
    lines, labels = stream
    path = written(tmp_path, lines)
    output = tmp_path / "out" / "verdicts.jsonl"
    output.parent.mkdir()
    with pytest.raises(InputError, match=r"(?s)a replay shard failed:.*RuntimeError: boom"):
        replay_file(detector(tmp_path), path, output, 3, labels=Exploding(labels))
    assert list(output.parent.iterdir()) == []


def test_cli_replays_on_the_processes_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = SimulationConfig(customers=30, terminals=200, days=3, start=dt.date(2018, 7, 1))
    path, labels = tmp_path / "tx.jsonl", tmp_path / "labels.jsonl"
    with path.open("wb") as tx_out, labels.open("wb") as label_out:
        for record in records(config):
            tx_out.write(record.data + b"\n")
            label_out.write(record.label_json() + b"\n")
    results = {}
    for workers in ("1", "2"):
        output = tmp_path / f"v{workers}.jsonl"
        code = cli(
            ["replay", "--input", str(path), "--output", str(output), "--labels", str(labels),
             "--label-delay", "1d", "--workers", workers]
        )  # fmt: skip
        assert code == 0
        results[workers] = (output.read_bytes(), capsys.readouterr().out)
    assert results["1"][0] == results["2"][0]
    assert "2 processes" in results["2"][1]
    # 3 days are shorter than the 30-day state: the second shard warms up from the start.
    assert results["1"][1].split("\n", 1)[1] == results["2"][1].split("\n", 1)[1]
    assert len(read_labels(labels)) > 0


def test_cli_rejects_a_bad_worker_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli(["replay", "--input", str(tmp_path / "x"), "--workers", "0"])
    assert "expected a positive integer or 'auto', got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("kernel", ["works", "refuses", "fails midway"])
def test_parts_are_appended_whole_whether_or_not_the_kernel_copies(
    kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = os.copy_file_range

    def flaky(source: int, target: int, count: int) -> int:
        if kernel == "refuses":
            raise OSError(18, "Invalid cross-device link")
        copy(source, target, 5)  # part of it, then a failure
        raise OSError(5, "Input/output error")

    if kernel != "works":
        monkeypatch.setattr(os, "copy_file_range", flaky)
    part = tmp_path / "part"
    part.write_bytes(b"second part\n" * 1000)
    output = tmp_path / "out"
    output.write_bytes(b"first\n")
    with output.open("r+b") as out:
        out.seek(0, os.SEEK_END)
        parallel._append(part, out)
        out.write(b"last\n")
    assert output.read_bytes() == b"first\n" + b"second part\n" * 1000 + b"last\n"
