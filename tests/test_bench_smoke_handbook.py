"""Smoke test: the handbook reproduction (simulate, train, replay, evaluate) runs end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_handbook_quick_reproduces_the_table(tmp_path: Path) -> None:
    """bench/handbook.py --quick exits 0 and prints the book's rows and ours with numbers."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "handbook.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "| Handbook: best (ensembles, XGBoost) | 0.879 | 0.687 | 0.305 |" in result.stdout
    ours = re.search(r"\| \*\*Ours[^|]*\| \*\*([0-9.]+)\*\* \| \*\*([0-9.]+)\*\* \|", result.stdout)
    assert ours is not None, result.stdout
    assert 0.5 < float(ours.group(1)) <= 1.0  # better than chance even at toy scale
    for name in ("model.json", "verdicts.jsonl", "transactions.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
