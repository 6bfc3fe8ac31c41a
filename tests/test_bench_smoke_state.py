"""Smoke test: the state benchmark runs end to end on a small stream, both stores."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from detector import state
from stack.services import ROOT


@pytest.mark.integration
def test_bench_state_quick_runs_and_reports(redis_url: str) -> None:
    """`bench/bench_state.py --quick` measures memory and Redis and prints per-event costs."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench_state.py"),
            "--quick",
            "--days",
            "4",
            "--redis-url",
            redis_url,
            "--redis-days",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    memory = re.findall(
        r"^memory, (C histories|Python lists): 8000 events, observe ([0-9.]+) us/event",
        result.stdout,
        re.M,
    )
    redis = re.search(r"^redis: 2000 events, observe ([0-9.]+) us/event", result.stdout, re.M)
    assert memory and redis, result.stdout
    assert memory[-1][0] == "Python lists"
    assert all(float(cost) > 0 for _, cost in memory)
    if state._history is not None:
        assert [name for name, _ in memory] == ["C histories", "Python lists"]
        assert "as fast as Python lists" in result.stdout
    assert "peak RSS" in result.stdout


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
