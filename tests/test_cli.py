"""`python -m detector` commands other than replay and train: schemas and rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detector", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bundled_rules_check_ok() -> None:
    """The bundled ruleset passes the check the functions apply at start-up."""
    result = run("rules", "detector/rules/rulesets/default.yaml")
    assert result.returncode == 0, result.stderr
    assert "default.yaml:" in result.stdout and ": ok" in result.stdout


def test_bad_rules_file_is_one_error_line(tmp_path: Path) -> None:
    """A bad file is reported as one error line naming the rule and the problem, no traceback."""
    bad = tmp_path / "rules.yaml"
    bad.write_text(
        "version: x\nrules:\n  - {id: fast, description: d, condition: by_card.cnt_1h > 1, action: block}\n"
    )
    result = run("rules", str(bad))
    assert result.returncode == 2
    assert (
        result.stderr.strip() == 'error: rules.yaml: rule "fast": unknown variable "by_card.cnt_1h"'
    )


def test_schemas_check_passes_on_the_committed_files() -> None:
    """schemas/ matches what the code generates."""
    result = run("schemas", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
