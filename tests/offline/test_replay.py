"""Offline replay: label timing, summary, CLI, and the same scores as the live functions."""

from __future__ import annotations

import base64
import datetime as dt
import heapq
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.cli import main as cli
from detector.config import DetectorConfig
from detector.errors import ConfigError, InputError
from detector.functions import build_service
from detector.functions.settings import Settings
from detector.functions.sinks import MemoryVerdictSink
from detector.offline.commands import offline_detector
from detector.offline.labels import KnownLabel, Timed, merge_labels, read_labels
from detector.offline.replay import Replayer, replay, summary
from detector.offline.train import Params, train
from detector.vocabulary import parse_duration
from tests.helpers.simulate import simulate

DAY = 86400.0


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return simulate(tmp_path_factory.mktemp("replay"))


@pytest.fixture(scope="module")
def model_path(stream: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    transactions, labels = stream
    with transactions.open("rb") as lines:
        model = train(
            lines,
            read_labels(labels),
            until=dt.datetime(2018, 7, 15, tzinfo=dt.UTC),
            label_delay=2 * DAY,
            version="test-replay",
            params=Params(trees=10, leaves=4, max_depth=3, min_child_samples=5),
        )
    path = tmp_path_factory.mktemp("model") / "model.json"
    path.write_bytes(model.to_json())
    return path


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 7 * DAY), ("12h", 43200.0), ("15m", 900.0), ("90s", 90.0), ("0", 0.0)],
)
def test_label_delays_are_read_with_units(text: str, seconds: float) -> None:
    """Delays are written like the publisher's: a number and d, h, m or s."""
    assert parse_duration(text) == seconds


def test_a_bad_delay_names_the_option() -> None:
    """An unreadable delay is a one-line error naming --label-delay."""
    with pytest.raises(ConfigError, match="--label-delay: expected a number and one of d, h, m, s"):
        parse_duration("7w", setting="--label-delay")


def test_labels_arrive_before_the_first_transaction_at_or_after_their_time() -> None:
    """A label known at t + delay is injected just before the first transaction at >= that time."""
    items = [
        Timed(0.0, "a", None),
        Timed(5.0, "b", None),
        Timed(10.0, "c", None),
        Timed(11.0, "d", None),
    ]
    merged = list(merge_labels(items, {"a": True, "b": False}, delay=10.0))
    order = [
        i.transaction_id if isinstance(i, Timed) else f"label:{i.transaction_id}" for i in merged
    ]
    # a's label is known at 10.0: before c (at 10.0 exactly); b's at 15.0: never in the stream.
    assert order == ["a", "b", "label:a", "c", "d"]
    label = merged[2]
    assert isinstance(label, KnownLabel) and label.known_at == 10.0 and label.is_fraud


def test_labels_file_errors_name_the_line(tmp_path: Path) -> None:
    """A label line without is_fraud is reported with its file and line number."""
    path = tmp_path / "labels.jsonl"
    path.write_bytes(b'{"transaction_id": "t1", "is_fraud": true}\n{"transaction_id": "t2"}\n')
    with pytest.raises(InputError, match=r"labels.jsonl:2: a label needs"):
        read_labels(path)


def envelope(data: bytes, number: int) -> dict[str, object]:
    return {
        "message": {
            "data": base64.b64encode(data).decode(),
            "messageId": f"m-{number}",
            "publishTime": "2026-11-29T12:00:00Z",
        }
    }


def test_replay_gives_the_same_scores_as_the_live_functions(
    stream: tuple[Path, Path], model_path: Path
) -> None:
    """Feeding the same transactions and labels through the Pub/Sub function's service gives
    the same decision and score for every transaction as replay."""
    transactions, labels_path = stream
    labels = read_labels(labels_path)
    lines = transactions.read_bytes().splitlines()
    verdicts: list[dict[str, object]] = []
    detector = offline_detector(None, str(model_path))
    outcome = replay(
        detector,
        lines,
        lambda line: verdicts.append(orjson.loads(line)),
        labels=labels,
        label_delay=2 * DAY,
    )
    assert outcome.transactions == len(lines) > 800

    sink = MemoryVerdictSink()
    service = build_service(
        Settings(project="fraud-test", detector=DetectorConfig(model_path=str(model_path))), sink
    )
    live: dict[str, tuple[object, object]] = {}
    items = []
    for line in lines:
        parsed = orjson.loads(line)
        moment = dt.datetime.fromisoformat(parsed["timestamp"]).timestamp()
        items.append(Timed(moment, parsed["transaction_id"], line))
    for number, item in enumerate(merge_labels(items, labels, 2 * DAY)):
        if isinstance(item, KnownLabel):
            feedback = orjson.dumps(
                {"transaction_id": item.transaction_id, "is_fraud": item.is_fraud}
            )
            service.on_label(envelope(feedback, number))
            continue
        verdict = service.on_transaction(envelope(item.item, number))
        assert verdict is not None
        live[verdict.transaction_id] = (verdict.body["score"], verdict.decision)
    replayed = {v["transaction_id"]: (v["score"], v["decision"]) for v in verdicts}
    assert replayed == live
    scores = {score for score, _ in replayed.values()}
    assert len(scores) > 10  # the model really scored, not a constant


