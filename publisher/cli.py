"""Command line: `python -m publisher simulate | republish | watch`.

The edge of the package: parses options into typed settings, reads the environment once
(GOOGLE_CLOUD_PROJECT; PUBSUB_EMULATOR_HOST is read by the Pub/Sub client itself), wires the
pure pieces together, and turns every PublisherError into one `error: ...` line and exit 1.
Usage mistakes exit 2, an interrupt 130.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NoReturn

import orjson

from detector.errors import ConfigError
from detector.vocabulary import parse_duration
from publisher.errors import PublisherError, ReadError, UsageError, WriteError
from publisher.pacing import Pacer, RatePacer, SpeedupPacer, SystemClock, Unpaced
from publisher.progress import Progress
from publisher.publish import (
    FileSink,
    Outgoing,
    Publisher,
    Sink,
    StreamOptions,
    StreamSummary,
    make_publisher,
    stream,
)
from publisher.simulate import TERMINALS_PER_MERCHANT, SimulationConfig, records, write_jsonl

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "transactions"
DEFAULT_FEEDBACK_TOPIC = "fraud-feedback"
DEFAULT_LABEL_DELAY = 7 * 86_400
# Share of Normal(12:00, 20000 s) times that fall inside the day (the rest are dropped).
_IN_DAY = math.erf(43_200 / (20_000 * math.sqrt(2)))


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one `error: ...` line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


PUBLISHER_HELP = (
    "batch (default): google-cloud-pubsub's Publish RPC with our own batching and flow control, "
    "about 4x faster here; library: PublisherClient.publish, the library's own batching"
)


def parse_delay(text: str) -> float:
    """Parse a label delay: "0", "90s", "15m", "12h", "7d" (a bare number is seconds).

    The project's one duration grammar (`detector.vocabulary.parse_duration`).
    """
    try:
        return parse_duration(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error).partition(": ")[2]) from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1, or a usage error quoting the text."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0, or a usage error quoting the text."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0, or a usage error quoting the text."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a date YYYY-MM-DD, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m publisher",
        description="Simulated payment traffic for the fraud detector, and a verdict watcher.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sim = commands.add_parser(
        "simulate",
        help="generate transactions (Fraud Detection Handbook model) and publish or write them",
        description="Generate transactions and publish them to --topic, or write them to "
        "--out. Defaults are the book's scale (5,000 customers, 10,000 terminals, 183 days: "
        "about 1.75 M transactions); use --count or a smaller scale for a live run.",
    )
    sim.add_argument("--seed", type=non_negative_int, default=0, help="default 0")
    sim.add_argument("--customers", type=positive_int, default=5_000, help="default 5000")
    sim.add_argument("--terminals", type=positive_int, default=10_000, help="default 10000")
    sim.add_argument("--days", type=positive_int, default=183, help="default 183")
    sim.add_argument(
        "--merchants",
        type=non_negative_int,
        help="merchants running the terminals, a few large chains and many small shops "
        f"(at most --terminals; default one per {TERMINALS_PER_MERCHANT} terminals; "
        "0: transactions carry no merchant)",
    )
    sim.add_argument("--start", type=_date, default=dt.date(2018, 4, 1), help="default 2018-04-01")
    sim.add_argument(
        "--from-day",
        type=non_negative_int,
        default=0,
        help="start at day N of the period (earlier days are simulated, not sent): "
        "fraud builds up over the first ~28 days (default 0)",
    )
    sim.add_argument("--count", type=positive_int, help="stop after N transactions")
    sim.add_argument("--duration", type=positive_float, help="stop after SECONDS of wall time")
    pace = sim.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=positive_float, help="messages per second (default: max)")
    pace.add_argument(
        "--speedup", type=positive_float, help="play event time X times faster than real"
    )
    sim.add_argument("--out", type=Path, help="write JSON lines here instead of publishing")
    sim.add_argument("--labels", type=Path, help="write ground-truth labels (JSON lines) here")
    sim.add_argument(
        "--label-delay",
        type=parse_delay,
        help="publish labels to the feedback topic this long after each transaction in "
        "event time: 0, 90s, 15m, 12h, 7d (default 7d when --feedback-topic is given)",
    )
    sim.add_argument("--topic", default=DEFAULT_TOPIC, help=f"default {DEFAULT_TOPIC}")
    sim.add_argument(
        "--feedback-topic",
        help=f"publish labels to this topic ({DEFAULT_FEEDBACK_TOPIC} if only --label-delay)",
    )
    sim.add_argument("--project", help="Google Cloud project (default: $GOOGLE_CLOUD_PROJECT)")
    sim.add_argument(
        "--publisher", choices=("batch", "library"), default="batch", help=PUBLISHER_HELP
    )

    repub = commands.add_parser(
        "republish",
        help="publish a recorded JSON-lines file to a topic, one message per line",
        description="Publish each line of a recorded JSON-lines file (as simulate --out writes "
        "it) as one message. Not a backtest: `python -m detector replay` runs the detector "
        "over a file.",
    )
    repub.add_argument("file", type=Path, metavar="FILE.jsonl")
    repub.add_argument("--topic", default=DEFAULT_TOPIC, help=f"default {DEFAULT_TOPIC}")
    repub.add_argument("--rate", type=positive_float, help="messages per second (default: max)")
    repub.add_argument("--count", type=positive_int, help="stop after N messages")
    repub.add_argument("--project", help="Google Cloud project (default: $GOOGLE_CLOUD_PROJECT)")
    repub.add_argument(
        "--publisher", choices=("batch", "library"), default="batch", help=PUBLISHER_HELP
    )

    wat = commands.add_parser(
        "watch",
        help="live and final figures of the verdicts: decisions, delay, accuracy",
        description="Pull verdicts from a subscription, show rate, decisions, lag and (with "
        "--labels) frauds caught while they come, and print a final report: decisions, "
        "precision and recall for block and for block-or-review, frauds caught and missed by "
        "scenario, fraud amount stopped and let through, the rules that fired most, delay "
        "percentiles.",
    )
    wat.add_argument("--subscription", required=True, help="a subscription to the verdict topic")
    wat.add_argument("--labels", type=Path, help="labels file from simulate --labels")
    wat.add_argument("--count", type=positive_int, help="stop after N verdicts")
    wat.add_argument(
        "--idle-timeout",
        type=positive_float,
        default=10.0,
        help="stop after SECONDS without a verdict (default 10)",
    )
    wat.add_argument(
        "--interval",
        type=positive_float,
        default=5.0,
        help="seconds between lines of live figures when the output is not a terminal "
        "(on a terminal they are redrawn in place; default 5)",
    )
    wat.add_argument("--json", action="store_true", help="print the report as JSON")
    wat.add_argument("--project", help="Google Cloud project (default: $GOOGLE_CLOUD_PROJECT)")
    return parser


@dataclass(frozen=True)
class Environment:
    """What the commands read from the environment, read once here."""

    project: str | None
    emulator_host: str | None

    @classmethod
    def read(cls) -> Environment:
        return cls(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None,
            emulator_host=os.environ.get("PUBSUB_EMULATOR_HOST") or None,
        )


def _project(args: argparse.Namespace, env: Environment) -> str:
    project: str | None = args.project or env.project
    if not project:
        raise UsageError("--project: not given and GOOGLE_CLOUD_PROJECT is not set")
    return project


def _pacer(args: argparse.Namespace) -> Pacer:
    if getattr(args, "speedup", None):
        return SpeedupPacer(args.speedup, SystemClock())
    if args.rate:
        return RatePacer(args.rate, SystemClock())
    return Unpaced()


def _estimate(config: SimulationConfig, count: int | None) -> int:
    """About how many transactions a run sends, for the progress bar's ETA."""
    estimate = round(config.customers * 2 * (config.days - config.from_day) * _IN_DAY)
    return min(count, estimate) if count else estimate


