"""The offline tools' command lines: `python -m detector replay` and `train`.

    python -m detector replay --input tx.jsonl --output verdicts.jsonl \\
        [--labels labels.jsonl --label-delay 7d] [--rules FILE] [--model MODEL|none] \\
        [--until TIME] [--workers N|auto]
    python -m detector train --input tx.jsonl --labels labels.jsonl --until 2018-08-01 \\
        [--since 2018-05-01] [--label-delay 7d] --out model.json [--version NAME]

Durations (``--label-delay``) are written as everywhere: ``7d``, ``12h``, ``90s``, ``0``.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from detector.config import (
    DetectorConfig,
    build_detector,
    load_risk_model,
    load_rules,
    state_config,
)
from detector.engine import Detector
from detector.errors import InputError
from detector.model.trees import STATES
from detector.offline.labels import parse_time, read_labels
from detector.offline.parallel import replay_file, workers_for
from detector.offline.replay import open_input, open_output, replay_path, summary
from detector.offline.train import Params, train
from detector.state import open_store
from detector.vocabulary import parse_duration

__all__ = ["add_replay", "add_train", "offline_detector"]


def offline_detector(rules: Path | None, model: str | None) -> Detector:
    """A detector with a fresh memory store, the given (or default) rules and model.

    The store's windows are the live function's: the defaults plus the model's.
    """
    return build_detector(DetectorConfig(rules_file=rules, model_path=model))


def _replay(args: argparse.Namespace) -> int:
    """`python -m detector replay`."""
    labels = read_labels(args.labels) if args.labels else None
    delay = parse_duration(args.label_delay, setting="--label-delay")
    until = parse_time(args.until) if args.until else None
    if args.redis_url is not None:
        return _replay_on_redis(args, labels, delay, until)
    detector = offline_detector(args.rules, args.model)
    workers = workers_for(args.input, args.workers)
    if workers > 1 and args.input.is_file():
        if args.output is not None:
            open_output(args.output).close()
        open_input(args.input).close()
        outcome, problems = replay_file(
            detector,
            args.input,
            args.output,
            workers,
            labels=labels,
            label_delay=delay,
            until=until,
        )
        for problem in problems:
            print(f"replay: not exact on {workers} processes: {problem}", file=sys.stderr)
        if problems:
            print("replay: replayed in one process instead", file=sys.stderr)
        print(summary(outcome))
        return 0

    print(summary(replay_path(detector, args.input, args.output, labels, delay, until)))
    return 0


#: Transactions a replay on Redis decides per round trip (`Replayer.batch`).
REDIS_BATCH = 200


def _replay_on_redis(
    args: argparse.Namespace,
    labels: Mapping[str, bool] | None,
    delay: float,
    until: datetime | None,
) -> int:
    """Replay in this process with state in Redis, under a key prefix of its own.

    The prefix is new for each run and its keys are deleted at the end, so the file gets the
    verdicts it gets with memory state, whatever else the server holds.
    """
    # Imported here: redis-py costs every other command about 0.2 s of CPU and 17 MB at start
    # (BENCHMARKS.md, "Cold start").
    from detector.state.redis_store import RedisStore

    config = DetectorConfig(rules_file=args.rules, model_path=args.model)
    model = load_risk_model(config)
    store = open_store(state_config(model), args.redis_url, prefix=f"replay-{uuid.uuid4().hex}:")
    assert isinstance(store, RedisStore)  # the tiled one is a subclass
    try:
        store.check()
        detector = Detector(load_rules(config, store.config), store, model)
        outcome = replay_path(
            detector, args.input, args.output, labels, delay, until, batch=REDIS_BATCH
        )
        print(summary(outcome))
    finally:
        store.drop()
        store.close()
    return 0


def _workers(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def add_replay(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `replay` to the `python -m detector` parser."""
    parser = commands.add_parser(
        "replay",
        help="backtest: run the detector over a JSON-lines file of transactions",
        description="Run the detector over transactions in file (event-time) order, injecting "
        "each label when it becomes known; write the verdicts and report precision and recall.",
    )
    parser.add_argument("--input", type=Path, required=True, help="transactions, JSON lines")
    parser.add_argument("--output", type=Path, help="write verdicts here (JSON lines)")
    parser.add_argument("--labels", type=Path, help="ground truth, JSON lines")
    parser.add_argument(
        "--label-delay", default="7d", help="labels become known this long after the transaction"
    )
    parser.add_argument("--rules", type=Path, help="rules file (default: the bundled ruleset)")
    parser.add_argument(
        "--model", help="model artifact (default: the bundled model; 'none' for rules only)"
    )
    parser.add_argument("--until", help="stop at the first transaction at or after this time")
    parser.add_argument(
        "--redis-url",
        help="keep state in this Redis or Valkey (a single node, or any node of a cluster) "
        "instead of memory, under a prefix of the "
        "run's own, deleted at the end; replays in one process",
    )
    parser.add_argument(
        "--workers",
        type=_workers,
        default=None,
        help="processes, each replaying an event-time shard of the file with the same verdicts "
        "(default auto: one per core for files of 8 MB a core and more)",
    )
    parser.set_defaults(run=_replay)


