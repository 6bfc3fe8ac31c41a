"""Tail latency of detect_fraud in process: what stalls one transaction, and for how long.

Usage: .venv/bin/python bench/bench_pauses.py [--quick] [--count N] [--customers N]

A p99 measured end to end (bench_e2e.py) moves when one transaction stalls for tens of ms:
every message in flight waits with it. This script finds such stalls where they happen. It
feeds bench_detect's stream (the simulator with merchant, country, channel... added) through
`Service.on_transaction` with a `MemorySink`, default ruleset and model, state in memory,
one transaction at a time, and records each call's wall time and each garbage collection
(`gc.callbacks`). Each collector policy runs in a fresh process, on the same transactions:

- ``default``: CPython's collector as configured out of the box;
- ``function``: the policy `detector/main.py` installs (`bound_collector_pauses`: freeze
  what survives each full collection);
- ``off``: no cyclic collection at all, which shows the stalls that are not the collector's.

``--quick`` is the smoke test (tests/test_bench_smoke_pauses.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _report  # noqa: E402

POLICIES = ("default", "function", "off")


def measure(policy: str, count: int, customers: int) -> dict[str, Any]:
    """Run the stream under one collector policy in this process; latencies in seconds."""
    import bench_detect

    from detector.functions.runtime import bound_collector_pauses

    envelopes = bench_detect.envelopes(count, customers)
    config = bench_detect.detector_config(policy, None)
    assert config.sink is not None
    pauses: list[tuple[int, float]] = []
    started = [0.0]

    def watch(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - started[0]))

    if policy == "function":
        bound_collector_pauses()
    elif policy == "off":
        gc.disable()
    pauses.clear()  # the start-up collection of "function" is not a transaction's
    gc.callbacks.insert(0, watch)
    run, messages = config.run, config.sink.messages
    clock = time.perf_counter
    latencies = []
    for envelope in envelopes:
        start = clock()
        run(envelope)
        latencies.append(clock() - start)
        messages.clear()
    gc.callbacks.remove(watch)
    full = [seconds for generation, seconds in pauses if generation == 2]
    return {
        "policy": policy,
        "latencies": latencies,
        "full_collections": full,
        "collections": len(pauses),
        "collector_seconds": sum(seconds for _, seconds in pauses),
        "tracked": len(gc.get_objects()),
        "frozen": gc.get_freeze_count(),
    }


def row(result: dict[str, Any], threshold: float) -> list[object]:
    latencies = sorted(result["latencies"])
    full = result["full_collections"]

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.2f}"

    return [
        result["policy"],
        len(latencies),
        ms(_report.percentile(latencies, 50)),
        ms(_report.percentile(latencies, 99)),
        ms(_report.percentile(latencies, 99.9)),
        ms(latencies[-1]),
        sum(1 for value in latencies if value > threshold),
        len(full),
        ms(max(full)) if full else "-",
        f"{result['collector_seconds'] * 1e3:.0f}",
        f"{result['tracked']:,}",
        f"{result['frozen']:,}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke test)")
    parser.add_argument("--count", type=int, default=100_000, help="transactions per policy")
    parser.add_argument("--customers", type=int, default=5_000, help="simulated customers")
    parser.add_argument("--policy", choices=POLICIES, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    count, customers = (600, 50) if args.quick else (args.count, args.customers)
    if args.policy:
        print(json.dumps(measure(args.policy, count, customers)))
        return
    results = []
    for policy in POLICIES:
        child = [sys.executable, __file__, "--policy", policy, "--count", str(count)]
        child += ["--customers", str(customers)]
        out = subprocess.run(child, capture_output=True, text=True, check=True, cwd=ROOT)
        results.append(json.loads(out.stdout.splitlines()[-1]))
    print(_report.header("Stalls of detect_fraud in process (bench/bench_pauses.py)"))
    print(
        f"{count:,} transactions of bench_detect's stream ({customers:,} customers), one "
        "at a time through Service.on_transaction (default ruleset and model, memory state), "
        "each collector policy in a fresh process. Latency in ms.\n"
    )
    threshold = 0.010
    print(
        _report.table(
            [
                "collector",
                "transactions",
                "p50",
                "p99",
                "p99.9",
                "max",
                "calls over 10 ms",
                "full collections",
                "longest full collection",
                "collector ms in all",
                "tracked objects at end",
                "frozen objects at end",
            ],
            [row(result, threshold) for result in results],
        )
    )
    by_policy = {result["policy"]: result for result in results}
    worst = max(by_policy["function"]["latencies"])
    print(
        f"\nLongest stall under the function's policy: {worst * 1e3:.1f} ms "
        f"(out of the box: {max(by_policy['default']['latencies']) * 1e3:.1f} ms)"
    )


if __name__ == "__main__":
    main()
