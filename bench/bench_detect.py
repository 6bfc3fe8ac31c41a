"""Detection cost per transaction, side by side with the blog post's original function.

Usage: .venv/bin/python bench/bench_detect.py [--quick] [--redis] [--profile CONFIG]

One "transaction" is what `detect_fraud` does in process for one Pub/Sub message, publishing
left out: `Service.on_transaction` with a `MemoryVerdictSink` (base64 and JSON decoding, pydantic
validation, state store, model if configured, rules, verdict encoding) against the original
(`base64` + `json.loads` + `amount > 1000` + `json.dumps`, bench/original/main.py).

Every configuration gets the same transactions: the project's simulator
(`publisher.simulate.records`), with merchant, category, country, IP country, channel and
currency added deterministically so that rules on those fields have values to read. Each
configuration has its own state store, warmed with the same prefix of the stream; then each
repeat times every configuration, in turn, on the next slice of the stream (so no transaction
is ever seen twice by a store). Ratios are taken within a repeat and the median is reported:
absolute times drift on a shared machine, ratios much less.

Rulesets of 10, 100 and 1,000 rules are generated into a temporary YAML file: varied
conditions over transaction fields, and (the "stateful" rows) half of them over per-entity
velocity features that make the state store compute aggregates. ``--quick`` runs tiny
counts; the smoke test uses it to prove the script still works.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import gc
import importlib.util
import io
import itertools
import os
import pstats
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _report  # noqa: E402

from detector.config import DetectorConfig, build_detector  # noqa: E402
from detector.engine import Detector  # noqa: E402
from detector.functions.service import Service, parse_envelope  # noqa: E402
from detector.functions.settings import Settings  # noqa: E402
from detector.functions.sinks import MemoryVerdictSink  # noqa: E402
from detector.state import StateConfig, open_store  # noqa: E402
from detector.transaction import parse_json, validate  # noqa: E402
from publisher.simulate import SimulationConfig, records  # noqa: E402

Envelope = dict[str, Any]

# --- the transaction stream -------------------------------------------------------------

CATEGORIES = ("5411", "5812", "5999", "4111", "5732", "7995", "6051", "4829", "5311", "5541")
COUNTRIES = ("FR", "DE", "US", "GB", "ES", "IT", "NL", "BE")
CURRENCIES = ("EUR", "EUR", "EUR", "USD", "GBP")


def _pick(options: Sequence[str], key: str, salt: str = "") -> str:
    return options[zlib.crc32((salt + key).encode()) % len(options)]


def enrich(data: bytes) -> bytes:
    """A simulated transaction with the optional fields a real payment system sends."""
    tx = orjson.loads(data)
    terminal, customer = tx["terminal_id"], tx["customer_id"]
    country = _pick(COUNTRIES, customer)
    # One transaction in twenty comes from an IP in another country; one in eight is online.
    roll = zlib.crc32(tx["transaction_id"].encode())
    tx.update(
        currency=_pick(CURRENCIES, country),
        merchant=("crypto-" if terminal.endswith("7") else "shop-") + terminal[5:],
        merchant_category=_pick(CATEGORIES, terminal),
        country=country,
        ip_country=_pick(COUNTRIES, tx["transaction_id"]) if roll % 20 == 0 else country,
        channel="online" if roll % 8 == 0 else "pos",
    )
    return orjson.dumps(tx)


def envelopes(count: int, customers: int) -> list[Envelope]:
    """`count` Pub/Sub push envelopes of simulated transactions, in event-time order."""
    config = SimulationConfig(seed=7, customers=customers, terminals=2 * customers, days=365)
    published = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    result = []
    for index, record in enumerate(itertools.islice(records(config), count)):
        moment = published + timedelta(milliseconds=index)
        result.append(
            {
                "message": {
                    "data": base64.b64encode(enrich(record.data)).decode(),
                    "attributes": {},
                    "messageId": str(10_000_000 + index),
                    "publishTime": moment.isoformat().replace("+00:00", "Z"),
                }
            }
        )
    return result


# --- generated rulesets -----------------------------------------------------------------

# Each template takes k (0, 1, 2...: the copy number) so thresholds differ between copies;
# thresholds are set so that few transactions fire, as in production.
FIELD_RULES: tuple[tuple[str, str, str], ...] = (
    ("amount > {a}", "Amount {{amount}} over {a}", "block"),
    ('merchant_category in ["7995", "6051", "4829"] && amount > {b}', "Risky category", "review"),
    ("country != ip_country && amount > {b}", "IP country {{ip_country}} differs", "review"),
    ('channel == "online" && amount > {b}', "Large online payment", "review"),
    ('currency != "EUR" && amount > {a}', "Large foreign-currency payment", "review"),
    ("hour < 5 && amount > {b}", "Night payment of {{amount}}", "review"),
    ('merchant.startsWith("crypto-") && amount > {b}', "Crypto merchant", "review"),
    ("weekday >= 6 && amount > {a}", "Large weekend payment", "review"),
    ('customer_id == "cust-9{k:04d}"', "Customer on the watch list", "block"),
    ('terminal_id in ["term-9{k:04d}", "term-8{k:04d}"]', "Terminal on the watch list", "block"),
)
STATEFUL_RULES: tuple[tuple[str, str, str], ...] = (
    ("by_customer.count_1h >= {n}", "{{by_customer.count_1h}} payments in 1 h", "review"),
    ("by_card.sum_1d > {a}", "Card spent {{by_card.sum_1d}} today", "review"),
    (
        "by_terminal.fraud_share_30d > 0.2 && by_terminal.count_30d >= {n}",
        "Terminal with {{by_terminal.fraud_share_30d}} fraud share",
        "block",
    ),
    ("by_customer.amount_ratio_30d > {r}", "Amount {{by_customer.amount_ratio_30d}}x", "review"),
    (
        "has(by_customer.seconds_since_last) && by_customer.seconds_since_last < {s} "
        "&& amount > 100",
        "Rapid repeat payment",
        "review",
    ),
    ("by_card.distinct_countries_1d >= {n}", "Card used in many countries", "review"),
    ("by_merchant.fraud_count_7d > {n}", "Merchant with recent fraud", "review"),
    (
        "by_customer.count_1d >= {n} && amount > 2.0 * by_customer.mean_30d",
        "Busy day, large amount",
        "review",
    ),
)


def generated_rules(count: int, stateful: bool) -> str:
    """A ruleset of `count` rules as YAML text (JSON is YAML); half stateful if asked."""
    pools = [FIELD_RULES, STATEFUL_RULES] if stateful else [FIELD_RULES]
    rules = []
    for index in range(count):
        pool = pools[index % len(pools)]
        position = index // len(pools)
        condition, description, action = pool[position % len(pool)]
        k = position // len(pool)
        values = {"k": k, "a": 1000 + 25 * k, "b": 400 + 10 * k, "n": 5 + k, "r": 5 + k, "s": 5}
        rules.append(
            {
                "id": f"gen-{index}",
                "description": description.format(**values),
                "condition": condition.format(**values),
                "action": action,
                "shadow": index % 5 == 4,
            }
        )
    return orjson.dumps({"version": f"bench-{count}", "rules": rules}).decode()


# --- the measured functions -------------------------------------------------------------


def load_original() -> ModuleType:
    """bench/original/main.py, imported the way functions-framework imports it."""
    # The original creates its Pub/Sub client at import; against an emulator address it needs
    # no credentials, and nothing is published in this benchmark.
    os.environ.setdefault("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")
    spec = importlib.util.spec_from_file_location("original_main", ROOT / "bench/original/main.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Config:
    """One measured configuration: a function of one envelope, and what it needs reset."""

    name: str
    run: Callable[[Envelope], object]
    sink: MemoryVerdictSink | None = None
    detector: Detector | None = None
    rules_file: Path | None = None


def detector_config(
    name: str,
    rules_file: Path | None,
    redis_url: str | None = None,
    *,
    model: str | None = None,
    state: bool = True,
) -> Config:
    """A Service as the function builds it, with a MemoryVerdictSink; model from MODEL_PATH unless
    given ("none" disables it), state in memory (or Redis) unless state is False."""
    config = DetectorConfig(
        rules_file=rules_file,
        model_path=model or os.environ.get("MODEL_PATH") or None,
        redis_url=redis_url,
    )
    settings = Settings(project="bench", detector=config)
    detector = build_detector(config, store=open_store(StateConfig(), redis_url))
    if not state:
        detector = Detector(detector.rules, None, detector.model)
    sink = MemoryVerdictSink()
    service = Service(settings, detector, sink)
    return Config(name, service.on_transaction, sink, detector, rules_file)


def time_loop(run: Callable[[Envelope], object], batch: Sequence[Envelope], gc_on: bool) -> float:
    """Seconds per envelope of run over batch.

    The garbage collector stays on unless gc_on is False: it runs in the function too, and
    a state store full of small objects makes its passes part of the cost.
    """
    enabled = gc.isenabled()
    if not gc_on:
        gc.disable()
    try:
        start = time.perf_counter()
        for envelope in batch:
            run(envelope)
        elapsed = time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()
    return elapsed / len(batch)


def measure(
    configs: Sequence[Config],
    warm: Sequence[Envelope],
    slices: Sequence[Sequence[Envelope]],
    gc_on: bool = True,
) -> dict[str, list[tuple[float, float]]]:
    """Per config, (seconds per transaction, ratio to the original) for each repeat."""
    for config in configs:
        for envelope in warm:
            config.run(envelope)
        if config.sink is not None:
            config.sink.messages.clear()
    results: dict[str, list[tuple[float, float]]] = {c.name: [] for c in configs}
    for batch in slices:
        times = {}
        for config in configs:
            times[config.name] = time_loop(config.run, batch, gc_on)
            if config.sink is not None:
                config.sink.messages.clear()
        baseline = times[configs[0].name]
        for name, seconds in times.items():
            results[name].append((seconds, seconds / baseline))
    return results


def stages(
    detector: Detector, warm: Sequence[Envelope], slices: Sequence[Sequence[Envelope]]
) -> list[tuple[str, float]]:
    """Median microseconds per transaction of each step of the detection, for one config."""
    for envelope in warm:
        message = parse_envelope(envelope)
        raw = parse_json(message.data)
        tx = validate(raw)
        detector.decide(
            raw,
            tx,
            message_id=message.message_id,
            default_time=message.publish_time or datetime.now(UTC),
            decided_at=datetime.now(UTC),
        )
    samples: dict[str, list[float]] = {}

    def timed(name: str, function: Callable[[Any], Any], inputs: Sequence[Any]) -> list[Any]:
        out: list[Any] = []
        append = out.append
        gc.disable()
        start = time.perf_counter()
        for item in inputs:
            append(function(item))
        elapsed = time.perf_counter() - start
        gc.enable()
        samples.setdefault(name, []).append(elapsed / len(inputs) * 1e6)
        return out

    now = datetime.now(UTC)
    # decide() again without store or model: the verdict's own cost, rules included.
    bare = Detector(detector.rules, None, None)
    for batch in slices:
        messages = timed("envelope: base64 and its fields (parse_envelope)", parse_envelope, batch)
        raws = timed("JSON (orjson.loads)", parse_json, [m.data for m in messages])
        txs = timed("validation (validate)", validate, raws)
        activations = timed(
            "state store and activation (Detector.activation)",
            lambda pair: detector.activation(pair[0], pair[0].transaction_id, pair[0].timestamp),
            list(zip(txs, raws, strict=True)),
        )
        if detector.model is not None:
            model = detector.model
            timed("model score", model.score, activations)
        timed("rules (Ruleset.evaluate)", detector.rules.evaluate, activations)

        def verdict(pair: tuple[Any, dict[str, Any]], bare: Detector = bare) -> bytes:
            tx, raw = pair
            return bare.decide(raw, tx, message_id="1", default_time=now, decided_at=now).encode()

        timed(
            "verdict body and encoding (decide without state and model, rules included)",
            verdict,
            list(zip(txs, raws, strict=True)),
        )
    return [(name, statistics.median(values)) for name, values in samples.items()]


def profile(config: Config, batch: Sequence[Envelope], top: int = 25) -> str:
    """cProfile of one config over one batch: the top functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for envelope in batch:
        config.run(envelope)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def slices_of(items: Sequence[Envelope], size: int) -> Iterator[Sequence[Envelope]]:
    for start in range(0, len(items) - size + 1, size):
        yield items[start : start + size]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke test)")
    parser.add_argument("--redis", action="store_true", help="also measure the Redis store")
    parser.add_argument("--profile", metavar="CONFIG", help="print a cProfile of this config")
    parser.add_argument("--repeats", type=int, help="timed slices per config")
    parser.add_argument("--batch", type=int, help="transactions per timed slice")
    parser.add_argument(
        "--no-gc", action="store_true", help="pause the garbage collector while timing"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (2 if quick else 9)
    batch = args.batch or (100 if quick else 2000)
    warm_count = 200 if quick else 20_000
    customers = 50 if quick else 2_000
    counts = (10, 100, 1000)

    print(_report.header("Detection cost per transaction (bench/bench_detect.py)"))
    stream = envelopes(warm_count + batch * repeats, customers)
    warm, timed = stream[:warm_count], stream[warm_count:]
    slices = list(slices_of(timed, batch))
    print(
        f"{len(stream)} simulated transactions ({customers} customers); state warmed with "
        f"{warm_count}, then {len(slices)} repeats of {batch} per configuration, interleaved. "
        "Median per repeat; ratio = config / original in the same repeat; garbage collector "
        f"{'paused' if args.no_gc else 'on, as in the function'}.\n"
    )

    original = load_original()
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        files = {}
        for count in counts:
            for stateful in (False, True):
                path = Path(tmp) / f"rules-{count}-{'stateful' if stateful else 'fields'}.yaml"
                path.write_text(generated_rules(count, stateful))
                files[count, stateful] = path
        stateful_default = Path(tmp) / "default-plus-velocity.yaml"
        default_text = (ROOT / "detector/rules/rulesets/default.yaml").read_text()
        stateful_default.write_text(default_text + _velocity_yaml())
        configs = [
            Config("original (json.loads, amount > 1000, json.dumps)", original.handle),
            detector_config("detector, default ruleset, memory state", None),
            detector_config("detector, default ruleset, no model", None, model="none"),
            detector_config(
                "detector, default ruleset, no model, no state store",
                None,
                model="none",
                state=False,
            ),
            detector_config("detector, default + 8 velocity rules, memory state", stateful_default),
        ]
        for count in counts:
            configs.append(detector_config(f"detector, {count} field rules", files[count, False]))
        for count in counts:
            configs.append(
                detector_config(f"detector, {count} rules, half stateful", files[count, True])
            )
        if args.redis:
            from stack.services import redis_server

            url = stack.enter_context(redis_server(Path(tmp)))
            configs.append(detector_config("detector, default ruleset, Redis state", None, url))
        default = configs[1].detector
        assert default is not None
        model = default.model
        print(
            f"- default ruleset: {len(default.rules.rules)} rules, version "
            f"{default.rules.version}; model: "
            f"{getattr(model, 'version', 'none') if model is not None else 'none'}\n"
        )
        results = measure(configs, warm, slices, not args.no_gc)
        rows = []
        for config in configs:
            values = results[config.name]
            micros = statistics.median(seconds for seconds, _ in values) * 1e6
            ratio = statistics.median(r for _, r in values)
            spread = max(r for _, r in values) - min(r for _, r in values)
            rows.append((config.name, f"{micros:.1f}", f"{ratio:.2f}x", f"±{spread / 2:.2f}"))
        print(_report.table(["configuration", "µs / transaction", "vs original", "spread"], rows))
        default_ratio = statistics.median(r for _, r in results[configs[1].name])
        verdict = "met" if default_ratio <= 5 else f"missed by {default_ratio / 5:.2f}x"
        print(
            f"\nTarget (default ruleset at most 5x the original): {verdict} ({default_ratio:.2f}x)"
        )

        for label, rules_file in (
            ("default ruleset", None),
            ("default + 8 velocity", stateful_default),
        ):
            config = DetectorConfig(
                rules_file=rules_file, model_path=os.environ.get("MODEL_PATH") or None
            )
            detector = build_detector(config, store=open_store(StateConfig(), None))
            print(
                f"\nWhere the time goes ({label}, memory state; each step timed alone, "
                "garbage collector paused):\n"
            )
            parts = stages(detector, warm, slices)
            print(_report.table(["step", "µs / transaction"], [(n, f"{v:.1f}") for n, v in parts]))

        if args.profile:
            chosen = [c for c in configs if args.profile in c.name]
            if not chosen:
                print(f"error: no configuration matches {args.profile!r}", file=sys.stderr)
                return 2
            fresh = (
                Config(chosen[0].name, original.handle)
                if chosen[0].detector is None
                else detector_config(chosen[0].name, chosen[0].rules_file)
            )
            for envelope in warm:
                fresh.run(envelope)
            print(f"\ncProfile of {fresh.name!r} over {len(timed)} transactions:\n")
            print("```\n" + profile(fresh, timed) + "```")
    return 0


def _velocity_yaml() -> str:
    """Eight velocity rules appended to the default ruleset (one per STATEFUL_RULES entry)."""
    lines = []
    for index, (condition, description, action) in enumerate(STATEFUL_RULES):
        values = {"a": 1500, "n": 5, "r": 5, "s": 5}
        lines += [
            f"  - id: velocity-{index}",
            f"    description: {orjson.dumps(description.format(**values)).decode()}",
            f"    condition: {orjson.dumps(condition.format(**values)).decode()}",
            f"    action: {action}",
        ]
    return "\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
