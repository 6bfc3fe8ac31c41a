"""Reproduce the Fraud Detection Handbook benchmark from scratch: simulate, train, replay, evaluate.

Usage: .venv/bin/python bench/handbook.py [--quick] [--out DIR] [--fresh]

1. simulate the book's dataset with the publisher's simulator at book defaults (5,000
   customers, 10,000 terminals, 183 days from 2018-04-01; cached in DIR, default
   out/handbook/, unless --fresh);
2. train: `detector.offline.train` replays the stream (labels known 7 days after each transaction)
   and fits on the transactions from 2018-05-01 to 2018-07-31 (the book uses only
   2018-07-25..31; more history is allowed);
3. replay: `detector.offline.replay` scores every transaction online with that model (the same code
   path as the functions: decode, state, model, rules) up to the end of the test week;
4. evaluate on 2018-08-08..14, leaving out cards already known compromised (frauds from
   2018-07-25 on, each day of the delay period as it becomes known): AUC ROC, average
   precision, card precision@100 (`detector.offline.evaluate.handbook_protocol`).

Prints progress on stderr and a Markdown table (ours beside the book's) on stdout.
``--quick`` runs a tiny population over 8 weeks (the smoke test uses it): the numbers are
meaningless, the pipeline is the same.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from detector.offline.commands import offline_detector
from detector.offline.evaluate import Metrics, handbook_protocol, scored_from_verdicts
from detector.offline.labels import read_labels
from detector.offline.replay import replay
from detector.offline.train import Params, train
from publisher.simulate import SimulationConfig, records

UTC = dt.UTC
#: The book's best results on this protocol (Le Borgne et al., chapter 6 summary tables).
BOOK = [
    ("Handbook: logistic regression", 0.871, 0.606, 0.291),
    ("Handbook: best (ensembles, XGBoost)", 0.879, 0.687, 0.305),
]


@dataclass(frozen=True)
class Plan:
    """Dates and scale of one run."""

    config: SimulationConfig
    train_since: dt.datetime
    train_until: dt.datetime
    known_since: dt.datetime  # first day whose frauds count as known compromised cards
    delay_days: int = 7
    test_days: int = 7
    params: Params = field(default_factory=Params)

    @property
    def test_end(self) -> dt.datetime:
        return self.train_until + dt.timedelta(days=self.delay_days + self.test_days)


def _at(year: int, month: int, day: int) -> dt.datetime:
    return dt.datetime(year, month, day, tzinfo=UTC)


def plan(quick: bool) -> Plan:
    if quick:
        return Plan(
            config=SimulationConfig(
                customers=100,
                terminals=200,
                days=49,
                start=dt.date(2018, 6, 27),
                terminals_compromised_per_day=0.5,
                customers_compromised_per_day=0.5,
            ),
            train_since=_at(2018, 7, 12),
            train_until=_at(2018, 8, 1),
            known_since=_at(2018, 7, 25),
            params=Params(trees=20, leaves=8, max_depth=4, min_child_samples=10),
        )
    return Plan(
        config=SimulationConfig(),
        train_since=_at(2018, 5, 1),
        train_until=_at(2018, 8, 1),
        known_since=_at(2018, 7, 25),
    )


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def simulate(config: SimulationConfig, transactions: Path, labels: Path) -> None:
    log(f"simulate: {config.customers} customers, {config.terminals} terminals, {config.days} days")
    transactions.parent.mkdir(parents=True, exist_ok=True)
    partial_tx = transactions.with_suffix(".partial")
    partial_labels = labels.with_suffix(".partial")
    count = 0
    with partial_tx.open("wb") as tx_out, partial_labels.open("wb") as label_out:
        for record in records(config):
            tx_out.write(record.data + b"\n")
            label_out.write(record.label_json() + b"\n")
            count += 1
            if count % 500_000 == 0:
                log(f"simulate: {count:,} transactions")
    partial_tx.replace(transactions)
    partial_labels.replace(labels)
    log(f"simulate: {count:,} transactions written to {transactions}")


class TimedModel:
    """Wraps the replay's model to measure the CPU time of scoring alone."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.version = model.version
        self.variables = model.variables
        self.calls = 0
        self.seconds = 0.0

    def score(self, activation: Any) -> Any:
        started = time.process_time()
        result = self.model.score(activation)
        self.seconds += time.process_time() - started
        self.calls += 1
        return result


def cold_start(model_path: Path) -> float:
    """Milliseconds for a fresh interpreter to import the scoring code and load the model."""
    code = (
        "import time; t = time.perf_counter(); from detector.model import load_model; "
        f"load_model({str(model_path)!r}); print(time.perf_counter() - t)"
    )
    root = Path(__file__).resolve().parent.parent
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=root
            ).stdout
        )
        for _ in range(3)
    ]
    return min(runs) * 1000


