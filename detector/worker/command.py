"""`python -m detector worker`: the command line of the streaming-pull worker.

    python -m detector worker --subscription NAME [--feedback-subscription NAME] \\
        [--batch-size N] [--batch-wait DURATION] [--max-messages N] [--max-bytes N] \\
        [--log-interval DURATION] [--drain-timeout DURATION] [--lease DURATION]

The environment is the functions' (`detector.functions.Settings`): GOOGLE_CLOUD_PROJECT,
PUBSUB_EMULATOR_HOST, RESULTS_TOPIC, DEAD_LETTER_TOPIC, FEEDBACK_DEAD_LETTER_TOPIC, RULES_FILE,
MODEL_PATH, REDIS_URL, PUBLISH_TIMEOUT; with PORT set, GET /healthz is served there.
SIGTERM and SIGINT drain and exit 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Mapping

from detector import logs
from detector.errors import ConfigError
from detector.functions import Settings, bound_collector_pauses, build_service
from detector.vocabulary import parse_duration
from detector.worker.options import WorkerOptions
from detector.worker.runner import Worker

__all__ = ["add_worker", "options_from"]

_DEFAULTS = WorkerOptions(subscription="")


def options_from(args: argparse.Namespace, environ: Mapping[str, str]) -> WorkerOptions:
    """The worker's options from parsed flags and PORT.

    Raises:
        ConfigError: a flag or PORT is out of range or not in the duration grammar.
    """
    port_text = environ.get("PORT")
    try:
        port = int(port_text) if port_text else None
    except ValueError:
        raise ConfigError(f"PORT: must be a TCP port number, got {port_text!r}") from None
    return WorkerOptions(
        subscription=args.subscription,
        feedback_subscription=args.feedback_subscription,
        batch_size=args.batch_size,
        batch_wait=parse_duration(args.batch_wait, setting="--batch-wait"),
        max_messages=args.max_messages,
        max_bytes=args.max_bytes,
        log_interval=parse_duration(args.log_interval, setting="--log-interval"),
        drain_timeout=parse_duration(args.drain_timeout, setting="--drain-timeout"),
        lease=parse_duration(args.lease, setting="--lease"),
        port=port,
    )


def _run(args: argparse.Namespace) -> int:
    logs.configure()
    options = options_from(args, os.environ)
    service = build_service(Settings.from_env())
    worker = Worker(service, options)
    bound_collector_pauses()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    worker.run(stop)
    return 0


def add_worker(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `worker` to the `python -m detector` parser."""
    parser = commands.add_parser(
        "worker",
        help="decide transactions from a pull subscription (streaming pull, micro-batches)",
        description="Pull transactions (and labels) from Pub/Sub subscriptions, decide them in "
        "micro-batches and publish verdicts and dead letters as detect_fraud does, with the "
        "same environment. Durations are seconds or a number with a unit: 0.02s, 90s, 1m.",
    )
    parser.add_argument(
        "--subscription",
        required=True,
        help="pull subscription of the transactions (name in GOOGLE_CLOUD_PROJECT, or "
        "projects/P/subscriptions/S)",
    )
    parser.add_argument(
        "--feedback-subscription", help="pull subscription of the fraud labels (default: none)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=_DEFAULTS.batch_size,
        help="transactions decided together at most, one state store call (default %(default)s)",
    )
    parser.add_argument(
        "--batch-wait",
        default=f"{_DEFAULTS.batch_wait:g}s",
        help="longest a message waits for its batch to fill (default %(default)s)",
    )
    parser.add_argument(
        "--max-messages",
        type=int,
        default=_DEFAULTS.max_messages,
        help="flow control: messages received and not yet acked (default %(default)s)",
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=_DEFAULTS.max_bytes,
        help="flow control: bytes of those messages (default %(default)s)",
    )
    parser.add_argument(
        "--log-interval",
        default=f"{_DEFAULTS.log_interval:g}s",
        help="seconds between progress lines (default %(default)s)",
    )
    parser.add_argument(
        "--drain-timeout",
        default=f"{_DEFAULTS.drain_timeout:g}s",
        help="on SIGTERM, time to finish what is held before exiting (default %(default)s)",
    )
    parser.add_argument(
        "--lease",
        default=f"{_DEFAULTS.lease:g}s",
        help="ack deadline asked for and extended while a message is held; what a dead "
        "worker held comes back after at most this long (10s..600s, default %(default)s)",
    )
    parser.set_defaults(run=_run)
