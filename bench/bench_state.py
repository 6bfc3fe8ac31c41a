"""Benchmark of the state stores on a synthetic stream at fraud-handbook scale.

The default run follows the Fraud Detection Handbook's simulated data: 5,000 customers,
10,000 terminals, about 9,500 transactions a day for 183 days (1.75 M). Each transaction names
a customer, the customer's card and a terminal; 1 % arrive up to 10 minutes late; 0.8 % are
later labelled fraudulent. Events are generated a day at a time outside the timed section.

    .venv/bin/python bench/bench_state.py            # memory store, full scale
    .venv/bin/python bench/bench_state.py --redis    # also Redis on a throwaway redis-server
    .venv/bin/python bench/bench_state.py --quick    # seconds: the smoke test

Prints per-event cost of observe() and record_label(), throughput, and memory. Each memory
store runs in a process of its own (forked, so peak RSS is its own): the tiled store (the
default, `detector.state.memory_tiled`) and the exact one, each with its C part where `make
native` built it and in Python (as in a Cloud Functions upload), with the ratios. Memory per
retained transaction is the process's peak RSS less its RSS before the stream, over the
transactions the retention holds at the end (30 days and an hour of them).

    .venv/bin/python bench/bench_state.py --stores tiled-c,exact-c   # only these
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detector.errors import TransientError
from detector.state import (
    Event,
    MemoryStore,
    StateConfig,
    StateStore,
    TiledMemoryStore,
    feature_names,
    open_store,
)
from detector.vocabulary import DAY
from stack.services import redis_server

START = 1_700_000_000.0


@dataclass(frozen=True)
class Scale:
    customers: int
    terminals: int
    per_day: int
    days: int


FULL = Scale(customers=5_000, terminals=10_000, per_day=9_500, days=183)
QUICK = Scale(customers=500, terminals=1_000, per_day=2_000, days=10)


def day_events(rng: random.Random, scale: Scale, day: int, homes: list[list[int]]) -> list[Event]:
    """One day's transactions in arrival order: sorted by time, 1 % up to 10 min late."""
    base = START + day * DAY
    times = sorted(rng.uniform(0, DAY) for _ in range(scale.per_day))
    events = []
    for n, offset in enumerate(times):
        customer = rng.randrange(scale.customers)
        stamp = base + offset
        if rng.random() < 0.01:
            stamp -= rng.uniform(0, 600)
        events.append(
            Event(
                transaction_id=f"{day}-{n}",
                timestamp=stamp,
                amount=round(rng.lognormvariate(3.5, 1.0), 2),
                customer=f"C{customer}",
                card=f"K{customer}",
                terminal=f"T{rng.choice(homes[customer])}",
            )
        )
    return events


@dataclass
class Result:
    store: str
    events: int
    observe_seconds: float
    labels: int
    label_seconds: float
    peak_rss_mb: float
    #: Peak RSS less the RSS before the stream, and the transactions retained at the end.
    grown_mb: float = 0.0
    retained: int = 0
    #: Bytes the store's own structures hold at the end, by part (`held_bytes`).
    held: dict[str, int] | None = None

    def report(self) -> str:
        per_event = self.observe_seconds / self.events * 1e6
        per_label = self.label_seconds / self.labels * 1e6 if self.labels else 0.0
        memory = f"peak RSS {self.peak_rss_mb:.0f} MB"
        if self.retained:
            per_tx = self.grown_mb * 1024 * 1024 / self.retained
            memory += (
                f", +{self.grown_mb:.0f} MB over the stream, {per_tx:,.0f} bytes per "
                f"retained transaction ({self.retained:,})"
            )
        line = (
            f"{self.store}: {self.events} events, observe {per_event:.1f} us/event "
            f"({self.events / self.observe_seconds:,.0f} events/s), "
            f"record_label {per_label:.1f} us/label ({self.labels} labels), {memory}"
        )
        if self.held and self.retained:
            parts = ", ".join(
                f"{part} {size / self.retained:,.0f}" for part, size in self.held.items()
            )
            total = sum(self.held.values()) / self.retained
            line += (
                f"\n{self.store}: held, bytes per retained transaction: {parts}; total {total:,.0f}"
            )
        return line