def _summary_line(verb: str, summary: StreamSummary, where: str) -> str:
    stopped = "" if summary.stopped_by in ("end", "count") else f", stopped by {summary.stopped_by}"
    return (
        f"{verb} {summary.sent:,} messages to {where} in {summary.seconds:.1f} s "
        f"({summary.rate:,.0f}/s{stopped})"
    )


def run_simulate(args: argparse.Namespace, env: Environment) -> int:
    config = SimulationConfig(
        seed=args.seed,
        customers=args.customers,
        terminals=args.terminals,
        days=args.days,
        start=args.start,
        from_day=args.from_day,
        merchants=args.merchants,
    )
    wants_feedback = args.feedback_topic is not None or args.label_delay is not None
    if args.out is not None and wants_feedback:
        raise UsageError("--feedback-topic/--label-delay: nothing is published with --out")
    label_delay = args.label_delay if args.label_delay is not None else DEFAULT_LABEL_DELAY

    if args.out is not None and not (args.rate or args.speedup or args.duration):
        return _write_files(config, args)
    total = _estimate(config, args.count)

    def outgoing() -> Iterator[Outgoing]:
        for record in records(config):
            yield Outgoing(
                data=record.data,
                attributes={"transaction_id": record.transaction_id},
                event_time=record.event_time,
                label=record.label_json(),
                feedback=record.feedback_json(),
            )

    publisher: Publisher | None = None
    sink: Sink
    feedback: Sink | None = None
    labels: FileSink | None = None
    if args.out is not None:
        sink = FileSink(args.out, "--out")
        where = str(args.out)
    else:
        publisher = make_publisher(args.publisher, _project(args, env), env.emulator_host)
        try:
            where = publisher.check_topic(args.topic, "--topic")
            sink = publisher.topic(where)
            if wants_feedback:
                name = args.feedback_topic or DEFAULT_FEEDBACK_TOPIC
                feedback = publisher.topic(publisher.check_topic(name, "--feedback-topic"))
        except PublisherError:
            publisher.close()
            raise
    try:
        if args.labels is not None:
            labels = FileSink(args.labels, "--labels")
        options = StreamOptions(
            count=args.count,
            duration=args.duration,
            label_delay=label_delay if wants_feedback else None,
            pacer=_pacer(args),
            progress=Progress("simulate", total),
        )
        summary = stream(outgoing(), sink, options, labels=labels, feedback=feedback)
    finally:
        sink.close()
        if labels is not None:
            labels.close()
        if publisher is not None:
            try:
                publisher.wait()
            finally:
                publisher.close()
    verb = "wrote" if args.out is not None else "published"
    line = _summary_line(verb, summary, where) + f"; {summary.frauds:,} are fraud"
    if labels is not None:
        line += f"; {summary.labels_written:,} labels to {args.labels}"
    if feedback is not None:
        line += (
            f"; {summary.feedback_sent:,} labels to the feedback topic, "
            f"{summary.feedback_held:,} not yet due"
        )
    print(line, file=sys.stderr)
    return 130 if summary.stopped_by == "interrupt" else 0


