"""Replay throughput: one process against several, on the same file, with the same verdicts.

Usage: .venv/bin/python bench/bench_replay.py [--quick] [--workers 1,2] [--rounds N]
           [--input tx.jsonl --labels labels.jsonl] [--until 2018-08-14] [--label-delay 7d]
           [--models default,other.json]

Without --input it replays the handbook-scale simulation in out/rp/ (5,000 customers, 10,000
terminals, 183 days; written by ``python -m publisher simulate`` the first time), up to
2018-08-14 as the handbook benchmark does: 1.3 million transactions, the bundled model and
rules, labels 7 days late. Each run is ``python -m detector replay ... --workers W`` in a
fresh process; rounds alternate the worker counts. The table gives the rate the replay
reports (transactions per wall second of the replay itself, after loading the labels), the
rate per CPU second, the peak resident memory of the largest process, and whether the
verdicts are byte-identical to the first run's of the same model. ``--models`` replays with
each model in turn (``default`` is the bundled one): a model trained on exact windows runs the
exact memory store, so the table compares the stores in one run. Issue #4 asks for 20,000
transactions/s.

``--quick`` replays a 20-day simulation of 300 customers (the smoke test).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import _report  # noqa: E402

_RATE = re.compile(
    r"transactions: ([0-9,]+) in ([0-9.]+) s \(([0-9,]+)/s; ([0-9,]+)/s of CPU time"
    r"(?:; ([0-9]+) processes)?\)"
)
TARGET = 20_000


def simulate(folder: Path, *options: str) -> tuple[Path, Path]:
    """Transactions and labels from the project's simulator, once."""
    transactions, labels = folder / "tx.jsonl", folder / "labels.jsonl"
    if not (transactions.exists() and labels.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "publisher", "simulate", *options]
        command += ["--out", str(transactions), "--labels", str(labels)]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return transactions, labels


@dataclass
class Run:
    model: str
    workers: int
    processes: int
    transactions: int
    seconds: float
    rate: int
    cpu_rate: int
    peak_mb: float
    digest: str


def run(args: argparse.Namespace, model: str, workers: int, output: Path) -> Run:
    """One replay in a fresh process: its reported rates and its peak memory."""
    command = [
        sys.executable, "-m", "detector", "replay", "--input", str(args.input),
        "--output", str(output), "--labels", str(args.labels),
        "--label-delay", args.label_delay, "--workers", str(workers),
    ]  # fmt: skip
    if args.until:
        command += ["--until", args.until]
    if model != "default":
        command += ["--model", model]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    out = process.stdout.read()
    # wait4: the peak memory of this replay's processes, not of every child so far.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"replay failed ({process.returncode}): {' '.join(command)}")
    match = _RATE.search(out)
    if match is None:
        raise SystemExit(f"no rate in the replay's summary:\n{out}")
    count, seconds, rate, cpu_rate, processes = match.groups()
    return Run(
        model,
        workers,
        int(processes or 1),
        int(count.replace(",", "")),
        float(seconds),
        int(rate.replace(",", "")),
        int(cpu_rate.replace(",", "")),
        usage.ru_maxrss / 1024,
        hashlib.sha256(output.read_bytes()).hexdigest(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a tiny simulation (smoke test)")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each worker count")
    parser.add_argument("--input", type=Path, help="transactions (default: out/rp/tx.jsonl)")
    parser.add_argument("--labels", type=Path, help="labels (default: out/rp/labels.jsonl)")
    parser.add_argument("--until", help="stop time (default 2018-08-14; none with --quick)")
    parser.add_argument("--label-delay", default="7d")
    parser.add_argument(
        "--models", default="default", help="models to replay with, in turn (default: bundled)"
    )
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    scratch = tempfile.TemporaryDirectory(prefix="bench-replay-")
    folder = Path(scratch.name)
    if args.input is None:
        if args.quick:
            args.input, args.labels = simulate(
                folder / "sim", "--customers", "300", "--terminals", "600", "--days", "20"
            )
        else:
            args.input, args.labels = simulate(ROOT / "out" / "rp")
            args.until = args.until or "2018-08-14"
    print(_report.header("Replay throughput (bench/bench_replay.py)"))
    size = args.input.stat().st_size / 1e6
    print(f"- input: {args.input.name}, {size:.0f} MB; until {args.until or 'the end'}")
    print()
    models = [model.strip() for model in args.models.split(",")]
    runs = []
    for _ in range(args.rounds):
        for number, model in enumerate(models):
            for workers in counts:
                result = run(args, model, workers, folder / f"verdicts-{number}-{workers}.jsonl")
                runs.append(result)
                print(
                    f"  {model} --workers {workers}: {result.rate:,} tx/s in {result.seconds} s",
                    file=sys.stderr,
                    flush=True,
                )
    first = {model: next(r for r in runs if r.model == model) for model in models}
    baseline = statistics.mean(
        r.rate for r in runs if r.workers == counts[0] and r.model == models[0]
    )
    rows = [
        (
            Path(r.model).name,
            r.workers,
            r.processes,
            f"{r.transactions:,}",
            r.seconds,
            f"{r.rate:,}",
            f"{r.cpu_rate:,}",
            f"{r.rate / baseline:.2f}x",
            f"{r.peak_mb:.0f}",
            "yes" if r.digest == first[r.model].digest else "NO",
        )
        for r in runs
    ]
    head = ["model", "--workers", "processes", "transactions", "seconds", "tx/s", "tx/s of CPU"]
    vs = f"vs {Path(models[0]).name} {counts[0]}"
    print(_report.table([*head, vs, "peak MB", "same verdicts"], rows))
    best = max(r.rate for r in runs)
    print()
    print(
        f"Target ({TARGET:,} transactions/s): best {best:,}/s, "
        f"{'met' if best >= TARGET else 'not met'}."
    )
    scratch.cleanup()


if __name__ == "__main__":
    main()
