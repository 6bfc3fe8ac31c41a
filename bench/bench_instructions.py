"""Detection cost in instructions and cache misses, against the original, under cachegrind.

Usage: .venv/bin/python bench/bench_instructions.py [--quick] [--count N]

Wall and CPU times drift with the load of a shared machine; the instructions a transaction
executes do not. This script runs bench_detect's stream through the blog post's original
function and through `Service.on_transaction` (the same configurations as bench_detect's
first rows) under ``valgrind --tool=cachegrind --cache-sim=yes``, each in its own process,
twice: over a first block of transactions, then over that block plus N more. The difference
is what N transactions cost, start-up and imports excluded: instructions (``I refs``), and
misses of the simulated first-level instruction and data caches (``I1``, ``D1``) and of the
last level (``LL``). The garbage collector is off in both runs, so the difference does not
depend on when a collection happens to fall.

Needs valgrind (Debian package ``valgrind``). ``--quick`` is the smoke test.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _report  # noqa: E402

#: name -> (function, model, state), as bench_detect builds them.
CONFIGS = {
    "original (json.loads, amount > 1000, json.dumps)": ("original", None, True),
    "detector, default ruleset, memory state": ("detector", None, True),
    "detector, default ruleset, no model": ("detector", "none", True),
    "detector, default ruleset, no model, no state store": ("detector", "none", False),
}
COUNTERS = {"I": r"I\s+refs:", "I1": r"I1\s+misses:", "D1": r"D1\s+misses:", "LL": r"LL misses:"}


def drive(name: str, warm: int, count: int, customers: int, measured: bool) -> None:
    """Child process: warm (+ count if measured) transactions of one configuration.

    Both runs generate the same warm + count envelopes, so the difference is only the work.
    """
    import bench_detect

    kind, model, state = CONFIGS[name]
    envelopes = bench_detect.envelopes(warm + count, customers)
    if not measured:
        envelopes = envelopes[:warm]
    if kind == "original":
        run = bench_detect.load_original().handle
    else:
        config = bench_detect.detector_config(name, None, model=model, state=state)
        run = config.run
    gc.disable()
    for envelope in envelopes:
        run(envelope)


def counters(name: str, warm: int, count: int, customers: int, measured: bool) -> dict[str, int]:
    """Cachegrind's totals for one child run."""
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=yes",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--child",
        name,
        "--warm",
        str(warm),
        "--count",
        str(count),
        "--customers",
        str(customers),
        *(["--measured"] if measured else []),
    ]
    # A fixed hash seed: both runs of a configuration then build the same dicts and sets, so
    # their difference is the measured transactions' work, not a different string hashing.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run(
        command, capture_output=True, text=True, check=True, cwd=ROOT, env=env
    ).stderr
    found = {}
    for key, pattern in COUNTERS.items():
        match = re.search(pattern + r"\s+([\d,]+)", out)
        if match is None:
            raise RuntimeError(f"no {key} count in cachegrind's output:\n{out[-2000:]}")
        found[key] = int(match.group(1).replace(",", ""))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke test)")
    parser.add_argument("--count", type=int, default=4_000, help="transactions measured")
    parser.add_argument("--warm", type=int, default=2_000, help="transactions before them")
    parser.add_argument("--customers", type=int, default=2_000, help="simulated customers")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--measured", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        drive(args.child, args.warm, args.count, args.customers, args.measured)
        return
    if shutil.which("valgrind") is None:
        sys.exit("bench_instructions.py needs valgrind (apt-get install valgrind)")
    warm, count, customers = (
        (20, 200, 20) if args.quick else (args.warm, args.count, args.customers)
    )
    names = list(CONFIGS)[:2] if args.quick else list(CONFIGS)
    jobs = [(name, measured) for name in names for measured in (False, True)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        totals = dict(
            zip(
                jobs,
                pool.map(lambda job: counters(job[0], warm, count, customers, job[1]), jobs),
                strict=True,
            )
        )
    per = {
        name: {
            key: (totals[name, True][key] - totals[name, False][key]) / count for key in COUNTERS
        }
        for name in names
    }
    base = per[names[0]]
    print(_report.header("Detection cost in instructions (bench/bench_instructions.py)"))
    print(
        f"bench_detect's stream ({customers:,} customers); each configuration run under "
        f"cachegrind over {warm:,} transactions, then over {warm:,} + {count:,}: the difference, "
        "per transaction. Garbage collector off. Simulated caches: cachegrind's defaults for "
        "this CPU.\n"
    )
    rows = []
    for name in names:
        cost = per[name]
        rows.append(
            [
                name,
                f"{cost['I'] / 1000:,.1f}k",
                f"{cost['I'] / base['I']:.2f}x",
                f"{cost['I1']:,.0f}",
                f"{cost['I1'] / base['I1']:.2f}x",
                f"{cost['D1']:,.0f}",
                f"{cost['D1'] / base['D1']:.2f}x",
                f"{cost['LL']:,.0f}",
            ]
        )
    print(
        _report.table(
            [
                "configuration",
                "instructions",
                "vs original",
                "I1 misses",
                "vs original",
                "D1 misses",
                "vs original",
                "LL misses",
            ],
            rows,
        )
    )
    ratio = per[names[1]]["I"] / base["I"]
    print(f"\nInstructions, default ruleset with memory state, against the original: {ratio:.2f}x")


if __name__ == "__main__":
    main()
