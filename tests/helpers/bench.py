"""Runs a benchmark script on tiny input, for the smoke tests."""

from __future__ import annotations

import subprocess
import sys

from stack.services import ROOT


def run_quick(script: str, *extra: str, timeout: float = 240) -> str:
    """stdout of `bench/SCRIPT --quick EXTRA...`; fails the test if it exits non-zero."""
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
