"""The verdict report: parsing verdicts and labels, the tally's figures, and how they are shown."""

from __future__ import annotations

import datetime as dt
import io
import re
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from publisher.display import LiveView, format_live_line, format_report
from publisher.errors import ReadError
from publisher.labels import Label, label_json, load_labels
from publisher.report import RateMeter, Reason, Tally, Verdict, parse_time, parse_verdict

UTC = dt.UTC
PUBLISHED = dt.datetime(2026, 1, 2, 3, 4, 5, 500_000, tzinfo=UTC)

SUMMARY_KEYS = {
    "verdicts",
    "duplicates",
    "decisions",
    "delay_ms",
    "labelled",
    "unlabelled",
    "frauds",
    "caught_block",
    "caught_flagged",
    "precision_block",
    "recall_block",
    "precision_flagged",
    "recall_flagged",
    "confusion",
    "by_scenario",
    "amount_stopped",
    "amount_reviewed",
    "amount_missed",
    "top_rules",
}


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
    """Without attributes the body's decision, id, amount and fired rules are used; no delay."""
    body = orjson.dumps(
        {
            "transaction_id": "t2",
            "decision": "review",
            "amount": "120.50",
            "reasons": [{"rule": "card-velocity-1h"}, {"rule": "model-score"}, {"oops": 1}],
        }
    )
    verdict = parse_verdict(body, {}, PUBLISHED)
    reasons = (Reason("card-velocity-1h"), Reason("model-score"))  # no action, not shadow
    assert verdict == Verdict("t2", "review", None, 120.5, reasons)


def test_verdict_keeps_score_and_what_each_rule_asks() -> None:
    """Score, and each reason's action and shadow flag, come from the body."""
    body = {
        "transaction_id": "t1",
        "decision": "review",
        "score": 0.7,
        "amount": 12.5,
        "reasons": [
            {"rule": "model-review", "action": "review", "shadow": False},
            {"rule": "new-velocity", "action": "block", "shadow": True},
        ],
    }
    attributes = {"source_publish_time": "2026-01-02T03:04:05.250000001Z"}
    assert parse_verdict(orjson.dumps(body), attributes, PUBLISHED) == Verdict(
        "t1",
        "review",
        0.25,
        12.5,
        (Reason("model-review", "review", False), Reason("new-velocity", "block", True)),
        0.7,
    )


@pytest.mark.parametrize(
    ("amount", "expected"),
    [(12.5, 12.5), (7, 7.0), ("3.25", 3.25), ("lots", None), (True, None), (None, None)],
)
def test_verdict_amount_is_a_number_or_nothing(amount: object, expected: float | None) -> None:
    """A JSON number or decimal string is an amount; anything else is no amount."""
    data = orjson.dumps({"decision": "allow", "amount": amount})
    assert parse_verdict(data, {}, None).amount == expected


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


FRAUD = {n: Label(True, n) for n in (1, 2, 3)}
GENUINE = Label(False)
ACTIONS = {"large-amount": "block", "terminal-reported-fraud": "review", "model-score": "review"}


def fired(*rules: str) -> tuple[Reason, ...]:
    """The reasons of a verdict on which these rules fired, each with its action."""
    return tuple(Reason(rule, ACTIONS[rule]) for rule in rules)


def _scored() -> Tally:
    """Eight labelled verdicts and one unlabelled, with amounts and fired rules."""
    labels = {
        "a": FRAUD[1],
        "b": FRAUD[2],
        "c": FRAUD[2],
        "d": FRAUD[3],
        "e": GENUINE,
        "f": GENUINE,
        "g": GENUINE,
        "h": Label(True, None),
    }
    tally = Tally(labels)
    tally.add_all(
        [
            Verdict("a", "block", 0.01, 300.0, fired("large-amount", "model-score")),
            Verdict("b", "review", 0.02, 50.0, fired("terminal-reported-fraud")),
            Verdict("c", "allow", 0.03, 40.0),
            Verdict("d", "block", 0.04, 500.0, fired("model-score")),
            Verdict("e", "block", 0.05, 1200.0, fired("large-amount")),
            Verdict("f", "review", 0.06, 20.0, fired("model-score")),
            Verdict("g", "allow", 0.07, 10.0),
            Verdict("h", "allow", 0.08, 5.0),
            Verdict("x", "allow", 0.09, 1.0, fired("model-score")),
        ]
    )
    return tally


