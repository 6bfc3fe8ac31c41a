"""The wheel: built from this tree, installed into a fresh virtual environment outside the
checkout with its `sim` and `train` extras, and used from another directory as a user would.

    .venv/bin/pytest -m wheel      # these tests alone

Building takes a few seconds (no build isolation: the setuptools of the dev environment);
the one install downloads the runtime, numpy, rich and LightGBM from the package index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from stack.services import ROOT

pytestmark = pytest.mark.wheel

#: Files the installed package must carry wherever they sit inside detector/ and publisher/.
DATA = ("*.yaml", "*.json", "*.md", "*.pyi")
#: What is not part of a source tree: caches, builds, in-place C modules, local environments.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".stack",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "*.so",
)


@dataclass(frozen=True)
class Installed:
    """A fresh environment with the wheel installed, and a directory to work in."""

    wheel: Path
    venv: Path
    work: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def run(self, *argv: str | Path) -> subprocess.CompletedProcess[str]:
        """Run a command of the environment from the work directory; fails on a non-zero exit."""
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"PYTHONPATH", "VIRTUAL_ENV", "RULES_FILE", "MODEL_PATH", "REDIS_URL"}
        }
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        program, *rest = argv
        result = subprocess.run(
            [str(self.bin / program), *map(str, rest)],
            cwd=self.work,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert result.returncode == 0, f"{argv}: {result.stdout}\n{result.stderr}"
        return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """Build the wheel from a copy of this tree, install it with [sim,train] into a new venv."""
    base = tmp_path_factory.mktemp("wheel")
    # A copy: the build writes build/ and *.egg-info, and must not see `make native`'s modules.
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE, symlinks=True)
    dist = base / "dist"
    pip = [sys.executable, "-m", "pip"]
    must([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)])
    (wheel,) = dist.glob("pubsub_fraud_detector-*.whl")
    venv = base / "venv"
    must([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    # The dev environment's pip installs into the new one; --no-compile: bytecode is written
    # on first import instead, which halves the install.
    python = str(venv / "bin" / "python")
    must([*pip, "--python", python, "install", "--no-compile", f"{wheel}[sim,train]"])
    work = base / "elsewhere"
    work.mkdir()
    yield Installed(wheel, venv, work)


def must(argv: list[str]) -> None:
    """Run a build or install step; fails the test with its output."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{argv}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def site_package(installed: Installed, name: str) -> Path:
    out = installed.run("python", "-c", f"import {name}; print({name}.__file__)").stdout
    return Path(out.strip()).parent


def test_the_commands_run_the_installed_package(installed: Installed) -> None:
    """Both packages import from the new environment, not from the checkout."""
    for name in ("detector", "publisher"):
        assert site_package(installed, name).is_relative_to(installed.venv), name
    for script in ("fraud-detector", "fraud-publisher"):
        assert "usage:" in installed.run(script, "--help").stdout


def test_bundled_data_is_installed(installed: Installed) -> None:
    """Every ruleset, README, model and stub of the source tree is in the installed package."""
    for name in ("detector", "publisher"):
        package = site_package(installed, name)
        wanted = {
            path.relative_to(ROOT / name)
            for pattern in DATA
            for path in (ROOT / name).rglob(pattern)
        }
        found = {path.relative_to(package) for pattern in DATA for path in package.rglob(pattern)}
        assert wanted <= found, sorted(map(str, wanted - found))
    assert any((ROOT / "detector").rglob("default.yaml"))
    assert any((ROOT / "detector").rglob("default.json"))


def test_metadata_declares_what_requirements_and_extras_need(installed: Installed) -> None:
    """The runtime is requirements.txt; the extras and the commands are declared."""
    out = installed.run(
        "python",
        "-c",
        "import json, importlib.metadata as m; d = m.distribution('pubsub-fraud-detector'); "
        "print(json.dumps({'requires': d.requires, 'python': d.metadata['Requires-Python'], "
        "'scripts': sorted(e.name + '=' + e.value for e in d.entry_points)}))",
    ).stdout
    meta = json.loads(out)
    runtime = {str(Requirement(r)) for r in meta["requires"] if "extra ==" not in r}
    assert runtime == requirement_lines(ROOT / "requirements.txt")
    extras = {r.split("extra == ")[1].strip("\"'") for r in meta["requires"] if "extra ==" in r}
    assert extras == {"sim", "train", "dev"}
    assert meta["python"] == ">=3.11"
    assert meta["scripts"] == [
        "fraud-detector=detector.cli:main",
        "fraud-publisher=publisher.cli:main",
    ]


