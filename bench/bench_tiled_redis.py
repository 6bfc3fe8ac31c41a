"""Benchmark of the tiled Redis store: server time per transaction, and flat cost in history.

    .venv/bin/python bench/bench_tiled_redis.py                # throwaway redis-server
    .venv/bin/python bench/bench_tiled_redis.py --url redis://127.0.0.1:6379/0

Stream: transactions over a month of event time, each naming a customer, the customer's card,
a terminal and a merchant (merchants Zipf-skewed), in `observe_many` batches of 500, with the
shipped detector's windows: once computing every feature of every entity, once only what its
rules and model read (the default features: the detector declares them, `declare_reads`, and
hands the store only the entities and attributes they need, here no merchant and no country,
`detector.engine.recorded`). Server time is the
``usec`` of EVALSHA and FCALL in ``INFO commandstats`` (statistics reset before), i.e. the
scripts' own time on the server, all entities of a transaction together.

The exact `RedisStore` then runs the same stream in the same run, for the ratio.

Flat cost: a merchant with few transactions in its 30-day window, and one with many (built
by the same batches), each then observes 1,000 more; their server time per script is compared.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detector.config import DetectorConfig, load_risk_model, load_rules, state_config
from detector.engine import OPTIONAL_FIELDS, entity_reads, recorded
from detector.state import Event, StateConfig
from detector.state.redis_store import RedisStore
from detector.state.redis_tiled import RedisTiledStore
from detector.vocabulary import DAY
from stack.services import redis_server, script_time, unique

START = 1_700_000_000.0
BATCH = 500


def stream(
    rng: random.Random, count: int, customers: int, terminals: int, merchants: int, days: float
) -> list[Event]:
    """`count` transactions in time order over `days`, merchants Zipf-skewed."""
    weights = [1 / (rank + 1) for rank in range(merchants)]
    times = sorted(rng.uniform(0, days * DAY) for _ in range(count))
    events = []
    for n, offset in enumerate(times):
        customer = rng.randrange(customers)
        events.append(
            Event(
                transaction_id=f"tx{n}",
                timestamp=START + offset,
                amount=round(rng.lognormvariate(3.5, 1.0), 2),
                customer=f"C{customer}",
                card=f"K{customer}",
                terminal=f"T{rng.randrange(terminals)}",
                merchant=f"M{rng.choices(range(merchants), weights)[0]}",
                country=rng.choice(("FR", "BE", "DE", "NL")),
            )
        )
    return events


def run(store: RedisStore, client: redis.Redis, events: list[Event]) -> tuple[float, float]:
    """Observe the events in batches; (server µs per transaction, client transactions/s)."""
    client.config_resetstat()
    began = time.perf_counter()
    for at in range(0, len(events), BATCH):
        store.observe_many(events[at : at + BATCH])
    elapsed = time.perf_counter() - began
    usec, _ = script_time(client)
    return usec / len(events), len(events) / elapsed


Reads = dict[str, frozenset[str] | None]


def shipped() -> tuple[StateConfig, Reads]:
    """The shipped detector's windows, and what its rules and model read of each kind."""
    config = DetectorConfig.from_env({})
    model = load_risk_model(config)
    state = state_config(model)
    needed = set(load_rules(config, state).variables)
    if model is not None:
        needed |= set(model.variables)
    return state, entity_reads(needed)


def handed(events: list[Event], reads: Reads) -> list[Event]:
    """The events as the detector hands them to its store: what nothing reads left out
    (`detector.engine.recorded`; the shipped detector: merchant and country)."""
    keep = recorded(reads)
    drop = {name: None for name in OPTIONAL_FIELDS if name not in keep}
    return [event._replace(**drop) for event in events]


def run_fresh(
    kind: type[RedisStore],
    url: str,
    client: redis.Redis,
    events: list[Event],
    config: StateConfig,
    reads: Reads | None = None,
) -> tuple[float, float]:
    """`run` on a store of this kind under a fresh prefix, dropped afterwards."""
    store = kind(config, url, prefix=unique("bench") + ":")
    if reads is not None:
        store.declare_reads(reads)
    try:
        return run(store, client, events)
    finally:
        store.drop()
        store.close()


def flat_cost(url: str, client: redis.Redis, hot: int) -> dict[int, float]:
    """Server µs per script of 1,000 observes of a merchant after 10 or `hot` earlier ones."""
    rng = random.Random(7)
    out = {}
    for history in (10, hot):
        store = RedisTiledStore(StateConfig(), url, prefix=unique("bench") + ":")
        spacing = 25 * DAY / history
        earlier = [
            Event(
                f"h{i}",
                START + i * spacing,
                round(rng.uniform(1, 500), 2),
                merchant="busy",
                terminal=f"T{rng.randrange(5000)}",
                country="FR",
            )
            for i in range(history)
        ]
        for at in range(0, len(earlier), BATCH):
            store.observe_many(earlier[at : at + BATCH])
        later = [
            Event(
                f"n{i}",
                START + 25 * DAY + i * 60,
                round(rng.uniform(1, 500), 2),
                merchant="busy",
                terminal=f"T{rng.randrange(5000)}",
                country="FR",
            )
            for i in range(1000)
        ]
        client.config_resetstat()
        for at in range(0, len(later), BATCH):
            store.observe_many(later[at : at + BATCH])
        usec, calls = script_time(client)
        out[history] = usec / calls
        store.drop()
        store.close()
    return out


@contextlib.contextmanager
def server(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    with tempfile.TemporaryDirectory() as workdir, redis_server(Path(workdir)) as started:
        yield started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a Redis to use (default: a throwaway redis-server)")
    parser.add_argument("--transactions", type=int, default=20_000)
    parser.add_argument("--days", type=float, default=30.0, help="event time the stream spans")
    parser.add_argument("--hot", type=int, default=1_000_000, help="the busy merchant's history")
    parser.add_argument("--quick", action="store_true", help="tiny input: that it runs")
    args = parser.parse_args()
    if args.quick:
        args.transactions, args.hot = 500, 2_000
    with server(args.url) as url:
        client = redis.Redis.from_url(url)
        events = stream(random.Random(1), args.transactions, 2_000, 5_000, 50, args.days)
        config, reads = shipped()
        usec, rate = run_fresh(RedisTiledStore, url, client, handed(events, reads), config, reads)
        print(
            f"stream: {len(events)} transactions over {args.days:g} days, default features: "
            f"{usec:.1f} µs server time per transaction, {rate:,.0f} transactions/s"
        )
        every_usec, every_rate = run_fresh(RedisTiledStore, url, client, events, config)
        print(
            f"same stream, every feature of every entity: {every_usec:.1f} µs server time per "
            "transaction, "
            f"{every_rate:,.0f} transactions/s (default features: {usec / every_usec:.2f}x)"
        )
        exact_usec, exact_rate = run_fresh(RedisStore, url, client, events, config)
        print(
            f"same stream, exact RedisStore, every feature: {exact_usec:.1f} µs server time "
            f"per transaction, {exact_rate:,.0f} transactions/s "
            f"(tiled, every feature: {every_usec / exact_usec:.2f}x the server time)"
        )
        flat = flat_cost(url, client, args.hot)
        few, many = flat[10], flat[args.hot]
        print(
            f"flat cost: merchant after 10 transactions {few:.1f} µs per script, "
            f"after {args.hot:,} {many:.1f} µs ({many / few:.2f}x)"
        )


if __name__ == "__main__":
    main()