def _open_for_write(path: Path, option: str) -> IO[bytes]:
    try:
        return path.open("wb")
    except OSError as error:
        raise WriteError(f"{option}: cannot write {path}: {error.strerror}") from error


def _write_files(config: SimulationConfig, args: argparse.Namespace) -> int:
    """Unpaced --out: format and write whole days at once (the book's scale in seconds)."""
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(_open_for_write(args.out, "--out"))
        labels = None
        if args.labels is not None:
            labels = stack.enter_context(_open_for_write(args.labels, "--labels"))
        progress = Progress("simulate", _estimate(config, args.count))
        try:
            written, frauds = write_jsonl(config, out, labels, args.count, progress.update)
        except OSError as error:
            raise WriteError(f"--out/--labels: write failed: {error.strerror}") from error
        finally:
            progress.close()
    seconds = time.monotonic() - started
    line = (
        f"wrote {written:,} transactions to {args.out} in {seconds:.1f} s "
        f"({written / max(seconds, 1e-9):,.0f}/s); {frauds:,} are fraud"
    )
    if args.labels is not None:
        line += f"; {written:,} labels to {args.labels}"
    print(line, file=sys.stderr)
    return 0


def read_messages(path: Path) -> Iterator[Outgoing]:
    """Messages of a JSON-lines file; blank lines are skipped.

    Raises:
        ReadError: the file cannot be read or a line is not a JSON object.
    """
    try:
        handle = path.open("rb")
    except OSError as error:
        raise ReadError(f"FILE.jsonl: cannot read {path}: {error.strerror}") from error
    with handle:
        for number, line in enumerate(handle, start=1):
            data = line.strip()
            if not data:
                continue
            try:
                body = orjson.loads(data)
            except orjson.JSONDecodeError as error:
                raise ReadError(f"{path}:{number}: not JSON ({error})") from error
            if not isinstance(body, dict):
                raise ReadError(f"{path}:{number}: must be a JSON object")
            tid = body.get("transaction_id")
            attributes = {"transaction_id": tid} if isinstance(tid, str) else {}
            yield Outgoing(data=data, attributes=attributes)