def test_simulate_replay_train_from_another_directory(installed: Installed) -> None:
    """simulate writes a stream; replay decides on each with the bundled rules and model;
    train writes a model that replay then scores with."""
    work = installed.work
    simulated = installed.run(
        "python",
        "-m",
        "publisher",
        "simulate",
        "--customers",
        "60",
        "--terminals",
        "300",
        "--days",
        "21",
        "--seed",
        "3",
        "--out",
        "tx.jsonl",
        "--labels",
        "labels.jsonl",
    )
    assert "wrote " in simulated.stdout + simulated.stderr
    transactions = (work / "tx.jsonl").read_text().splitlines()
    labels = (work / "labels.jsonl").read_text().splitlines()
    assert len(transactions) == len(labels) > 1000
    # One the original rule of the blog post blocks, after the simulated stream.
    last = json.loads(transactions[-1])
    big = {**last, "transaction_id": "wheel-big", "amount": 5000}
    with (work / "tx.jsonl").open("a") as out:
        out.write(json.dumps(big) + "\n")

    replayed = installed.run(
        "fraud-detector",
        "replay",
        "--input",
        "tx.jsonl",
        "--output",
        "verdicts.jsonl",
        "--labels",
        "labels.jsonl",
    )
    assert f"transactions: {len(transactions) + 1:,} in" in replayed.stdout
    verdicts = [json.loads(line) for line in (work / "verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == len(transactions) + 1
    bundled = bundled_ruleset_version(installed)
    assert {v["rules_version"] for v in verdicts} == {bundled}
    assert all(v["decision"] in {"allow", "review", "block"} for v in verdicts)
    assert all("model_version" in v for v in verdicts), "the bundled model was not loaded"
    (decided,) = [v for v in verdicts if v["transaction_id"] == "wheel-big"]
    assert decided["decision"] == "block" and decided["is_fraud"] is True

    trained = installed.run(
        "fraud-detector",
        "train",
        "--input",
        "tx.jsonl",
        "--labels",
        "labels.jsonl",
        "--until",
        "2018-04-15",
        "--label-delay",
        "2d",
        "--trees",
        "5",
        "--leaves",
        "4",
        "--version",
        "wheel-test",
        "--out",
        "models/m.json",
    )
    assert "wrote models/m.json: 5 trees" in trained.stdout
    installed.run(
        "fraud-detector",
        "replay",
        "--input",
        "tx.jsonl",
        "--output",
        "scored.jsonl",
        "--model",
        "models/m.json",
    )
    scored = [json.loads(line) for line in (work / "scored.jsonl").read_text().splitlines()]
    assert {v["model_version"] for v in scored} == {"wheel-test"}


def test_rules_checks_bundled_and_own_rulesets(installed: Installed) -> None:
    """`fraud-detector rules` accepts the installed default ruleset and a user's file."""
    (default,) = site_package(installed, "detector").rglob("default.yaml")
    checked = installed.run("fraud-detector", "rules", default)
    assert checked.stdout.strip().endswith(": ok"), checked.stdout
    (installed.work / "mine.yaml").write_text(
        'version: "wheel-1"\n'
        "rules:\n"
        "  - id: large-amount\n"
        '    description: "Amount {amount} is over 500"\n'
        "    condition: amount > 500\n"
        "    action: block\n"
        "  - id: card-velocity\n"
        '    description: "{by_card.count_1h} on this card in 1 h"\n'
        "    condition: by_card.count_1h >= 3\n"
        "    action: review\n"
    )
    mine = installed.run("fraud-detector", "rules", "mine.yaml")
    assert mine.stdout.strip() == "mine.yaml: 2 rules, version wheel-1: ok"


def bundled_ruleset_version(installed: Installed) -> str:
    (default,) = site_package(installed, "detector").rglob("default.yaml")
    return str(yaml.safe_load(default.read_text())["version"])


def requirement_lines(path: Path) -> set[str]:
    """The requirements of a pip requirements file, normalised, without options or comments."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {str(Requirement(line)) for line in lines if line and not line.startswith("-")}


def test_requirements_dev_installs_what_the_extras_declare() -> None:
    """`make venv` (requirements-dev.txt) gets every requirement of the sim, train and dev
    extras: the two lists cannot drift apart."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        str(Requirement(r))
        for extra in ("sim", "train", "dev")
        for r in project["optional-dependencies"][extra]
        if not r.startswith(project["name"])
    }
    dev = requirement_lines(ROOT / "requirements-dev.txt")
    assert declared <= dev, sorted(declared - dev)
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()
