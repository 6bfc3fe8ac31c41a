"""The demo's report: verdicts against the truth, figures under stable names, the HTML page."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import orjson
import pytest

from publisher.labels import Label
from publisher.report import Reason, Verdict, parse_verdict
from stack.demo import DemoStream, label_outcomes, messages, warm_up
from stack.report import Tally
from stack.report_html import render

PUBLISHED = dt.datetime(2026, 12, 4, 12, 0, 0, tzinfo=dt.UTC)


def verdict(
    tid: str,
    decision: str,
    score: float,
    amount: float = 10.0,
    rules: tuple[tuple[str, str], ...] = (),
    delay: float = 0.05,
) -> Verdict:
    reasons = tuple(Reason(rule, action, False) for rule, action in rules)
    return Verdict(tid, decision, delay, amount, reasons, score)


@pytest.fixture()
def tally() -> Tally:
    """Ten transactions, four frauds (scenarios 1, 2, 2, 3); one fraud's verdict never arrives."""
    truth = {
        "f1": Label(True, 1),
        "f2": Label(True, 2),
        "f3": Label(True, 2),
        "f4": Label(True, 3),
        **{f"g{i}": Label(False) for i in range(6)},
    }
    tally = Tally(truth)
    tally.add(verdict("f1", "block", 0.95, 300.0, (("model-block", "block"),), 0.9), 1.0)
    tally.add(verdict("f2", "review", 0.6, 40.0, (("model-review", "review"),)), 1.5)
    tally.add(verdict("f3", "allow", 0.2, 50.0), 2.0)
    tally.add(verdict("g0", "block", 0.92, 20.0, (("model-block", "block"),)), 2.5)
    tally.add(verdict("g1", "review", 0.7, 20.0, (("model-review", "review"),)), 3.0)
    for i in range(2, 6):
        tally.add(verdict(f"g{i}", "allow", 0.01 * i), 3.5)
    return tally


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[]", b'{"decision": "block"}', b'{"transaction_id": "t", "decision": "x"}'],
)
def test_what_is_not_a_verdict_of_the_stream_is_not_counted(tally: Tally, data: bytes) -> None:
    """Messages without the id of a transaction of the stream change no figure."""
    before = tally.report(rate=1, seconds=1, labels_sent=0, labels_applied=0)
    assert not tally.add(parse_verdict(data, {}, PUBLISHED), 5.0)
    assert tally.report(rate=1, seconds=1, labels_sent=0, labels_applied=0) == before
    assert tally.unknown == 1


def test_report_figures(tally: Tally) -> None:
    """Precision over what was flagged; recall over every fraud published, lost verdicts included."""
    report = tally.report(rate=100.0, seconds=4.0, labels_sent=3, labels_applied=2)
    assert report["decisions"] == {"allow": 5, "review": 2, "block": 2}
    assert report["missing"] == 1
    assert report["precision_block"] == 0.5  # f1 of f1, g0
    assert report["recall_block"] == 0.25  # f1 of four frauds
    assert report["precision_flagged"] == 0.5  # f1, f2 of f1, f2, g0, g1
    assert report["recall_flagged"] == 0.5
    assert report["labels_applied"] == 2
    assert report["fraud_amount"] == {"blocked": 300.0, "reviewed": 40.0, "let_through": 50.0}
    assert report["scenarios"] == [
        {"scenario": 1, "name": "large amount", "frauds": 1, "blocked": 1, "reviewed": 0, "missed": 0},
        {"scenario": 2, "name": "compromised terminal", "frauds": 2, "blocked": 0, "reviewed": 1, "missed": 1},
        {"scenario": 3, "name": "compromised customer", "frauds": 1, "blocked": 0, "reviewed": 0, "missed": 1},
    ]  # fmt: skip
    rules = {r["rule"]: (r["fired"], r["fraud"], r["precision"]) for r in report["rules"]}
    assert rules == {"model-block": (2, 1, 0.5), "model-review": (2, 1, 0.5)}
    assert report["delay_ms"]["p50"] == 50.0
    assert report["delay_ms"]["p99"] == 900.0


def test_duplicates_and_strangers_are_not_counted(tally: Tally) -> None:
    """A redelivered verdict and one for a transaction never published change nothing."""
    before = tally.report(rate=1, seconds=1, labels_sent=0, labels_applied=0)
    assert not tally.add(verdict("f3", "block", 0.99), 5.0)
    assert not tally.add(verdict("stranger", "block", 0.99), 5.0)
    after = tally.report(rate=1, seconds=1, labels_sent=0, labels_applied=0)
    assert after["decisions"] == before["decisions"]
    assert (tally.duplicates, tally.unknown) == (1, 1)


