"""Train the risk model: replay the stream as the live detector sees it, fit, export to JSON.

Features are computed by the same `Detector.activation` over a `MemoryStore` as live
scoring, with each label injected when it becomes known (transaction time + delay,
`detector.offline.labels.merge_labels`), so a transaction's terminal fraud counts hold only the
labels that had arrived by then. Nothing at or after ``--until`` is read: the stream stops
at the first transaction at that time, and a label known only then is never injected. The
examples are the transactions in [--since, --until), each with its own label as target: the
model is usable once those labels are known, at --until + delay (the handbook's protocol).

The model is LightGBM gradient-boosted trees (a training-only dependency, imported here
only), exported to the pure-Python artifact `detector.model` scores. Training checks that
the artifact reproduces LightGBM's own raw scores before writing it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from detector.config import DetectorConfig, load_rules, state_config
from detector.engine import Detector
from detector.errors import InputError
from detector.model import Tree, TreeModel, vector
from detector.offline.labels import KnownLabel, merge_labels
from detector.offline.replay import Stream
from detector.state import memory_store

__all__ = ["DEFAULT_FEATURES", "MISSING", "Params", "examples", "fit", "train", "training_detector"]

log = logging.getLogger(__name__)

#: The features of the default model: the handbook's winners (customer spending over 1, 7
#: and 30 days; terminal fraud history as labels arrive) plus the amount's ratio to the
#: customer's usual amount and the time since the customer's previous transaction. With labels
#: 7 days late, a terminal's fraud count over 8 (14) days holds the labels of days 7-8 (7-14)
#: before the transaction: the handbook's delayed terminal risk windows. (Measured on the
#: handbook data: terminal transaction counts and fraud shares add nothing but noise.)
DEFAULT_FEATURES: tuple[str, ...] = (
    "amount",
    "by_customer.count_1d",
    "by_customer.mean_1d",
    "by_customer.count_7d",
    "by_customer.mean_7d",
    "by_customer.count_30d",
    "by_customer.mean_30d",
    "by_customer.max_30d",
    "by_customer.amount_ratio_7d",
    "by_customer.amount_ratio_30d",
    "by_customer.seconds_since_last",
    "by_terminal.fraud_count_8d",
    "by_terminal.fraud_count_14d",
    "by_terminal.fraud_count_30d",
    "by_customer.amount_ratio_1d",
    "by_customer.max_7d",
)
MISSING = -1.0


@dataclass(frozen=True)
class Params:
    """LightGBM settings; small trees keep pure-Python scoring fast."""

    trees: int = 150
    leaves: int = 8
    max_depth: int = 4
    learning_rate: float = 0.05
    min_child_samples: int = 300
    seed: int = 0


class _TrainingReads:
    """Stands in for a model so the detector computes exactly these features."""

    version = "training"

    def __init__(self, features: Sequence[str], state: str) -> None:
        self.variables = frozenset(features)
        self.state = state

    def score(self, activation: Mapping[str, Any]) -> tuple[float, list[Any]]:
        raise AssertionError("not a model")  # pragma: no cover


def training_detector(features: Sequence[str], state: str = "tiled") -> Detector:
    """A detector over a fresh memory store that computes `features` (and the rules' own)
    from `state` windows ("tiled" or "exact")."""
    reads = _TrainingReads(features, state)
    config = state_config(reads)  # the windows live scoring will use
    rules = load_rules(DetectorConfig(), config)
    return Detector(rules, memory_store(config), model=reads)


def examples(
    lines: Iterable[bytes],
    labels: Mapping[str, bool],
    *,
    until: datetime,
    since: datetime | None = None,
    label_delay: float,
    features: Sequence[str] = DEFAULT_FEATURES,
    state: str = "tiled",
    progress: Any = None,
) -> tuple[list[list[float]], list[int]]:
    """Feature rows and targets of the labelled transactions in [since, until).

    The stream is replayed from its start (state needs the history) and stops at `until`.
    """
    detector = training_detector(features, state)
    store = detector.store
    assert store is not None
    first = since.timestamp() if since is not None else float("-inf")
    rows: list[list[float]] = []
    targets: list[int] = []
    seen = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()  # see detector.offline.replay.replay: the store's objects make cyclic GC costly
    try:
        for item in merge_labels(Stream(lines, until.timestamp()), labels, label_delay):
            if isinstance(item, KnownLabel):
                store.record_label(item.transaction_id, item.is_fraud)
                continue
            decoded = item.item
            activation = detector.activation(
                decoded.transaction, item.transaction_id, decoded.moment
            )
            seen += 1
            if progress is not None and seen % 100_000 == 0:
                progress(seen)
            label = labels.get(item.transaction_id)
            if item.time < first or label is None:
                continue
            rows.append(vector(activation, features, MISSING))
            targets.append(int(label))
    finally:
        if gc_was_enabled:
            gc.enable()
    return rows, targets


def _flatten(structure: Mapping[str, Any], n_features: int) -> Tree:
    """One LightGBM tree (dump_model's nested form) as node arrays, parents before children."""
    feature: list[int] = []
    threshold: list[float] = []
    left: list[int] = []
    right: list[int] = []
    value: list[float] = []

    def visit(node: Mapping[str, Any]) -> int:
        index = len(feature)
        feature.append(-1)
        threshold.append(0.0)
        left.append(-1)
        right.append(-1)
        if "split_feature" not in node:
            value.append(float(node["leaf_value"]))
            return index
        if node["decision_type"] != "<=":
            raise InputError(f"unsupported LightGBM split {node['decision_type']!r}")
        value.append(float(node["internal_value"]))
        feature[index] = int(node["split_feature"])
        threshold[index] = float(node["threshold"])
        left[index] = visit(node["left_child"])
        right[index] = visit(node["right_child"])
        return index

    visit(structure)
    return Tree(feature, threshold, left, right, value)


def fit(
    rows: list[list[float]],
    targets: list[int],
    features: Sequence[str],
    version: str,
    params: Params = Params(),
    metadata: Mapping[str, Any] | None = None,
    state: str = "tiled",
) -> TreeModel:
    """Fit LightGBM on the rows (features from `state` windows) and export the ensemble as
    a `TreeModel`.

    Raises:
        InputError: no examples, or only one class among them; or the export does not
            reproduce LightGBM's scores.
    """
    # Training-only dependencies (the `train` extra): imported here so replay and the other
    # commands run without them.
    import lightgbm
    import numpy as np

    if not rows:
        raise InputError("no labelled transactions before --until (and after --since)")
    positives = sum(targets)
    if positives == 0 or positives == len(targets):
        raise InputError(
            f"labels: need both classes to train, got {positives} fraud of {len(targets)}"
        )
    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int32)
    booster = lightgbm.train(
        {
            "objective": "binary",
            "num_leaves": params.leaves,
            "max_depth": params.max_depth,
            "learning_rate": params.learning_rate,
            "min_child_samples": params.min_child_samples,
            "seed": params.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": 2,
            "verbosity": -1,
        },
        lightgbm.Dataset(x, label=y, feature_name=[f"f{i}" for i in range(len(features))]),
        num_boost_round=params.trees,
    )
    dump = booster.dump_model()
    trees = [_flatten(info["tree_structure"], len(features)) for info in dump["tree_info"]]
    info = dict(metadata or {})
    info.update(
        library=f"lightgbm {lightgbm.__version__}",
        examples=len(rows),
        frauds=positives,
        params={
            "trees": params.trees,
            "leaves": params.leaves,
            "max_depth": params.max_depth,
            "learning_rate": params.learning_rate,
            "min_child_samples": params.min_child_samples,
        },
    )
    model = TreeModel(version, features, trees, MISSING, info, state=state)
    # The artifact must score exactly like LightGBM: check a sample.
    step = max(1, len(rows) // 2000)
    sample = x[::step]
    expected = booster.predict(sample, raw_score=True)
    for row, want in zip(sample.tolist(), np.asarray(expected).tolist(), strict=True):
        activation = _activation_of(row, features)
        got = model.raw_score(activation)
        if abs(got - want) > 1e-6 * max(1.0, abs(want)):
            raise InputError(f"export check: artifact scores {got!r}, LightGBM {want!r}")
    return model


def _activation_of(row: Sequence[float], features: Sequence[str]) -> dict[str, Any]:
    """An activation holding a feature row (missing values become absent keys)."""
    activation: dict[str, Any] = {}
    for name, value in zip(features, row, strict=True):
        if value == MISSING:
            continue
        if "." in name:
            entity, feature = name.split(".", 1)
            activation.setdefault(entity, {})[feature] = value
        else:
            activation[name] = value
    return activation


def train(
    lines: Iterable[bytes],
    labels: Mapping[str, bool],
    *,
    until: datetime,
    since: datetime | None = None,
    label_delay: float,
    version: str,
    params: Params = Params(),
    features: Sequence[str] = DEFAULT_FEATURES,
    state: str = "tiled",
    progress: Any = None,
) -> TreeModel:
    """Replay, fit and export; see the module docstring."""
    rows, targets = examples(
        lines,
        labels,
        until=until,
        since=since,
        label_delay=label_delay,
        features=features,
        state=state,
        progress=progress,
    )
    metadata = {
        "since": since.isoformat() if since else None,
        "until": until.isoformat(),
        "label_delay_seconds": label_delay,
    }
    return fit(rows, targets, features, version, params, metadata, state)
