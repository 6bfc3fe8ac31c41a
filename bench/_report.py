"""What every benchmark prints first: the command, the machine, the versions and the date.

Shared by bench_detect.py, bench_e2e.py and bench_coldstart.py (imported as a sibling module:
each script runs as ``python bench/<script>.py`` so bench/ is on sys.path).
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PACKAGES = (
    "pydantic",
    "pydantic-core",
    "orjson",
    "PyYAML",
    "functions-framework",
    "gunicorn",
    "google-cloud-pubsub",
    "grpcio",
    "redis",
)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "detector"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
    except OSError:
        return "n/a"
    return out.stdout.strip() + (" (detector/ modified)" if dirty.stdout.strip() else "")


def versions(extra: Sequence[str] = ()) -> str:
    """Python and the packages the measured code runs on, one line."""
    parts = [f"Python {platform.python_version()}"]
    for name in (*PACKAGES, *extra):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def header(title: str, extra_versions: Sequence[str] = ()) -> str:
    """Markdown lines naming the run: command, date, machine, load, versions, commit."""
    command = shlex.join([".venv/bin/python", *[_relative(arg) for arg in sys.argv]])
    lines = [
        f"## {title}",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {_cpu()}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}; load average at start {_load()}",
        f"- versions: {versions(extra_versions)}",
        f"- commit: {_commit()}",
        "",
    ]
    return "\n".join(lines)


def _relative(arg: str) -> str:
    try:
        return str(Path(arg).resolve().relative_to(ROOT))
    except ValueError:
        return arg


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 10) - 1]


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