def test_summary_precision_and_recall_for_block_and_flagged() -> None:
    """Block and block-or-review each get a confusion matrix, precision and recall."""
    summary = _scored().summary()
    assert summary["decisions"] == {"allow": 4, "review": 2, "block": 3}
    assert (summary["labelled"], summary["unlabelled"], summary["frauds"]) == (8, 1, 5)
    assert summary["confusion"] == {
        "block": {"tp": 2, "fp": 1, "fn": 3, "tn": 2},
        "flagged": {"tp": 3, "fp": 2, "fn": 2, "tn": 1},
    }
    assert (summary["caught_block"], summary["caught_flagged"]) == (2, 3)
    assert (summary["precision_block"], summary["recall_block"]) == (0.6667, 0.4)
    assert (summary["precision_flagged"], summary["recall_flagged"]) == (0.6, 0.6)


def test_summary_by_scenario_and_fraud_amounts() -> None:
    """Each scenario's frauds are split into caught (blocked or reviewed) and missed, with amounts."""
    summary = _scored().summary()
    assert summary["by_scenario"] == {
        "1": {
            "name": "large amount",
            "frauds": 1,
            "caught": 1,
            "blocked": 1,
            "missed": 0,
            "amount": 300.0,
            "amount_stopped": 300.0,
            "amount_missed": 0.0,
        },
        "2": {
            "name": "compromised terminal",
            "frauds": 2,
            "caught": 1,
            "blocked": 0,
            "missed": 1,
            "amount": 90.0,
            "amount_stopped": 0.0,
            "amount_missed": 40.0,
        },
        "3": {
            "name": "compromised customer",
            "frauds": 1,
            "caught": 1,
            "blocked": 1,
            "missed": 0,
            "amount": 500.0,
            "amount_stopped": 500.0,
            "amount_missed": 0.0,
        },
        "unknown": {
            "name": "unknown",
            "frauds": 1,
            "caught": 0,
            "blocked": 0,
            "missed": 1,
            "amount": 5.0,
            "amount_stopped": 0.0,
            "amount_missed": 5.0,
        },
    }
    # Genuine amounts (the blocked 1,200) are not fraud stopped.
    assert (summary["amount_stopped"], summary["amount_reviewed"], summary["amount_missed"]) == (
        800.0,
        50.0,
        45.0,
    )


def test_summary_ranks_rules_by_firings_with_their_precision() -> None:
    """Rules are listed most fired first; precision counts only labelled firings."""
    rules = _scored().summary()["top_rules"]
    assert rules == [
        {
            "rule": "model-score",
            "action": "review",
            "shadow": False,
            "fired": 4,
            "labelled": 3,
            "frauds": 2,
            "precision": 0.6667,
        },
        {
            "rule": "large-amount",
            "action": "block",
            "shadow": False,
            "fired": 2,
            "labelled": 2,
            "frauds": 1,
            "precision": 0.5,
        },
        {
            "rule": "terminal-reported-fraud",
            "action": "review",
            "shadow": False,
            "fired": 1,
            "labelled": 1,
            "frauds": 1,
            "precision": 1.0,
        },
    ]
    assert [r["rule"] for r in _scored().summary(top=1)["top_rules"]] == ["model-score"]


def test_summary_keys_are_stable_without_labels() -> None:
    """Without ground truth every key is there; ratios are None, counts zero."""
    tally = Tally()
    tally.add(Verdict("t1", "block", 0.2, 10.0, fired("large-amount")))
    summary = tally.summary()
    assert set(summary) == SUMMARY_KEYS == set(_scored().summary())
    assert summary["labelled"] == 0 and summary["unlabelled"] == 1
    assert summary["precision_block"] is None and summary["recall_flagged"] is None
    assert summary["by_scenario"] == {} and summary["amount_stopped"] == 0
    assert summary["top_rules"][0]["precision"] is None
    assert summary["delay_ms"] == {
        "count": 1,
        "p50": 200.0,
        "p95": 200.0,
        "p99": 200.0,
        "max": 200.0,
    }
    assert orjson.loads(orjson.dumps(summary)) == summary