#: The memory stores by name: how to build one, and whether its C part is built here.
MEMORY_STORES: dict[str, tuple[Callable[[StateConfig], StateStore], bool]] = {
    "tiled-c": (TiledMemoryStore, TiledMemoryStore().native),
    "tiled-python": (lambda config: TiledMemoryStore(config, native=False), True),
    "exact-c": (MemoryStore, MemoryStore().native),
    "exact-python": (lambda config: MemoryStore(config, native=False), True),
}


def _rss_mb() -> float:
    """This process's resident set size now, in MB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def held_bytes(store: StateStore) -> dict[str, int] | None:
    """Where a tiled store's memory is at the end, without the allocator's slack: its C
    entities per kind (`__sizeof__`, arrays included), the label index (its dict, entry
    tuples and timestamps) and the transaction ids both hold. None for the other stores
    (a Python entity's lists would need a deep walk)."""
    if not isinstance(store, TiledMemoryStore) or not store.native:
        return None
    held = {
        kind: sum(sys.getsizeof(entity) for entity in entities.values()) + sys.getsizeof(entities)
        for kind, entities in store._entities.items()
        if entities
    }
    index = store._index
    held["label index"] = sys.getsizeof(index) + sum(
        sys.getsizeof(entry) + sys.getsizeof(entry[0]) for entry in index.values()
    )
    held["transaction ids"] = sum(sys.getsizeof(txid) for txid in index)
    return held


def _run_memory(name: str, config: StateConfig, scale: Scale, seed: int, needed: Any) -> Result:
    """`run` on a fresh memory store, with how much the process grew (in a forked child)."""
    before = _rss_mb()
    store = MEMORY_STORES[name][0](config)
    result = run(store, name, scale, seed, needed)
    result.held = held_bytes(store)
    result.grown_mb = result.peak_rss_mb - before
    retained_days = min(scale.days, math.ceil(config.keep / DAY))
    result.retained = round(scale.per_day * min(retained_days, config.keep / DAY))
    return result


def run_apart(name: str, config: StateConfig, scale: Scale, seed: int, needed: Any) -> Result:
    """`_run_memory` in a forked process of its own, so that peak RSS is this store's."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(_run_memory, (name, config, scale, seed, needed))


def run(
    store: StateStore,
    name: str,
    scale: Scale,
    seed: int,
    needed: frozenset[str] | None,
    clock: Callable[[], float] = time.process_time,
) -> Result:
    """Feed the stream through store.observe, timing observe and labels separately.

    The memory store is timed in CPU time (the machine may be shared); Redis in wall time,
    which includes the round trip and the server's work.
    """
    rng = random.Random(seed)
    homes = [
        [rng.randrange(scale.terminals) for _ in range(rng.randint(5, 20))]
        for _ in range(scale.customers)
    ]
    observe_time = label_time = 0.0
    events = labels = 0
    pending: list[str] = []
    checked = False
    for day in range(scale.days):
        batch = day_events(rng, scale, day, homes)
        observe = store.observe
        started = clock()
        for event in batch:
            observe(event, needed)
        observe_time += clock() - started
        events += len(batch)
        if not checked and day >= 1:
            features = store.observe(batch[-1], needed)  # a redelivery: sanity check
            if features["customer"].get("count_30d", 1.0) < 0:
                raise TransientError("negative count")
            checked = True
        # Yesterday's fraud reports arrive today.
        started = clock()
        for txid in pending:
            store.record_label(txid, True)
        label_time += clock() - started
        labels += len(pending)
        pending = [e.transaction_id for e in batch if rng.random() < 0.008]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Result(name, events, observe_time, labels, label_time, peak)


def reference_ns() -> float:
    """CPU ns per dict item store in a plain loop: how fast Python runs here right now.

    Printed with the results so runs on a busy (shared) machine can be compared; an idle
    machine gives lower numbers.
    """
    keys = tuple(f"feature_{i}" for i in range(40))
    best = math.inf
    for _ in range(5):
        started = time.process_time()
        for _ in range(5_000):
            out = {}
            for key in keys:
                out[key] = 1.0
        best = min(best, time.process_time() - started)
    return best / (5_000 * len(keys)) * 1e9


@contextlib.contextmanager
def throwaway_redis() -> Iterator[str]:
    """A redis-server without persistence in its own process group, killed on exit."""
    with tempfile.TemporaryDirectory() as workdir, redis_server(Path(workdir)) as url:
        yield url


def server_cost(url: str) -> str:
    """Redis server CPU per script call, from INFO commandstats (the whole server's calls)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    parts = []
    for name in ("evalsha", "eval", "fcall"):
        entry = stats.get(f"cmdstat_{name}")
        if entry:
            parts.append(f"{name} {entry['calls']} calls, {entry['usec_per_call']:.1f} us/call")
    return "redis server CPU: " + ("; ".join(parts) or "no script calls recorded")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small stream: seconds, not minutes")
    parser.add_argument("--days", type=int, help="days of stream (default 183, quick 10)")
    parser.add_argument("--redis", action="store_true", help="also measure the Redis store")
    parser.add_argument("--redis-url", help="measure Redis at this URL instead of a throwaway")
    parser.add_argument("--redis-days", type=int, default=3, help="days fed to Redis (default 3)")
    parser.add_argument(
        "--needed",
        help="comma-separated feature names the rules use (default: all features)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--stores",
        default=",".join(MEMORY_STORES),
        help=f"memory stores to run, comma-separated (default all: {', '.join(MEMORY_STORES)})",
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.stores.split(",") if name.strip()]
    unknown_stores = [name for name in names if name not in MEMORY_STORES]
    if unknown_stores:
        print(f"error: --stores: unknown {unknown_stores}", file=sys.stderr)
        return 2
    scale = QUICK if args.quick else FULL
    if args.days:
        scale = Scale(scale.customers, scale.terminals, scale.per_day, args.days)
    config = StateConfig()
    needed = None
    if args.needed:
        needed = frozenset(name.strip() for name in args.needed.split(","))
        unknown = needed - feature_names(config.windows)
        if unknown:
            print(f"error: --needed: unknown features {sorted(unknown)}", file=sys.stderr)
            return 2
    try:
        print(
            f"stream: {scale.customers} customers, {scale.terminals} terminals, "
            f"{scale.per_day}/day for {scale.days} days; entities customer+card+terminal; "
            f"windows {config.windows}; needed={'all' if needed is None else len(needed)}"
        )
        print(
            f"reference: {reference_ns():.0f} ns per dict store (lower means a faster or less busy machine)"
        )
        results = {}
        for name in names:
            if not MEMORY_STORES[name][1]:
                print(f"{name}: not built (make native)", flush=True)
                continue
            results[name] = run_apart(name, config, scale, args.seed, needed)
            print(results[name].report(), flush=True)

        def cost(name: str) -> float:
            return results[name].observe_seconds / results[name].events

        for fast, slow in (
            ("tiled-c", "tiled-python"),
            ("exact-c", "exact-python"),
            ("tiled-c", "exact-c"),
            ("tiled-python", "exact-python"),
        ):
            if fast in results and slow in results:
                print(f"observe: {fast} {cost(slow) / cost(fast):.2f}x as fast as {slow}")
        print(f"reference: {reference_ns():.0f} ns per dict store after the run")
        if args.redis or args.redis_url:
            redis_scale = Scale(
                scale.customers, scale.terminals, scale.per_day, min(args.redis_days, scale.days)
            )
            with contextlib.ExitStack() as stack:
                url = args.redis_url or stack.enter_context(throwaway_redis())
                store = open_store(config, url, prefix=f"bench-{time.time_ns()}:")
                try:
                    result = run(
                        store, "redis, tiled", redis_scale, args.seed, needed, time.perf_counter
                    )
                    print(result.report() + " (wall clock)")
                    print(server_cost(url))
                finally:
                    store.close()
    except TransientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
