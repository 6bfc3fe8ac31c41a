"""The publisher benchmark still runs (its --quick mode, against its own emulator)."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from stack import services


@pytest.mark.integration
def test_publisher_benchmark_quick_mode_runs() -> None:
    """bench_publisher.py --quick --json reports a positive rate for every measurement."""
    result = subprocess.run(
        [sys.executable, "bench/bench_publisher.py", "--quick", "--json"],
        cwd=services.ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert report["messages"] == 3_000
    for key in ("publish_batch_msgs_per_s", "publish_library_msgs_per_s", "simulate_msgs_per_s"):
        assert report[key] > 0, key
