"""Smoke test: bench_instructions.py still runs under valgrind (benchmarks are not tests)."""

from __future__ import annotations

import pytest

from tests.test_bench_smoke import run_quick


@pytest.mark.integration
def test_bench_instructions_quick_runs() -> None:
    """--quick counts the original's and the detector's instructions per transaction."""
    out = run_quick("bench_instructions.py", timeout=280)
    assert "- command: `.venv/bin/python bench/bench_instructions.py --quick`" in out
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| original") or line.startswith("| detector")
    ]
    assert len(rows) == 2
    instructions = [float(row.split("|")[2].strip().rstrip("k").replace(",", "")) for row in rows]
    # The detector does more than json.loads, one comparison and json.dumps.
    assert instructions[1] > instructions[0] > 0
    assert "Instructions, default ruleset with memory state, against the original:" in out
