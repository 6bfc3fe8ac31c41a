"""Training: nothing at or after --until is used; the export scores like LightGBM; CLI errors."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import orjson
import pytest

from detector.cli import main as cli
from detector.errors import InputError
from detector.model import load_model
from detector.offline.labels import read_labels
from detector.offline.train import DEFAULT_FEATURES, Params, examples, fit, train
from tests.helpers.simulate import simulate

DAY = 86400.0
UNTIL = dt.datetime(2018, 7, 15, tzinfo=dt.UTC)
SMALL = Params(trees=8, leaves=4, max_depth=3, min_child_samples=5)


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return simulate(tmp_path_factory.mktemp("train"))


def fit_on(lines: list[bytes], labels: dict[str, bool]) -> bytes:
    model = train(lines, labels, until=UNTIL, label_delay=2 * DAY, version="v", params=SMALL)
    return model.to_json()


def test_training_uses_nothing_at_or_after_until(stream: tuple[Path, Path]) -> None:
    """Changing or dropping every transaction and label from --until on leaves the artifact
    byte-identical, while changing one earlier label does not."""
    transactions, labels_path = stream
    lines = transactions.read_bytes().splitlines()
    labels = read_labels(labels_path)
    cut = UNTIL.timestamp()
    before, after = [], []
    for line in lines:
        moment = dt.datetime.fromisoformat(orjson.loads(line)["timestamp"]).timestamp()
        (before if moment < cut else after).append(line)
    assert before and after
    baseline = fit_on(lines, labels)

    assert fit_on(before, labels) == baseline
    tampered = []
    flipped = dict(labels)
    for line in after:
        item = orjson.loads(line)
        item["amount"] = 5000.0
        flipped[item["transaction_id"]] = not labels[item["transaction_id"]]
        tampered.append(orjson.dumps(item))
    assert fit_on(before + tampered, flipped) == baseline

    # The check has teeth: an earlier label does change the model.
    earlier = orjson.loads(before[len(before) // 2])["transaction_id"]
    changed = dict(labels)
    changed[earlier] = not labels[earlier]
    assert fit_on(lines, changed) != baseline


def test_examples_see_only_labels_known_by_then(stream: tuple[Path, Path]) -> None:
    """With an infinite delay no terminal ever shows a known fraud; with none, some do."""
    transactions, labels_path = stream
    lines = transactions.read_bytes().splitlines()
    labels = read_labels(labels_path)
    column = DEFAULT_FEATURES.index("by_terminal.fraud_count_30d")
    never, _ = examples(lines, labels, until=UNTIL, label_delay=1e12)
    at_once, _ = examples(lines, labels, until=UNTIL, label_delay=0.0)
    assert max(row[column] for row in never) <= 0
    assert max(row[column] for row in at_once) > 0


def test_one_class_only_cannot_be_trained() -> None:
    """Without any fraud, training stops with a message saying so."""
    rows = [[float(i)] * len(DEFAULT_FEATURES) for i in range(10)]
    with pytest.raises(InputError, match="labels: need both classes to train, got 0 fraud of 10"):
        fit(rows, [0] * 10, DEFAULT_FEATURES, "v")


def test_train_cli_writes_a_loadable_artifact(
    stream: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m detector train` writes an artifact with its version and provenance."""
    transactions, labels = stream
    out = tmp_path / "models" / "m.json"
    status = cli(
        [
            "train",
            "--input",
            str(transactions),
            "--labels",
            str(labels),
            "--until",
            "2018-07-15",
            "--label-delay",
            "2d",
            "--out",
            str(out),
            "--version",
            "cli-test",
            "--trees",
            "5",
            "--leaves",
            "4",
        ]
    )
    assert status == 0, capsys.readouterr().err
    model = load_model(out)
    assert model.version == "cli-test"
    assert model.metadata["until"] == "2018-07-15T00:00:00+00:00"
    assert len(model.trees) == 5
    assert "wrote" in capsys.readouterr().out


def test_train_cli_reports_a_missing_labels_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing labels file is one line naming the option, exit status 2."""
    status = cli(
        [
            "train",
            "--input",
            str(tmp_path / "tx.jsonl"),
            "--labels",
            str(tmp_path / "none.jsonl"),
            "--until",
            "2018-07-15",
            "--out",
            str(tmp_path / "m.json"),
        ]
    )
    assert status == 2
    assert "error: --labels: cannot read" in capsys.readouterr().err