def test_replay_cli_writes_scored_verdicts_and_a_summary(
    stream: tuple[Path, Path], model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m detector replay` writes one verdict per transaction, stamped at its event
    time, and prints decisions, precision/recall and per-rule hits."""
    transactions, labels = stream
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        'version: "t"\nrules:\n'
        "  - id: big\n    description: big\n    condition: amount > 100\n    action: review\n"
        "  - id: model\n    description: model\n    condition: score > 0.5\n    action: block\n"
    )
    out = tmp_path / "verdicts.jsonl"
    status = cli(
        [
            "replay",
            "--input",
            str(transactions),
            "--output",
            str(out),
            "--labels",
            str(labels),
            "--label-delay",
            "2d",
            "--rules",
            str(rules),
            "--model",
            str(model_path),
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    verdicts = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(verdicts) == len(transactions.read_bytes().splitlines())
    first = verdicts[0]
    assert first["decided_at"] == first["timestamp"]
    assert first["model_version"] == "test-replay"
    assert 0 <= first["score"] <= 1
    assert "decisions: allow" in printed
    assert "review+block: precision" in printed
    assert "model score: AUC ROC" in printed
    hits = sum(1 for v in verdicts for r in v["reasons"] if r["rule"] == "big")
    assert f"  big: {hits:,} hits, precision" in printed


def test_replay_cli_reports_a_missing_input_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """User mistakes end as `error: ...` and exit status 2."""
    status = cli(["replay", "--input", str(tmp_path / "none.jsonl"), "--model", "none"])
    assert status == 2
    assert "error: --input: cannot read" in capsys.readouterr().err


def test_invalid_lines_are_counted_not_fatal(tmp_path: Path) -> None:
    """A line that would be dead-lettered is skipped and reported in the summary."""
    lines = [
        b'{"transaction_id": "a", "timestamp": "2018-07-01T00:00:00Z", "customer_id": "c", "amount": 5}',
        b'{"amount": -1, "customer_id": "c"}',
        b"not json",
        b'{"transaction_id": "b", "timestamp": "2018-07-01T00:01:00Z", "customer_id": "c", "amount": 7}',
    ]
    outcome = replay(offline_detector(None, "none"), lines)
    assert outcome.transactions == 2
    assert outcome.invalid == 2
    assert "2 invalid (skipped)" in summary(outcome)


def test_labels_too_late_to_count_are_counted_in_the_summary() -> None:
    """A label known after its transaction left every entity's retention counts nowhere: the
    summary says how many, beside those injected."""

    def line(txid: str, day: int) -> bytes:
        moment = dt.datetime(2018, 7, 1, tzinfo=dt.UTC) + dt.timedelta(days=day)
        return orjson.dumps(
            {
                "transaction_id": txid,
                "timestamp": moment.isoformat(),
                "customer_id": "c",
                "amount": 5,
            }
        )

    lines = [line("a", 0), line("b", 31), line("c", 40), line("d", 41)]
    labels = {"a": True, "b": False}
    outcome = replay(offline_detector(None, "none"), lines, labels=labels, label_delay=38 * DAY)
    assert (outcome.labels_injected, outcome.labels_unknown) == (1, 1)  # a's, at c's time
    assert "1 labels injected into the state, 1 of them too late to count" in summary(outcome)
    outcome = replay(offline_detector(None, "none"), lines, labels=labels, label_delay=DAY)
    assert (outcome.labels_injected, outcome.labels_unknown) == (2, 0)


def test_replay_output_is_deterministic_without_ids() -> None:
    """Transactions without id or timestamp get line-numbered ids and the previous event time."""
    lines = [
        b'{"timestamp": "2018-07-01T00:00:00Z", "customer_id": "c", "amount": 5}',
        b'{"customer_id": "c", "amount": 7}',
    ]
    runs = []
    for _ in range(2):
        out: list[bytes] = []
        replay(offline_detector(None, None), lines, out.append)
        runs.append(out)
    assert runs[0] == runs[1]
    second = orjson.loads(runs[0][1])
    assert second["transaction_id"] == "line-2"
    assert second["decided_at"] == "2018-07-01T00:00:00Z"


class _Recorder:
    def __init__(self) -> None:
        self.labels: list[tuple[str, bool]] = []

    def record_label(self, transaction_id: str, is_fraud: bool) -> None:
        self.labels.append((transaction_id, is_fraud))


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.tuples(st.integers(-30, 10), st.booleans()), max_size=60),
    delay=st.sampled_from([0.0, 5.0, 20.0]),
)
def test_labels_are_injected_in_the_order_they_become_known(
    steps: list[tuple[int, bool]], delay: float
) -> None:
    """Labels become known at event time + delay, ties in arrival order, whatever the order of
    the lines (out-of-order ones take the heap beside the queue): as one heap would give."""
    store = _Recorder()
    detector: Any = SimpleNamespace(store=store, record_label=store.record_label)
    replayer = Replayer(detector, label_delay=delay)
    heap: list[tuple[float, int, str, bool]] = []
    expected: list[tuple[str, bool]] = []
    clock = 0.0
    for n, (step, fraud) in enumerate(steps):
        when = clock + step  # a negative step: a line behind the latest
        clock = max(clock, when)
        replayer._inject(when)
        while heap and heap[0][0] <= when:
            _, _, tid, label = heapq.heappop(heap)
            expected.append((tid, label))
        assert store.labels == expected
        replayer._expect(when, f"t{n}", fraud)
        heapq.heappush(heap, (when + delay, n, f"t{n}", fraud))
    replayer._inject(float("inf"))
    expected += [(tid, label) for _, _, tid, label in sorted(heap)]
    assert store.labels == expected


@pytest.mark.parametrize("delay", [0.0, 90.0, 2 * DAY])
def test_batched_decisions_give_the_verdicts_of_one_by_one(
    stream: tuple[Path, Path], delay: float
) -> None:
    """Deciding up to 50 transactions with one state call (as replay on Redis does) gives
    the same verdicts, byte for byte, whatever the label delay: labels that become known
    are recorded among the batch's transactions, and a batch ends where a label of one of its
    own transactions could become known."""
    transactions, labels_path = stream
    labels = read_labels(labels_path)
    lines = transactions.read_bytes().splitlines()[:6000]
    runs = []
    for batch in (1, 7, 50):
        out: list[bytes] = []
        outcome = replay(
            offline_detector(None, None),
            lines,
            out.append,
            labels=labels,
            label_delay=delay,
            batch=batch,
        )
        runs.append((out, outcome.labels_injected))
    assert runs[1] == runs[0] and runs[2] == runs[0]
    assert runs[0][1] > 0


@pytest.mark.integration
@pytest.mark.parametrize("server", ["redis_url", "redis_cluster_url"])
def test_replay_on_redis_gives_the_verdicts_of_memory(
    stream: tuple[Path, Path], server: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """`replay --redis-url` runs the same code on Redis state, one node or a cluster: the
    same verdicts, byte for byte, labels included, and it leaves no key behind on any node."""
    import redis
    import redis.cluster

    redis_url: str = request.getfixturevalue(server)
    transactions, labels = stream
    common = ["replay", "--input", str(transactions), "--labels", str(labels)]
    common += ["--label-delay", "2d", "--workers", "1"]
    assert cli([*common, "--output", str(tmp_path / "memory.jsonl")]) == 0
    client: redis.Redis | redis.cluster.RedisCluster = (
        redis.cluster.RedisCluster.from_url(redis_url)
        if server == "redis_cluster_url"
        else redis.Redis.from_url(redis_url)
    )
    before = sorted(client.scan_iter(match="replay-*"))
    assert cli([*common, "--output", str(tmp_path / "redis.jsonl"), "--redis-url", redis_url]) == 0
    memory = (tmp_path / "memory.jsonl").read_bytes()
    assert (tmp_path / "redis.jsonl").read_bytes() == memory
    assert b'"decision":"review"' in memory  # the stream exercises the rules, not only allow
    assert sorted(client.scan_iter(match="replay-*")) == before
    client.close()
