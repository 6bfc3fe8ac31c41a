"""Flat cost in history, in process memory: a merchant after 10 transactions and after many.

    .venv/bin/python bench/bench_flat_cost.py                 # 1,000,000 transactions
    .venv/bin/python bench/bench_flat_cost.py --hot 100000
    .venv/bin/python bench/bench_flat_cost.py --quick         # the smoke test

For each memory store (tiled, the default, with its C entities where `make native` built them
and in Python; the exact store's C histories for comparison) a merchant records 10
transactions, another the `--hot` count, both spread over 20 days so that all of them are in
the 30-day window; then each observes 2,000 more transactions (one a second, also inside the
window, each naming only the merchant and one of seven terminals) and the CPU time per
observe is compared. The issue's target: at most 1.5x for the busy merchant.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detector.state import Event, MemoryStore, StateConfig, StateStore, TiledMemoryStore
from detector.vocabulary import DAY

START = 1_700_000_000.0
LATER = 2_000

STORES: dict[str, tuple[Callable[[], StateStore], bool]] = {
    "tiled, C entities": (TiledMemoryStore, TiledMemoryStore().native),
    "tiled, Python": (lambda: TiledMemoryStore(StateConfig(), native=False), True),
    "exact, C histories": (MemoryStore, MemoryStore().native),
}


def per_observe(make: Callable[[], StateStore], history: int) -> float:
    """CPU µs per observe of a merchant's `LATER` transactions after `history` earlier ones."""
    store = make()
    spacing = 20 * DAY / history
    for i in range(history):
        store.observe(
            Event(f"h{i}", START + i * spacing, 1.0 + i % 97, merchant="busy", terminal=f"t{i % 7}")
        )
    later = [
        Event(f"n{i}", START + 20 * DAY + i, 1.0 + i % 89, merchant="busy", terminal=f"t{i % 7}")
        for i in range(LATER)
    ]
    started = time.process_time()
    for event in later:
        store.observe(event)
    spent = time.process_time() - started
    store.close()
    return spent / LATER * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hot", type=int, default=1_000_000, help="the busy merchant's history")
    parser.add_argument("--quick", action="store_true", help="--hot 20000 (the smoke test)")
    args = parser.parse_args(argv)
    hot = 20_000 if args.quick else args.hot
    print(f"merchant after 10 and after {hot:,} transactions in 20 days; {LATER:,} observes each")
    for name, (make, built) in STORES.items():
        if not built:
            print(f"{name}: not built (make native)")
            continue
        few, many = per_observe(make, 10), per_observe(make, hot)
        print(
            f"{name}: {few:.1f} µs per observe after 10, {many:.1f} µs after {hot:,}: "
            f"{many / few:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
