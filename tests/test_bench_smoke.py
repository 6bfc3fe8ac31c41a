"""Smoke tests: each benchmark of detection cost, end to end and cold start still runs.

Benchmarks are not tests; these only prove on tiny input (``--quick``) that the scripts work
and print the lines BENCHMARKS.md quotes, so none can rot unnoticed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_quick(script: str, *extra: str, timeout: float = 240) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--quick", *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_bench_detect_quick_runs() -> None:
    """bench_detect.py --quick prints the cost table, the target line and the step table."""
    out = run_quick("bench_detect.py")
    assert "- command: `.venv/bin/python bench/bench_detect.py --quick`" in out
    assert "| original (json.loads, amount > 1000, json.dumps) |" in out
    assert "| detector, default ruleset, memory state |" in out
    assert "| detector, 1000 rules, half stateful |" in out
    assert "Target (default ruleset at most 5x the original):" in out
    assert "| rules (Ruleset.evaluate) |" in out


@pytest.mark.integration
def test_bench_e2e_quick_runs() -> None:
    """bench_e2e.py --quick pushes through both functions and reports rate and delay."""
    out = run_quick("bench_e2e.py", "--count", "30", "--seconds", "1")
    assert "Maximum throughput (verdicts/s, median of rounds):" in out
    assert "Direct push, 16 connections straight to the function" in out
    assert "Delay publish-to-verdict at half the pass-through's maximum rate" in out
    assert "Target (default setting " in out
    # Every transaction came back from both functions: nothing lost on the way.
    rows = [line for line in out.splitlines() if line.startswith("| 1x")]
    assert len(rows) == 3
    assert all(row.rstrip(" |").endswith("0 / 0") for row in rows), rows


@pytest.mark.integration
def test_bench_coldstart_quick_runs() -> None:
    """bench_coldstart.py --quick times imports and first requests of both functions."""
    out = run_quick("bench_coldstart.py")
    assert "Target (import of detector/main.py under 300 ms):" in out
    assert "| detector/main.py |" in out and "| original |" in out
    assert "First HTTP request, score_transaction (ms):" in out
    assert "First Pub/Sub push, detect_fraud, publishing to the emulator (ms):" in out
    assert "| load the model (load_risk_model) |" in out  # where the load goes
