"""Smoke test: bench_pauses.py still runs (benchmarks are not tests; this keeps it alive)."""

from __future__ import annotations

from tests.test_bench_smoke import run_quick


def test_bench_pauses_quick_runs() -> None:
    """--quick runs every collector policy and prints the table BENCHMARKS.md quotes."""
    out = run_quick("bench_pauses.py")
    assert "- command: `.venv/bin/python bench/bench_pauses.py --quick`" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"default", "function", "off"} <= rows.keys()
    # 600 transactions per policy, and the policy of the function froze what it kept.
    assert all(f"| {policy} | 600 |" in rows[policy] for policy in ("default", "function", "off"))
    assert rows["function"].rstrip(" |").split("|")[-1].strip() != "0"
    assert "Longest stall under the function's policy:" in out