def test_lost_frauds_count_as_missed_only_when_asked() -> None:
    """Once the stream is over, a labelled fraud without a verdict is a miss; before, it is not."""
    tally = _scored()
    tally.labels = {**(tally.labels or {}), "lost-1": FRAUD[2], "lost-2": GENUINE}
    assert tally.lost_frauds() == [FRAUD[2]]
    before, after = tally.summary(), tally.summary(lost_are_missed=True)
    assert (before["frauds"], after["frauds"]) == (5, 6)
    assert after["confusion"]["flagged"] == {"tp": 3, "fp": 2, "fn": 3, "tn": 1}
    assert after["confusion"]["block"] == {"tp": 2, "fp": 1, "fn": 4, "tn": 2}
    assert (after["precision_flagged"], after["recall_flagged"]) == (0.6, 0.5)
    assert (after["precision_block"], after["recall_block"]) == (0.6667, 0.3333)
    assert after["by_scenario"]["2"] | {"name": ""} == before["by_scenario"]["2"] | {
        "name": "",
        "frauds": 3,
        "missed": 2,
    }
    assert after["amount_missed"] == before["amount_missed"]  # a lost verdict has no amount
    assert tally.summary() == before  # asking did not change the tally


def test_scores_are_kept_for_labelled_verdicts() -> None:
    """Each labelled verdict with a score keeps (score, is fraud); others keep nothing."""
    tally = Tally({"f": FRAUD[1], "g": GENUINE, "n": GENUINE})
    tally.add_all(
        [
            Verdict("f", "block", None, score=0.9),
            Verdict("g", "allow", None, score=0.1),
            Verdict("n", "allow", None),
            Verdict("stranger", "allow", None, score=0.5),
        ]
    )
    assert tally.scores == [(0.9, True), (0.1, False)]


@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=200))
def test_delay_percentiles_are_ordered_observations(delays: list[float]) -> None:
    """p50 <= p95 <= p99 <= max, each one of the observed delays."""
    tally = Tally()
    for i, delay in enumerate(delays):
        tally.add(Verdict(f"t{i}", "allow", delay))
    report = tally.delay_ms()
    assert report["p50"] <= report["p95"] <= report["p99"] <= report["max"]  # type: ignore[operator]
    assert report["max"] == round(max(delays) * 1000, 1)


def test_live_lag_follows_the_latest_verdicts() -> None:
    """The live lag is taken over the latest 1,000 delays; the final one over all of them."""
    tally = Tally({"t0": FRAUD[1]})
    for i in range(1000):
        tally.add(Verdict(f"t{i}", "block" if i == 0 else "allow", 10.0))
    for i in range(1000, 2000):
        tally.add(Verdict(f"t{i}", "allow", 0.1))
    live = tally.live()
    assert live["lag_ms"] == {"p50": 100.0, "p99": 100.0}
    assert tally.summary()["delay_ms"]["p99"] == 10_000.0
    assert (live["verdicts"], live["caught_flagged"], live["recall_block"]) == (2000, 1, 1.0)
    assert Tally().live()["lag_ms"] == {"p50": None, "p99": None}


def test_rate_meter_averages_over_its_window() -> None:
    """The rate is the count gained across the last window of observations."""
    meter = RateMeter(window=5.0)
    assert meter.rate == 0.0
    for second in range(11):  # 100 a second for 10 s, then nothing for 10 s
        meter.observe(float(second), 100 * second)
    assert meter.rate == pytest.approx(100.0)
    for second in range(11, 21):
        meter.observe(float(second), 1000)
    assert meter.rate == 0.0


