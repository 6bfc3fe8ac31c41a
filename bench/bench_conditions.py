"""Measure candidate CEL engines for rule conditions, and how our compiled ruleset scales.

Usage: .venv/bin/python bench/bench_conditions.py [--quick]

Candidates, each given the same ten conditions and the same activation (transaction fields plus
nested per-entity feature maps):
  - ours: detector.rules (CEL subset parsed, type-checked, compiled into one Python function);
  - cel-python (``celpy``, pure Python, lark parser);
  - common-expression-language (``cel``, Rust bindings);
  - cel-expr-python (``cel_expr_python``, Google's C++ runtime).
One "evaluation" is the whole ruleset on one transaction, including whatever per-transaction
conversion of the activation the library needs. Prints Markdown tables (best of several repeats).
``--quick`` runs tiny iteration counts: the smoke test uses it to prove the script still works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detector.rules import parse_ruleset

# Doubles everywhere: strict CEL engines have no int/double mixing, and features are floats.
CONDITIONS = [
    "amount > 1000.0",
    "by_customer.count_1h >= 5.0 && amount > 3.0 * by_customer.mean_30d",
    "country != ip_country && amount > 500.0",
    'merchant_category in ["7995", "6051", "4829"]',
    "score > 0.9",
    "by_terminal.fraud_share_7d > 0.2 && by_terminal.count_7d >= 10.0",
    "by_card.distinct_countries_1d >= 3.0",
    'channel == "online" && by_customer.amount_ratio_30d > 5.0',
    "by_customer.seconds_since_last < 30.0 && amount > 200.0",
    'merchant.startsWith("crypto") || by_merchant.fraud_count_30d > 3.0',
]

FEATURES = [
    "count_1h", "count_7d", "mean_30d", "amount_ratio_30d", "fraud_share_7d",
    "fraud_count_30d", "distinct_countries_1d", "seconds_since_last",
]  # fmt: skip

ACTIVATION: dict[str, Any] = {
    "amount": 1250.0,
    "customer_id": "c-001",
    "country": "FR",
    "ip_country": "FR",
    "merchant_category": "5411",
    "channel": "online",
    "merchant": "grocer-12",
    "score": 0.12,
    "by_customer": {
        "count_1h": 2.0, "count_7d": 9.0, "mean_30d": 80.0, "amount_ratio_30d": 15.6,
        "fraud_share_7d": 0.0, "fraud_count_30d": 0.0, "distinct_countries_1d": 1.0,
        "seconds_since_last": 412.0,
    },
    "by_card": {"count_1h": 1.0, "distinct_countries_1d": 1.0, "mean_30d": 75.0},
    "by_terminal": {"count_7d": 120.0, "fraud_share_7d": 0.01, "mean_30d": 60.0},
    "by_merchant": {"count_7d": 800.0, "fraud_count_30d": 1.0, "mean_30d": 55.0},
}  # fmt: skip

STRINGS = ["customer_id", "country", "ip_country", "merchant_category", "channel", "merchant"]
SCHEMA: dict[str, Any] = {"amount": "number", "score": "number", **dict.fromkeys(STRINGS, "string")}
for _entity in ("by_customer", "by_card", "by_terminal", "by_merchant"):
    SCHEMA[_entity] = dict.fromkeys(FEATURES, "number")


def conditions(count: int) -> list[str]:
    """`count` distinct conditions: the ten above, thresholds shifted per copy."""
    result = []
    for index in range(count):
        base = CONDITIONS[index % len(CONDITIONS)]
        shift = index // len(CONDITIONS)
        result.append(base if shift == 0 else f"({base}) && amount > {float(shift)}")
    return result


def ruleset_yaml(conds: list[str]) -> str:
    rules = [
        {"id": f"r{i}", "description": f"rule {i}", "condition": c, "action": "review"}
        for i, c in enumerate(conds)
    ]
    return json.dumps({"version": "bench", "rules": rules})  # JSON is YAML


# Each candidate: build(conditions) -> evaluate(activation) -> fired count; and its import.
def build_ours(conds: list[str]) -> Callable[[dict[str, Any]], object]:
    ruleset = parse_ruleset(ruleset_yaml(conds), SCHEMA, source="bench")
    return ruleset.evaluate


def build_celpy(conds: list[str]) -> Callable[[dict[str, Any]], object]:
    import celpy

    env = celpy.Environment()
    programs = [env.program(env.compile(c)) for c in conds]

    def evaluate(activation: dict[str, Any]) -> object:
        act = celpy.json_to_cel(activation)
        return [p.evaluate(act) for p in programs]

    return evaluate


def build_cel_rust(conds: list[str]) -> Callable[[dict[str, Any]], object]:
    import cel

    programs = [cel.compile(c) for c in conds]

    def evaluate(activation: dict[str, Any]) -> object:
        context = cel.Context(activation)
        return [p.execute(context) for p in programs]

    return evaluate


def build_cel_google(conds: list[str]) -> Callable[[dict[str, Any]], object]:
    from cel_expr_python import cel as gcel

    types: dict[str, Any] = {"amount": gcel.Type.DOUBLE, "score": gcel.Type.DOUBLE}
    types.update(dict.fromkeys(STRINGS, gcel.Type.STRING))
    feature_map = gcel.Type.Map(gcel.Type.STRING, gcel.Type.DOUBLE)
    types.update(
        dict.fromkeys(("by_customer", "by_card", "by_terminal", "by_merchant"), feature_map)
    )
    env = gcel.NewEnv(variables=types)
    programs = [env.compile(c) for c in conds]

    def evaluate(activation: dict[str, Any]) -> object:
        act = env.Activation(activation)
        return [p.eval(act).value() for p in programs]

    return evaluate


CANDIDATES: dict[str, tuple[str, str | None, Callable[..., Callable[[dict[str, Any]], object]]]] = {
    # name: (module to import, distribution for its version, builder)
    "ours (detector.rules, compiled)": ("detector.rules", None, build_ours),
    "cel-python (celpy, pure Python)": ("celpy", "cel-python", build_celpy),
    "common-expression-language (Rust)": ("cel", "common-expression-language", build_cel_rust),
    "cel-expr-python (Google, C++)": ("cel_expr_python.cel", "cel-expr-python", build_cel_google),
}


def check_agreement(name: str, evaluate: Callable[[dict[str, Any]], object]) -> None:
    """Every candidate must fire the same rules as ours on the benchmark activation."""
    result = evaluate(ACTIVATION)
    if isinstance(result, list):
        fired = [f"r{i}" for i, value in enumerate(result) if bool(value)]
    else:
        fired = sorted(hit.rule for hit in result.hits)  # type: ignore[attr-defined]
    if fired != ["r0", "r7"]:
        raise SystemExit(f"error: {name} fired {fired}, expected ['r0', 'r7']")


def per_call_ns(function: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(function, number=number, repeat=repeat)) / number * 1e9


def import_ms(module: str) -> float:
    """Import time of `module` in a fresh interpreter (``-X importtime``, microsecond counts).

    Sums the top-level imports that `import module` adds over a bare interpreter start.
    """
    root = str(Path(__file__).resolve().parent.parent)
    # Bytecode caching on, and a first run to fill it: as a deployed function imports.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=root, env=env)

    def top_level(code: str) -> dict[str, int]:
        result = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            capture_output=True, text=True, check=True, cwd=root, env=env,
        )  # fmt: skip
        times = {}
        for line in result.stderr.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2][1:].startswith(" "):
                times[parts[2].strip()] = int(parts[1])
        return times

    bare = top_level("pass")
    added = top_level(f"import {module}")
    return sum(us for name, us in added.items() if name not in bare) / 1e3


def version(distribution: str | None) -> str:
    return "(this repo)" if distribution is None else metadata.version(distribution)


def original_ns(number: int, repeat: int) -> float:
    """The function the project replaced: json.loads, amount > 1000, json.dumps."""
    data = json.dumps({"amount": 50.0, "customer_id": "c-001", "transaction_id": "t-1"}).encode()

    def original() -> object:
        transaction = json.loads(data)
        result = dict(transaction, is_fraud=transaction["amount"] > 1000)
        return json.dumps(result)

    return per_call_ns(original, number, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny iteration counts (smoke test)")
    args = parser.parse_args()
    quick = args.quick
    repeat = 2 if quick else 5
    scale = 0.001 if quick else 1.0

    print(
        f"python {platform.python_version()}, {platform.machine()}, nproc {_nproc()}, quick={quick}"
    )
    print()
    base = original_ns(max(1, int(20000 * scale)), repeat)
    print(f"original function (json.loads; amount > 1000; json.dumps): {base:,.0f} ns")
    print()
    print(
        "| candidate | version | import ms | compile 10 conditions ms"
        " | ns / evaluation of 10 | x ours |"
    )
    print("|---|---|---:|---:|---:|---:|")
    conds = conditions(10)
    rows = []
    for name, (module, distribution, build) in CANDIDATES.items():
        start = time.perf_counter()
        evaluate = build(conds)
        compile_ms = (time.perf_counter() - start) * 1e3
        check_agreement(name, evaluate)
        number = int((300 if "celpy" in module else 20000) * scale) or 1
        ns = per_call_ns(lambda evaluate=evaluate: evaluate(ACTIVATION), number, repeat)
        rows.append((name, version(distribution), import_ms(module), compile_ms, ns))
    ours = rows[0][4]
    for name, ver, imp, comp, ns in rows:
        print(f"| {name} | {ver} | {imp:.0f} | {comp:.1f} | {ns:,.0f} | {ns / ours:.1f} |")

    print()
    print("Scaling (ns per evaluation of the whole ruleset; load = YAML parse + check + compile):")
    print()
    print(
        "| rules | ours: load ms | ours: ns / eval | ours: no hits | ours: no history |"
        " Rust cel: ns / eval | Google cel: ns / eval |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    # An ordinary transaction: nothing fires.
    quiet = dict(
        ACTIVATION, amount=50.0, by_customer=dict(ACTIVATION["by_customer"], amount_ratio_30d=0.6)
    )
    # A first transaction: no entity history (empty feature maps), no model score.
    entities = ("by_customer", "by_card", "by_terminal", "by_merchant")
    fresh = dict(quiet, score=None, **{entity: {} for entity in entities})
    for count in (1, 10, 100, 1000):
        conds = conditions(count)
        start = time.perf_counter()
        evaluate = build_ours(conds)
        load_ms = (time.perf_counter() - start) * 1e3
        number = max(1, int(20000 * scale / count))
        ours_ns = per_call_ns(lambda e=evaluate: e(ACTIVATION), number, repeat)
        quiet_ns = per_call_ns(lambda e=evaluate: e(quiet), number, repeat)
        fresh_ns = per_call_ns(lambda e=evaluate: e(fresh), number, repeat)
        rust = build_cel_rust(conds)
        rust_ns = per_call_ns(lambda e=rust: e(ACTIVATION), number, repeat)
        google = build_cel_google(conds)
        google_ns = per_call_ns(lambda e=google: e(ACTIVATION), number, repeat)
        print(
            f"| {count} | {load_ms:.1f} | {ours_ns:,.0f} | {quiet_ns:,.0f} | {fresh_ns:,.0f} |"
            f" {rust_ns:,.0f} |"
            f" {google_ns:,.0f} |"
        )


def _nproc() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