def test_threshold_curve_is_score_alone(tally: Tally) -> None:
    """Precision and recall of score > t: at 0.5, f1, f2, g0, g1 pass; at 0.93, f1 alone."""
    curve = {p["threshold"]: p for p in tally.report(rate=1, seconds=1, labels_sent=0, labels_applied=0)["charts"]["threshold_curve"]}  # fmt: skip
    assert (curve[0.5]["precision"], curve[0.5]["recall"]) == (0.5, 0.5)
    assert (curve[0.93]["precision"], curve[0.93]["recall"]) == (1.0, 0.25)
    assert curve[0.99]["precision"] is None


def test_live_figures(tally: Tally) -> None:
    """Live: frauds seen so far (f4's verdict is not lost yet) and how many were flagged."""
    live = tally.live()
    assert (live["frauds"], live["caught_flagged"]) == (3, 2)
    assert live["verdicts"] == 9
    assert live["lag_ms"]["p99"] == 900.0
    assert live["recall_flagged"] == 0.6667  # f1, f2 of f1, f2, f3; the report says 0.5


def test_label_outcomes_counts_the_feedback_log(tmp_path: Path) -> None:
    """labels_applied comes from record_feedback's log: one entry per label with an outcome."""
    log = tmp_path / "record_feedback.log"
    entries = [
        {"severity": "INFO", "message": "label fraud for t1: applied", "outcome": "applied"},
        {"severity": "INFO", "message": "label True for t1: applied"},
        {"severity": "INFO", "message": "label fraud for t2: unknown", "outcome": "unknown"},
        {"severity": "INFO", "message": "label fraud for t3: applied", "outcome": "applied"},
    ]
    log.write_bytes(b"\n".join(orjson.dumps(e) for e in entries) + b"\n[INFO] gunicorn\n")
    assert label_outcomes(log) == {"applied": 2, "unknown": 1}
    assert label_outcomes(tmp_path / "missing.log") == {}


def test_demo_stream_sends_chargebacks_for_frauds_only() -> None:
    """Every transaction has a truth; only frauds carry a feedback message."""
    outgoing, truth = messages(DemoStream(count=3_000))
    assert len(outgoing) == len(truth) == 3_000
    frauds = [m for m in outgoing if truth[m.attributes["transaction_id"]].is_fraud]
    assert frauds
    assert all(m.feedback is not None for m in frauds)
    assert sum(m.feedback is not None for m in outgoing) == len(frauds)


def test_warm_up_stays_out_of_the_stream() -> None:
    """Warm-up traffic: rate x seconds messages, ids and entities of its own, a day earlier."""
    config = DemoStream(count=500, rate=50, warm_up=2)
    outgoing, truth = messages(config)
    warm = warm_up(config, outgoing[0].event_time)
    assert len(warm) == 100
    assert not {m.attributes["transaction_id"] for m in warm} & truth.keys()
    stream_entities = {
        v for m in outgoing for k, v in orjson.loads(m.data).items() if k.endswith("_id")
    }
    warm_entities = {v for m in warm for k, v in orjson.loads(m.data).items() if k.endswith("_id")}
    assert not stream_entities & warm_entities
    assert max(m.event_time for m in warm) < outgoing[0].event_time
    assert all(m.feedback is None for m in warm)


def test_html_is_self_contained_with_four_charts(tally: Tally) -> None:
    """One page, four SVG charts, nothing fetched from elsewhere."""
    page = render(tally.report(rate=100.0, seconds=4.0, labels_sent=3, labels_applied=2))
    assert page.count("<svg ") == 4
    for chart in ("score-by-truth", "precision-recall", "delay", "decisions-over-time"):
        assert f'id="{chart}"' in page
    assert "<script" not in page
    assert "src=" not in page
    assert "href=" not in page
    assert "url(" not in page


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rate", "0"], "argument --rate: must be a finite number > 0, got 0"),
        (["--customers", "x"], "argument --customers: must be an integer, got 'x'"),
        (
            ["--label-delay", "7x"],
            "argument --label-delay: expected a number and one of d, h, m, s",
        ),
    ],
)
def test_demo_options_are_checked_before_anything_starts(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped option is a usage error naming the option and the value, no traceback."""
    from stack.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["demo", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
