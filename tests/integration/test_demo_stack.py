"""`python -m stack demo` end to end: emulator, redis-server, the three functions, both reports."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from stack.services import ROOT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
]


def test_short_demo_writes_both_reports(tmp_path: Path) -> None:
    """800 transactions at 100/s: every verdict arrives, chargebacks are applied, reports agree."""
    report_json, report_html = tmp_path / "report.json", tmp_path / "report.html"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stack",
            "--workdir",
            str(tmp_path / "stack"),
            "demo",
            "--count",
            "800",
            "--rate",
            "100",
            "--label-delay",
            "12h",
            "--json",
            "--report-json",
            str(report_json),
            "--report-html",
            str(report_html),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = orjson.loads(report_json.read_bytes())
    assert orjson.loads(result.stdout.strip().splitlines()[-1]) == report
    assert report["transactions"] == report["verdicts"] == 800
    assert sum(report["decisions"].values()) == 800
    for name in ("precision_block", "recall_block", "precision_flagged", "recall_flagged"):
        assert report[name] is None or 0.0 <= report[name] <= 1.0, name
    # Chargebacks for the frauds of the first days reach record_feedback and are recorded.
    assert report["labels_sent"] > 0
    assert report["labels_applied"] == report["labels_sent"]
    delay = report["delay_ms"]
    assert delay["count"] == 800
    assert 0 < delay["p50"] <= delay["p95"] <= delay["p99"]
    assert sum(s["frauds"] for s in report["scenarios"]) == report["frauds"]
    page = report_html.read_text(encoding="utf-8")
    assert page.count("<svg ") == 4
