"""Smoke test: bench_replay.py still runs (benchmarks are not tests; this keeps it alive)."""

from __future__ import annotations

from tests.test_bench_smoke import run_quick


def test_bench_replay_quick_runs() -> None:
    """--quick replays a small simulation on one and two processes, with the same verdicts."""
    out = run_quick("bench_replay.py")
    assert "- command: `.venv/bin/python bench/bench_replay.py --quick`" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| --workers | processes |")
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]
    assert [(c[0], c[1]) for c in cells] == [("1", "1"), ("2", "2")]
    assert all(c[-1] == "yes" for c in cells)  # byte-identical verdicts
    assert "Target (20,000 transactions/s): best" in out
