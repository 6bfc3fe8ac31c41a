"""Smoke test: the rule-condition benchmark still runs end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_conditions_quick_runs() -> None:
    """bench/bench_conditions.py --quick exits 0 and prints both tables."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_conditions.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "| ours (detector.rules, compiled) |" in result.stdout
    assert "| 1000 |" in result.stdout