def _train(args: argparse.Namespace) -> int:
    """`python -m detector train`."""
    until = parse_time(args.until)
    since = parse_time(args.since) if args.since else None
    delay = parse_duration(args.label_delay, setting="--label-delay")
    labels = read_labels(args.labels)
    params = Params(
        trees=args.trees,
        leaves=args.leaves,
        max_depth=args.max_depth,
        learning_rate=args.learning_rate,
        min_child_samples=args.min_child_samples,
        seed=args.seed,
    )
    started = time.perf_counter()

    def progress(count: int) -> None:
        print(f"train: replayed {count:,} transactions", file=sys.stderr, flush=True)

    try:
        lines = args.input.open("rb")
    except OSError as error:
        raise InputError(f"--input: cannot read {str(args.input)!r} ({error.strerror})") from None
    with lines:
        model = train(
            lines,
            labels,
            until=until,
            since=since,
            label_delay=delay,
            version=args.version,
            params=params,
            state=args.state,
            progress=progress,
        )
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(model.to_json())
    except OSError as error:
        raise InputError(f"--out: cannot write {str(args.out)!r} ({error.strerror})") from None
    print(
        f"wrote {args.out}: {len(model.trees)} trees, {model.metadata['examples']:,} examples "
        f"({model.metadata['frauds']:,} fraud), in {time.perf_counter() - started:.1f} s"
    )
    return 0


def add_train(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `train` to the `python -m detector` parser."""
    parser = commands.add_parser("train", help="train the risk model from a transaction file")
    parser.add_argument("--input", type=Path, required=True, help="transactions, JSON lines")
    parser.add_argument("--labels", type=Path, required=True, help="ground truth, JSON lines")
    parser.add_argument("--until", required=True, help="train on transactions before this date")
    parser.add_argument("--since", help="first transaction used as an example (default: all)")
    parser.add_argument("--label-delay", default="7d", help="when labels become known (7d)")
    parser.add_argument("--out", type=Path, required=True, help="model artifact to write")
    parser.add_argument("--version", default="custom", help="model version label")
    parser.add_argument("--trees", type=int, default=Params.trees, help="boosting rounds")
    parser.add_argument("--leaves", type=int, default=Params.leaves, help="leaves per tree")
    parser.add_argument("--max-depth", type=int, default=Params.max_depth, help="tree depth")
    parser.add_argument(
        "--learning-rate", type=float, default=Params.learning_rate, help="shrinkage"
    )
    parser.add_argument(
        "--min-child-samples", type=int, default=Params.min_child_samples, help="leaf size"
    )
    parser.add_argument("--seed", type=int, default=Params.seed, help="random seed")
    parser.add_argument(
        "--state",
        choices=STATES,
        default="tiled",
        help="window features to train on: tiled (default) or exact, as models before tiles",
    )
    parser.set_defaults(run=_train)