def _count_lines(path: Path) -> int | None:
    try:
        with path.open("rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return None


def run_republish(args: argparse.Namespace, env: Environment) -> int:
    if not args.file.is_file():
        raise ReadError(f"FILE.jsonl: {args.file} does not exist or is not a file")
    publisher = make_publisher(args.publisher, _project(args, env), env.emulator_host)
    try:
        where = publisher.check_topic(args.topic, "--topic")
        total = _count_lines(args.file)
        if args.count and total:
            total = min(total, args.count)
        options = StreamOptions(
            count=args.count, pacer=_pacer(args), progress=Progress("republish", total)
        )
        summary = stream(read_messages(args.file), publisher.topic(where), options)
        publisher.wait()
    finally:
        publisher.close()
    print(_summary_line("published", summary, where), file=sys.stderr)
    return 130 if summary.stopped_by == "interrupt" else 0


def run_watch(args: argparse.Namespace, env: Environment) -> int:
    # Imported here: rich and the streaming-pull client cost every other command's start.
    from publisher.display import LiveView, format_report
    from publisher.labels import load_labels
    from publisher.report import Tally
    from publisher.watch import WatchOptions, watch

    options = WatchOptions(count=args.count, idle_timeout=args.idle_timeout)
    tally = Tally(load_labels(args.labels) if args.labels is not None else None)
    # Live figures go where the report goes, unless the report is JSON for a program.
    with LiveView(sys.stderr if args.json else sys.stdout, interval=args.interval) as view:
        stopped_by, seconds = watch(
            _project(args, env),
            args.subscription,
            options,
            tally,
            emulator_host=env.emulator_host,
            display=view,
        )
    report = {**tally.summary(), "stopped_by": stopped_by, "seconds": round(seconds, 3)}
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        print(format_report(report))
    if stopped_by == "interrupt":
        return 130
    if tally.total == 0:
        print(
            f"error: no verdict arrived on {args.subscription} within {args.idle_timeout:g} s",
            file=sys.stderr,
        )
        return 1
    if args.count is not None and tally.total < args.count:
        print(
            f"error: --count: expected {args.count:,} verdicts, got {tally.total:,} before "
            f"{args.idle_timeout:g} s without one",
            file=sys.stderr,
        )
        return 1
    return 0


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"severity": record.levelname, "message": record.getMessage()}
        return orjson.dumps(entry).decode()


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging()
    env = Environment.read()
    commands = {"simulate": run_simulate, "republish": run_republish, "watch": run_watch}
    try:
        return commands[args.command](args, env)
    except PublisherError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
