"""The publisher's pure parts: pacing, the streaming loop, sinks and input files."""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from publisher.cli import parse_delay, read_messages
from publisher.errors import ReadError, WriteError
from publisher.pacing import RatePacer, SpeedupPacer
from publisher.progress import Progress
from publisher.publish import FileSink, MemorySink, Outgoing, StreamOptions, stream


class FakeClock:
    """A clock that only moves when slept on."""

    def __init__(self) -> None:
        self.time = 1000.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.time

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.time += seconds


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("90s", 90), ("15m", 900), ("12h", 43_200), ("7d", 604_800), ("45", 45)],
)
def test_label_delay_units(text: str, seconds: float) -> None:
    """--label-delay accepts 0, seconds, minutes, hours and days."""
    assert parse_delay(text) == seconds


@pytest.mark.parametrize("text", ["", "7w", "-1d", "d", "1.2.3s"])
def test_label_delay_rejects_other_text(text: str) -> None:
    """Anything else is a usage error that quotes the value."""
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number and one of d, h, m, s"):
        parse_delay(text)


def test_rate_pacer_spaces_messages_evenly() -> None:
    """At 100/s, 201 messages take 2 s of clock time."""
    clock = FakeClock()
    pacer = RatePacer(100, clock)
    for _ in range(201):
        pacer.wait(0)
    assert clock.time - 1000.0 == pytest.approx(2.0)


def test_speedup_pacer_compresses_event_time() -> None:
    """At speedup 3600 an hour of event time passes in one second of wall time."""
    clock = FakeClock()
    pacer = SpeedupPacer(3600, clock)
    for event_time in range(0, 3601, 60):
        pacer.wait(1_500_000_000 + event_time)
    assert clock.time - 1000.0 == pytest.approx(1.0)


def _messages(n: int, step: float = 3600.0) -> list[Outgoing]:
    return [
        Outgoing(
            data=f'{{"transaction_id":"t{i}"}}'.encode(),
            attributes={"transaction_id": f"t{i}"},
            event_time=i * step,
            label=f'{{"transaction_id":"t{i}","is_fraud":{"true" if i % 4 == 0 else "false"}}}'.encode(),
            feedback=f'{{"transaction_id":"t{i}"}}'.encode(),
        )
        for i in range(n)
    ]


def test_stream_sends_in_order_and_writes_labels_aside() -> None:
    """Every message goes to the sink in order; labels go only to the labels sink."""
    sink, labels = MemorySink(), MemorySink()
    summary = stream(_messages(10), sink, StreamOptions(), labels=labels)
    assert [data for data, _ in sink.messages] == [m.data for m in _messages(10)]
    assert all(b"is_fraud" not in data for data, _ in sink.messages)
    assert len(labels.messages) == 10
    assert (summary.sent, summary.frauds, summary.stopped_by) == (10, 3, "end")


def test_stream_stops_at_count() -> None:
    """--count stops after exactly N messages."""
    sink = MemorySink()
    summary = stream(_messages(10), sink, StreamOptions(count=4))
    assert len(sink.messages) == 4 and summary.stopped_by == "count"


def test_stream_stops_after_duration() -> None:
    """--duration stops once the wall clock has passed it."""
    clock = FakeClock()
    pacer = RatePacer(10, clock)
    sink = MemorySink()
    summary = stream(_messages(100), sink, StreamOptions(duration=2.0, pacer=pacer, now=clock.now))
    assert summary.stopped_by == "duration"
    assert 19 <= len(sink.messages) <= 21


@given(delay_hours=st.integers(0, 12), n=st.integers(0, 30))
def test_feedback_is_released_after_the_delay(delay_hours: int, n: int) -> None:
    """A label is sent once a transaction `delay` later has been sent; the rest are held."""
    feedback = MemorySink()
    options = StreamOptions(label_delay=delay_hours * 3600.0)
    summary = stream(_messages(n), MemorySink(), options, feedback=feedback)
    # Messages are an hour apart: with delay d, labels of the first n - d are due.
    released = max(0, n - delay_hours)
    assert [data for data, _ in feedback.messages] == [m.feedback for m in _messages(released)]
    assert summary.feedback_held == n - released


def test_no_feedback_without_a_delay() -> None:
    """Without label_delay nothing goes to the feedback sink."""
    feedback = MemorySink()
    stream(_messages(5), MemorySink(), StreamOptions(), feedback=feedback)
    assert feedback.messages == []


def test_file_sink_writes_json_lines(tmp_path: Path) -> None:
    """A FileSink writes one message per line."""
    sink = FileSink(tmp_path / "out.jsonl")
    stream(_messages(3), sink, StreamOptions())
    sink.close()
    lines = (tmp_path / "out.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["transaction_id"] for line in lines] == ["t0", "t1", "t2"]


def test_file_sink_names_an_unwritable_path(tmp_path: Path) -> None:
    """An unwritable file is an WriteError naming the option and path."""
    target = tmp_path / "missing" / "out.jsonl"
    with pytest.raises(WriteError, match=re.escape(f"--out: cannot write {target}")):
        FileSink(target)


def test_read_messages_keeps_lines_and_ids(tmp_path: Path) -> None:
    """Each non-blank line becomes a message; transaction_id becomes an attribute."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"transaction_id":"a","amount":1}\n\n{"amount":2}\n')
    messages = list(read_messages(path))
    assert [m.data for m in messages] == [b'{"transaction_id":"a","amount":1}', b'{"amount":2}']
    assert [dict(m.attributes) for m in messages] == [{"transaction_id": "a"}, {}]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b'{"a":1}\nnot json\n', ":2: not JSON"), (b"[1,2]\n", ":1: must be a JSON object")],
)
def test_read_messages_names_the_bad_line(tmp_path: Path, content: bytes, message: str) -> None:
    """A bad line is an ReadError naming file and line number."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    with pytest.raises(ReadError, match=re.escape(f"{path}{message}")):
        list(read_messages(path))


class TerminalStream(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_is_silent_when_not_a_terminal() -> None:
    """Piped or redirected output gets no progress bar at all."""
    stream_ = io.StringIO()
    progress = Progress("simulate", 100, stream_)
    for n in range(1, 101):
        progress.update(n)
    progress.close()
    assert stream_.getvalue() == ""


def test_progress_shows_count_rate_and_eta_on_a_terminal() -> None:
    """On a terminal the line has done/total, percent, a rate and, until done, an ETA."""
    terminal = TerminalStream()
    progress = Progress("simulate", 1000, terminal)
    progress.update(10)
    first = terminal.getvalue()
    assert re.search(r"\rsimulate: 10/1,000 \(1%\)  [\d,]+/s  0:00  ETA \d+:\d\d", first)
    progress.close()
    assert terminal.getvalue().endswith("\n")
