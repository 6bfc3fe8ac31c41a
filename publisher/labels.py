"""The ground-truth label file: written by `simulate --labels`, read by `watch --labels`.

One JSON object per line and per transaction:

    {"transaction_id": "t000000042", "is_fraud": true, "scenario": 2}

`scenario` is the simulator's fraud scenario (a key of SCENARIOS), null for genuine
transactions; label files from elsewhere (chargeback exports) may leave it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson

from publisher.errors import ReadError

__all__ = ["SCENARIOS", "Label", "label_json", "load_labels"]

#: The simulator's fraud scenarios, after the Fraud Detection Handbook.
SCENARIOS: dict[int, str] = {
    1: "large amount",
    2: "compromised terminal",
    3: "compromised customer",
}


@dataclass(frozen=True, slots=True)
class Label:
    """The truth about one transaction; scenario None when genuine or not known."""

    is_fraud: bool
    scenario: int | None = None


# A labels file has millions of lines but a handful of distinct labels: share them.
_SHARED: dict[tuple[bool, int | None], Label] = {}


def _label(is_fraud: bool, scenario: int | None) -> Label:
    key = (is_fraud, scenario)
    label = _SHARED.get(key)
    if label is None:
        label = _SHARED.setdefault(key, Label(is_fraud, scenario))
    return label


def label_json(tid: str, is_fraud: bool, scenario: int | None) -> bytes:
    """A label line: {"transaction_id", "is_fraud", "scenario"} (scenario null if genuine)."""
    fraud = "true" if is_fraud else "false"
    number = "null" if scenario is None else str(scenario)
    return f'{{"transaction_id":"{tid}","is_fraud":{fraud},"scenario":{number}}}'.encode()


def load_labels(path: Path) -> dict[str, Label]:
    """Read a labels file: transaction id -> Label. Blank lines are skipped.

    Raises:
        ReadError: the file is missing, unreadable, or a line is not a label.
    """
    labels: dict[str, Label] = {}
    try:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    item = orjson.loads(line)
                except orjson.JSONDecodeError as error:
                    raise ReadError(f"--labels: {path}:{number}: not JSON ({error})") from error
                if not (
                    isinstance(item, dict)
                    and isinstance(item.get("transaction_id"), str)
                    and isinstance(item.get("is_fraud"), bool)
                ):
                    raise ReadError(
                        f"--labels: {path}:{number}: must be an object with "
                        "transaction_id (string) and is_fraud (boolean)"
                    )
                scenario = item.get("scenario")
                if scenario is not None and (
                    not isinstance(scenario, int) or isinstance(scenario, bool)
                ):
                    raise ReadError(
                        f"--labels: {path}:{number}: scenario must be an integer or null, "
                        f"got {scenario!r}"
                    )
                labels[item["transaction_id"]] = _label(item["is_fraud"], scenario)
    except OSError as error:
        raise ReadError(f"--labels: cannot read {path}: {error.strerror}") from error
    return labels