def run(quick: bool, out: Path, fresh: bool) -> tuple[Metrics, dict[str, float]]:
    chosen = plan(quick)
    timings: dict[str, float] = {}
    transactions = out / "transactions.jsonl"
    labels_path = out / "labels.jsonl"
    stamp = out / "simulation.json"
    wanted = orjson.dumps(repr(chosen.config))
    started = time.perf_counter()
    if fresh or not transactions.exists() or not stamp.exists() or stamp.read_bytes() != wanted:
        simulate(chosen.config, transactions, labels_path)
        stamp.write_bytes(wanted)
    else:
        log(f"simulate: reusing {transactions} (--fresh to regenerate)")
    timings["simulate"] = time.perf_counter() - started

    labels = read_labels(labels_path)
    delay = chosen.delay_days * 86400.0

    started = time.perf_counter()
    log(
        f"train: replaying until {chosen.train_until:%Y-%m-%d}, examples from {chosen.train_since:%Y-%m-%d}"
    )
    with transactions.open("rb") as lines:
        model = train(
            lines,
            labels,
            until=chosen.train_until,
            since=chosen.train_since,
            label_delay=delay,
            version=f"handbook-{chosen.train_until:%Y-%m-%d}-tiles{'-quick' if quick else ''}",
            params=chosen.params,
            progress=lambda n: log(f"train: {n:,} transactions replayed"),
        )
    model_path = out / "model.json"
    model_path.write_bytes(model.to_json())
    timings["train"] = time.perf_counter() - started
    log(f"train: {len(model.trees)} trees, {model.metadata['examples']:,} examples -> {model_path}")

    started = time.perf_counter()
    detector = offline_detector(None, str(model_path))
    timed = TimedModel(detector.model)
    detector.model = timed
    verdicts_path = out / "verdicts.jsonl"
    log(f"replay: scoring online until {chosen.test_end:%Y-%m-%d}")
    with transactions.open("rb") as lines, verdicts_path.open("wb") as sink:
        outcome = replay(
            detector,
            lines,
            sink.write,
            labels=labels,
            label_delay=delay,
            until=chosen.test_end,
            progress=lambda n: log(f"replay: {n:,} transactions"),
        )
    timings["replay"] = time.perf_counter() - started
    timings["replay_rate"] = outcome.rate
    timings["replay_cpu_rate"] = outcome.cpu_rate
    timings["score_us"] = timed.seconds / max(timed.calls, 1) * 1e6
    timings["cold_start_ms"] = cold_start(model_path)
    timings["model_kb"] = model_path.stat().st_size / 1024
    log(f"replay: {outcome.transactions:,} verdicts at {outcome.rate:,.0f}/s -> {verdicts_path}")

    started = time.perf_counter()
    with verdicts_path.open("rb") as lines:
        verdicts = (orjson.loads(line) for line in lines)
        result = handbook_protocol(
            scored_from_verdicts(verdicts, labels, "customer_id"),
            train_start=chosen.known_since,
            train_end=chosen.train_until,
            delay_days=chosen.delay_days,
            test_days=chosen.test_days,
        )
    timings["evaluate"] = time.perf_counter() - started
    return result, timings


def table(result: Metrics) -> str:
    rows = [
        "| Model | AUC ROC | Average precision | Card precision@100 |",
        "| --- | ---: | ---: | ---: |",
    ]
    rows.extend(f"| {name} | {auc:.3f} | {ap:.3f} | {cp:.3f} |" for name, auc, ap, cp in BOOK)
    rows.append(
        f"| **Ours: online replay, LightGBM exported to pure Python** | "
        f"**{result.auc_roc:.3f}** | **{result.average_precision:.3f}** | "
        f"**{result.card_precision_at_100:.3f}** |"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny scale (smoke test)")
    parser.add_argument("--out", type=Path, help="work folder (default out/handbook[-quick])")
    parser.add_argument("--fresh", action="store_true", help="simulate again even if cached")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    out = args.out or root / "out" / ("handbook-quick" if args.quick else "handbook")
    started = time.perf_counter()
    result, timings = run(args.quick, out, args.fresh)
    wall = time.perf_counter() - started
    print(table(result))
    print()
    print(
        f"Test set: {result.transactions:,} transactions, {result.frauds:,} fraud, "
        f"{result.excluded_cards:,} cards known compromised before or during the test."
    )
    print(
        f"Wall time {wall:.0f} s (simulate {timings['simulate']:.0f} s, train "
        f"{timings['train']:.0f} s, replay {timings['replay']:.0f} s at "
        f"{timings['replay_rate']:,.0f} tx/s wall, {timings['replay_cpu_rate']:,.0f} tx/s "
        f"of CPU time, evaluate {timings['evaluate']:.0f} s) on "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{platform.machine()}, load average {os.getloadavg()[0]:.1f} at the end."
    )
    print(
        f"Model: {timings['model_kb']:.0f} KB artifact; scoring {timings['score_us']:.1f} us of "
        f"CPU per transaction (with attribution); import + load {timings['cold_start_ms']:.0f} ms."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