def test_labels_file_round_trips_with_scenarios(tmp_path: Path) -> None:
    """What the simulator writes, the report reads: truth and scenario per transaction."""
    path = tmp_path / "labels.jsonl"
    path.write_bytes(
        label_json("t1", True, 2) + b"\n\n" + label_json("t2", False, None) + b"\n"
        b'{"transaction_id":"t3","is_fraud":true}\n'
    )
    assert load_labels(path) == {"t1": Label(True, 2), "t2": Label(False), "t3": Label(True)}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"transaction_id":"t1","is_fraud":false}\n{oops\n', ":2: not JSON"),
        (b'{"transaction_id":"t1","is_fraud":"yes"}\n', ":1: must be an object with"),
        (
            b'{"transaction_id":"t1","is_fraud":true,"scenario":"two"}\n',
            ":1: scenario must be an integer or null, got 'two'",
        ),
    ],
)
def test_labels_file_errors_name_the_line(tmp_path: Path, content: bytes, message: str) -> None:
    """A labels file with a bad line is refused with its number and the problem."""
    path = tmp_path / "labels.jsonl"
    path.write_bytes(content)
    with pytest.raises(ReadError, match=re.escape(f"--labels: {path}{message}")):
        load_labels(path)
    with pytest.raises(ReadError, match="cannot read"):
        load_labels(tmp_path / "missing.jsonl")


def test_text_report_shows_every_figure() -> None:
    """The human report has decisions, delays, both precision/recall rows, scenarios, amounts, rules."""
    report = {**_scored().summary(), "stopped_by": "count", "seconds": 2.0}
    text = format_report(report)
    assert "decisions: allow 4, review 2, block 3" in text
    assert "p50 50.0" in text and "p99 90.0" in text
    assert re.search(r"block or review +0\.600 +0\.600 +3\n", text)
    assert re.search(r"\n  block +0\.667 +0\.400 +2\n", text)
    assert re.search(r"2 compromised terminal +2 +1 +0 +1\n", text)
    assert "fraud amount: stopped 800.00, in review 50.00, let through 45.00" in text
    assert re.search(r"model-score +4 +0\.667", text)


def test_text_report_without_labels_has_no_accuracy() -> None:
    """Without labels there is nothing to say about accuracy, and nothing is said."""
    tally = Tally()
    tally.add(Verdict("t1", "allow", None))
    text = format_report({**tally.summary(), "stopped_by": "idle", "seconds": 1.0})
    assert "precision" not in text and "scenario" not in text
    assert "no source_publish_time attributes seen" in text


class Clock:
    def __init__(self) -> None:
        self.time = 100.0

    def __call__(self) -> float:
        return self.time


def test_plain_live_lines_come_every_interval_and_not_when_idle() -> None:
    """Off a terminal: a line per interval while verdicts arrive, none idle, a last on close."""
    out, clock = io.StringIO(), Clock()
    tally = Tally({"t0": FRAUD[2]})
    with LiveView(out, interval=5.0, clock=clock) as view:
        assert not view.terminal
        for i in range(80):  # 80 verdicts over 10 s
            clock.time += 0.125
            tally.add(Verdict(f"t{i}", "block" if i == 0 else "allow", 0.25))
            view.update(tally)
        for _ in range(20):  # then 10 s idle
            clock.time += 0.5
            view.update(tally)
        tally.add(Verdict("t80", "allow", 0.25))  # the last one, between two lines
        clock.time += 1.0
        view.update(tally)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[-1].startswith("watch: 81 verdicts")  # written on close
    lines.pop()
    assert lines[-1].startswith("watch: 80 verdicts, 8/s; allow 79, review 0, block 1;")
    assert "lag p50 250 ms, p99 250 ms" in lines[-1]
    assert "frauds caught 1 of 1 (blocked 1)" in lines[-1]
    assert "block precision 1.000 recall 1.000" in lines[-1]


def test_terminal_live_panel_shows_the_figures() -> None:
    """On a terminal the rich panel shows rate, decisions, lag and frauds caught."""
    out, clock = io.StringIO(), Clock()
    tally = Tally({"t1": FRAUD[3]})
    with LiveView(out, clock=clock, force_terminal=True) as view:
        assert view.terminal
        tally.add(Verdict("t1", "review", 0.5))
        clock.time += 1.0
        view.update(tally)
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    for text in ("verdicts", "review 1", "p50 500 ms", "frauds caught", "1 of 1", "recall 1.000"):
        assert text in drawn


def test_live_line_without_labels_has_no_accuracy() -> None:
    """Without labels the line has rate, decisions and lag only."""
    tally = Tally()
    tally.add(Verdict("t1", "allow", None))
    line = format_live_line(tally.live(), 3.0)
    assert line == "watch: 1 verdicts, 3/s; allow 1, review 0, block 0; lag p50 n/a, p99 n/a"
