"""The risk model artifact: scoring, attribution, loading errors, and how the function loads it."""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from detector.config import DetectorConfig, build_detector
from detector.errors import ConfigError, ModelError
from detector.model import (
    FORMAT,
    TreeModel,
    default_model_path,
    load_model,
    parse_model,
    vector,
)
from detector.state import MemoryStore, TiledMemoryStore

FEATURES = ["amount", "by_customer.mean_30d", "by_terminal.fraud_count_30d"]

# Tree 0 splits on amount <= 220, then (left) on the customer's mean <= 50.
# Tree 1 splits on the terminal's fraud count <= 0.5.
ARTIFACT: dict[str, Any] = {
    "format": FORMAT,
    "version": "test-1",
    "features": FEATURES,
    "missing": -1.0,
    "trees": [
        {
            "feature": [0, 1, -1, -1, -1],
            "threshold": [220.0, 50.0, 0.0, 0.0, 0.0],
            "left": [1, 2, -1, -1, -1],
            "right": [4, 3, -1, -1, -1],
            "value": [-3.0, -3.5, -4.0, -2.0, 2.0],
        },
        {
            "feature": [2, -1, -1],
            "threshold": [0.5, 0.0, 0.0],
            "left": [1, -1, -1],
            "right": [2, -1, -1],
            "value": [0.0, -0.2, 1.5],
        },
    ],
    "training": {"note": "hand-made"},
}


def reference_raw(doc: dict[str, Any], activation: dict[str, Any]) -> float:
    """Walk the node arrays directly: the definition the compiled code must match."""
    values = vector(activation, doc["features"], doc["missing"])
    total = 0.0
    for tree in doc["trees"]:
        node = 0
        while tree["feature"][node] >= 0:
            goes_left = values[tree["feature"][node]] <= tree["threshold"][node]
            node = tree["left"][node] if goes_left else tree["right"][node]
        total += tree["value"][node]
    return total


def model() -> TreeModel:
    return parse_model(orjson.dumps(ARTIFACT))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_score_is_the_logistic_of_the_leaves_reached() -> None:
    """A large amount at a terminal with known frauds reaches leaves 2.0 and 1.5."""
    activation = {
        "amount": 500.0,
        "by_customer": {"mean_30d": 40.0},
        "by_terminal": {"fraud_count_30d": 2.0},
    }
    probability, factors = model().score(activation)
    assert probability == pytest.approx(sigmoid(3.5))
    assert [f.feature for f in factors] == ["amount", "by_terminal.fraud_count_30d"]
    assert factors[0].value == 500.0
    assert factors[0].contribution == pytest.approx(5.0)  # -3.0 -> 2.0
    assert factors[1].contribution == pytest.approx(1.5)


def test_absent_features_take_the_missing_value() -> None:
    """No history: the customer's mean is -1 (<= 50) and the terminal count -1 (<= 0.5)."""
    probability, factors = model().score({"amount": 10.0})
    assert probability == pytest.approx(sigmoid(-4.0 + -0.2))
    by_name = {f.feature: f for f in factors}
    assert by_name["by_customer.mean_30d"].value == -1.0


def test_contributions_add_up_to_the_raw_score() -> None:
    """Saabas attribution is exact: bias + credits = raw score."""
    m = model()
    activation = {"amount": 100.0, "by_customer": {"mean_30d": 80.0}}
    _values, credits, _top = m._walk(activation)
    assert m.bias + sum(credits) == pytest.approx(reference_raw(ARTIFACT, activation))
    assert m.raw_score(activation) == pytest.approx(reference_raw(ARTIFACT, activation))


@given(
    amount=st.floats(0, 5000),
    mean=st.none() | st.floats(0, 500),
    frauds=st.none() | st.integers(0, 5),
)
def test_compiled_walk_matches_the_node_arrays(
    amount: float, mean: float | None, frauds: int | None
) -> None:
    """For any input, the generated code reaches the same leaves as walking the arrays."""
    activation: dict[str, Any] = {"amount": amount, "by_customer": {}, "by_terminal": {}}
    if mean is not None:
        activation["by_customer"]["mean_30d"] = mean
    if frauds is not None:
        activation["by_terminal"]["fraud_count_30d"] = float(frauds)
    assert model().raw_score(activation) == pytest.approx(reference_raw(ARTIFACT, activation))


def _edges(doc: dict[str, Any]) -> list[list[float]]:
    """Per feature: every split threshold, its neighbours, and the values that break bins."""
    values: list[set[float]] = [
        {-1.0, 0.0, -0.0, math.inf, -math.inf, math.nan} for _ in doc["features"]
    ]
    for tree in doc["trees"]:
        for feature, threshold in zip(tree["feature"], tree["threshold"], strict=True):
            if feature >= 0:
                values[feature].update(
                    {
                        threshold,
                        math.nextafter(threshold, -math.inf),
                        math.nextafter(threshold, math.inf),
                    }
                )
    return [sorted(v, key=lambda x: (math.isnan(x), x)) for v in values]


def place(activation: dict[str, Any], name: str, value: object) -> None:
    """Set a model input in an activation: `amount`, or `by_card.count_1h` in its entity."""
    entity, _, feature = name.rpartition(".")
    if entity:
        activation.setdefault(entity, {})[feature] = value
    else:
        activation[name] = value


def edges_or_floats(edges: list[float]) -> st.SearchStrategy[float]:
    return st.sampled_from(edges) | st.floats(allow_nan=True)


BUNDLED = orjson.loads(default_model_path().read_bytes())
BUNDLED_EDGES = _edges(BUNDLED)
bundled_model = functools.cache(lambda: load_model(default_model_path()))


@given(st.data())
def test_bundled_model_goes_the_way_of_the_node_arrays_at_every_threshold(
    data: st.DataObject,
) -> None:
    """The compiled walk compares each feature's bin (bisect over its thresholds): on the
    thresholds themselves, one ulp either side, NaN and infinities it takes the same branches
    as comparing the values, for every tree of the bundled model."""
    activation: dict[str, Any] = {}
    for name, edges in zip(BUNDLED["features"], BUNDLED_EDGES, strict=True):
        place(activation, name, data.draw(edges_or_floats(edges), label=name))
    got = bundled_model().raw_score(activation)
    assert got == pytest.approx(reference_raw(BUNDLED, activation), rel=1e-9, abs=1e-9)


def pure(m: TreeModel) -> TreeModel:
    """The same model walked in generated Python, whether or not the C walk is built."""
    return TreeModel(m.version, m.features, m.trees, m.missing, m.metadata, native=False)


native = pytest.mark.skipif(
    not bundled_model().native, reason="the C walk is not built here (make native)"
)


@native
@given(st.data())
def test_the_c_walk_gives_the_bits_of_the_python_walk_on_the_bundled_model(
    data: st.DataObject,
) -> None:
    """Probability, factors and their order are identical, on thresholds and off them."""
    activation: dict[str, Any] = {"weekday": data.draw(st.integers(1, 7), label="weekday")}
    for name, edges in zip(BUNDLED["features"], BUNDLED_EDGES, strict=True):
        if data.draw(st.booleans(), label=f"{name} present"):
            place(activation, name, data.draw(edges_or_floats(edges), label=name))
    fast, slow = bundled_model(), pure(bundled_model())
    assert fast.native and not slow.native
    assert repr(fast.score(activation)) == repr(slow.score(activation))
    assert repr(fast.raw_score(activation)) == repr(slow.raw_score(activation))


@native
@pytest.mark.parametrize("weekday", [2**53 + 1, True, "3"])
def test_both_walks_take_an_input_as_float_does(weekday: object) -> None:
    """Both walks compare float(value), as training's `vector` does: an int past 2**53 is
    rounded, a bool is 0 or 1, a numeric string is parsed."""
    doc = {
        "format": FORMAT,
        "version": "edge",
        "features": ["weekday"],
        "trees": [
            {
                "feature": [0, -1, -1],
                "threshold": [float(2**53) if isinstance(weekday, int) else 2.5, 0.0, 0.0],
                "left": [1, -1, -1],
                "right": [2, -1, -1],
                "value": [0.0, -1.0, 1.0],
            }
        ],
    }
    fast = parse_model(orjson.dumps(doc))
    expected = 1.0 if weekday == "3" else -1.0  # float("3") > 2.5; float(2**53 + 1) == 2**53
    assert fast.raw_score({"weekday": weekday}) == expected
    assert pure(fast).raw_score({"weekday": weekday}) == expected
    assert repr(fast.score({"weekday": weekday})) == repr(pure(fast).score({"weekday": weekday}))


@st.composite
def forests(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A random artifact (any shape, ties between credits likely) and inputs for it."""
    width = draw(st.integers(1, 5))
    values = st.sampled_from([0.0, 0.5, -0.5, 1.0, 2.0]) | st.floats(-8, 8)
    trees = []
    for _ in range(draw(st.integers(1, 6))):
        feature: list[int] = [-1]
        threshold: list[float] = [0.0]
        left: list[int] = [-1]
        right: list[int] = [-1]
        leaves = [0]
        for _ in range(draw(st.integers(0, 6))):
            node = leaves.pop(draw(st.integers(0, len(leaves) - 1)))
            feature[node] = draw(st.integers(0, width - 1))
            threshold[node] = draw(st.sampled_from([0.0, 1.0, -1.0]) | st.floats(-5, 5))
            left[node], right[node] = len(feature), len(feature) + 1
            for _ in range(2):
                leaves.append(len(feature))
                feature.append(-1)
                threshold.append(0.0)
                left.append(-1)
                right.append(-1)
        node_values = [draw(values) for _ in feature]
        trees.append(
            {
                "feature": feature,
                "threshold": threshold,
                "left": left,
                "right": right,
                "value": node_values,
            }
        )
    names = ["amount", "hour", "weekday", "by_card.count_1h", "by_terminal.sum_7d"][:width]
    doc = {"format": FORMAT, "version": "random", "features": names, "trees": trees}
    inputs = st.sampled_from([0.0, 1.0, -1.0, math.nan, math.inf]) | st.floats(-6, 6)
    activations = []
    for _ in range(draw(st.integers(1, 5))):
        activation: dict[str, Any] = {}
        for name in names:
            if draw(st.booleans()):
                value = draw(st.integers(-3, 3)) if name == "weekday" else draw(inputs)
                place(activation, name, value)
        activations.append(activation)
    return doc, activations


@native
@given(forests())
def test_the_c_walk_gives_the_bits_of_the_python_walk_on_any_forest(
    case: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    doc, activations = case
    fast = parse_model(orjson.dumps(doc))
    slow = pure(fast)
    assert fast.native
    for activation in activations:
        assert repr(fast.score(activation)) == repr(slow.score(activation))


def test_round_trip_through_json() -> None:
    """to_json writes what parse_model reads."""
    again = parse_model(model().to_json())
    assert again.version == "test-1"
    assert again.variables == frozenset(FEATURES)
    assert again.raw_score({"amount": 300.0}) == model().raw_score({"amount": 300.0})


def broken(**changes: Any) -> bytes:
    doc = orjson.loads(orjson.dumps(ARTIFACT))
    doc.update(changes)
    return orjson.dumps(doc)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not a JSON model artifact"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (broken(format="onnx"), "format: must be 'fraud-detector-trees/1', got 'onnx'"),
        (broken(version=""), "version: must be a non-empty string"),
        (broken(features=["amount", "os.system"]), "features[1]: must be one of"),
        (broken(trees=[]), "trees: must be a non-empty list"),
        (broken(state="sketch"), "state: must be one of tiled, exact, got 'sketch'"),
        (
            broken(trees=[{**ARTIFACT["trees"][1], "left": [0, -1, -1]}]),
            "trees[0]: node 0 has child 0, outside (0, 3)",
        ),
        (
            broken(trees=[{**ARTIFACT["trees"][1], "feature": [7, -1, -1]}]),
            "trees[0].feature[0]: must be < 3, got 7",
        ),
        (
            broken(trees=[{**ARTIFACT["trees"][1], "value": [0.0, "x", 1.0]}]),
            "trees[0].value: must hold finite numbers only",
        ),
    ],
)
def test_corrupt_artifacts_are_rejected_with_the_problem(data: bytes, message: str) -> None:
    """Each kind of damage is reported by field."""
    with pytest.raises(ModelError) as caught:
        parse_model(data, "model 'm.json'")
    assert message in str(caught.value)
    assert str(caught.value).startswith("model 'm.json': ")


def test_missing_model_file_stops_the_function(tmp_path: Path) -> None:
    """MODEL_PATH pointing nowhere: build_detector raises a ConfigError naming the path."""
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"MODEL_PATH: no model file at '.*nope\.json'"):
        build_detector(DetectorConfig(model_path=str(missing)), MemoryStore())


def test_corrupt_model_file_stops_the_function(tmp_path: Path) -> None:
    """A truncated artifact: build_detector raises a ConfigError naming the file."""
    path = tmp_path / "model.json"
    path.write_bytes(orjson.dumps(ARTIFACT)[:100])
    with pytest.raises(ConfigError, match=r"model '.*model\.json': not a JSON model artifact"):
        build_detector(DetectorConfig(model_path=str(path)), MemoryStore())


def test_model_path_none_disables_the_model() -> None:
    """MODEL_PATH=none: rules only, the verdict carries no model_version."""
    detector = build_detector(DetectorConfig(model_path="none"), MemoryStore())
    assert detector.model is None


def test_the_bundled_default_is_loaded_when_unset() -> None:
    """No MODEL_PATH: the bundled artifact (< 1 MB) scores every verdict."""
    assert default_model_path().stat().st_size < 1_000_000
    detector = build_detector(DetectorConfig(), MemoryStore())
    assert detector.model is not None
    assert detector.model.version == load_model(default_model_path()).version


def test_a_configured_model_scores_the_verdict(tmp_path: Path) -> None:
    """With a model, the verdict's score is its probability, with version and factors."""
    path = tmp_path / "model.json"
    path.write_bytes(orjson.dumps(ARTIFACT))
    detector = build_detector(DetectorConfig(model_path=str(path)), MemoryStore())
    from detector.transaction import decode

    raw, transaction = decode(b'{"amount": 500, "customer_id": "c1", "terminal_id": "t1"}')
    moment = time.time()
    from datetime import UTC, datetime

    now = datetime.fromtimestamp(moment, UTC)
    verdict = detector.decide(raw, transaction, message_id="m", default_time=now, decided_at=now)
    # No history: mean -1 (<= 50 but amount > 220 goes right: 2.0), frauds -1 (-0.2).
    assert verdict.body["score"] == round(sigmoid(1.8), 6)
    assert verdict.body["model_version"] == "test-1"
    assert verdict.body["score_factors"][0]["feature"] == "amount"


def test_scoring_the_bundled_model_is_fast() -> None:
    """One score of the bundled model takes well under a millisecond (target 20 us)."""
    m = load_model(default_model_path())
    activation = {
        "amount": 80.0,
        "by_customer": {"count_1d": 2.0, "mean_30d": 50.0, "amount_ratio_30d": 1.6},
        "by_terminal": {"count_30d": 300.0, "fraud_count_30d": 1.0},
    }
    started = time.process_time()
    for _ in range(1000):
        m.score(activation)
    per_call = (time.process_time() - started) / 1000
    assert per_call < 0.001


def test_windows_the_model_reads_are_added_to_the_state(tmp_path: Path) -> None:
    """A model reading fraud_count_8d gets an 8-day window in the store and rules schema."""
    doc = orjson.loads(orjson.dumps(ARTIFACT))
    doc["features"] = ["amount", "by_customer.mean_30d", "by_terminal.fraud_count_8d"]
    path = tmp_path / "model.json"
    path.write_bytes(orjson.dumps(doc))
    detector = build_detector(DetectorConfig(model_path=str(path)))
    assert isinstance(detector.store, MemoryStore)
    assert 8 * 86400 in detector.store.config.windows
    assert "by_terminal.fraud_count_8d" in detector.model.variables  # type: ignore[union-attr]


@pytest.mark.parametrize(("state", "store"), [("tiled", TiledMemoryStore), ("exact", MemoryStore)])
def test_the_store_computes_the_windows_the_model_was_trained_on(
    tmp_path: Path, state: str, store: type
) -> None:
    """An artifact says which window features it learned from; one from before tiles, none."""
    doc = orjson.loads(orjson.dumps(ARTIFACT))
    if state == "tiled":
        doc["state"] = "tiled"
    path = tmp_path / "model.json"
    path.write_bytes(orjson.dumps(doc))
    model = load_model(path)
    assert model.state == state
    assert parse_model(model.to_json()).state == state
    detector = build_detector(DetectorConfig(model_path=str(path)))
    assert type(detector.store) is store
    assert detector.store.config.tiled is (state == "tiled")  # type: ignore[union-attr]


@pytest.mark.integration
def test_a_corrupt_model_stops_the_function_from_starting(workdir: Path) -> None:
    """Under functions-framework, a corrupt MODEL_PATH fails start-up with the file and problem."""
    from tests.helpers.functions import startup_error
    from tests.helpers.pubsub import PROJECT

    path = workdir / "model.json"
    path.write_bytes(b'{"format": "fraud-detector-trees/1", "version": "x", "trees": []}')
    error = startup_error({"GOOGLE_CLOUD_PROJECT": PROJECT, "MODEL_PATH": str(path)}, workdir)
    assert "model.json" in error
    assert "trees: must be a non-empty list" in error


@pytest.mark.integration
def test_the_http_function_scores_with_the_bundled_model(workdir: Path) -> None:
    """With no MODEL_PATH the deployed function's verdict carries the model's score and reasons."""
    import requests

    from stack import services
    from tests.helpers.pubsub import PROJECT

    env = {"GOOGLE_CLOUD_PROJECT": PROJECT}
    with services.function_server("score_transaction", "http", env, workdir) as url:
        body = {"amount": 80, "customer_id": "c-1", "terminal_id": "t-1"}
        verdict = requests.post(url, json=body, timeout=10).json()
    assert verdict["model_version"] == load_model(default_model_path()).version
    assert 0 < verdict["score"] < 1
    assert len(verdict["score_factors"]) == 3


def chain(depth: int) -> dict[str, Any]:
    """A model of one tree `depth` splits deep: node 2k splits on amount <= k, its left child
    (2k + 1) is a leaf worth k, its right child goes on; the last right child is worth -1."""
    feature, threshold, left, right, value = [], [], [], [], []
    for level in range(depth):
        node = len(feature)
        feature += [0, -1]
        threshold += [float(level), 0.0]
        left += [node + 1, -1]
        right += [node + 2, -1]
        value += [0.0, float(level)]
    feature.append(-1)
    threshold.append(0.0)
    left.append(-1)
    right.append(-1)
    value.append(-1.0)
    return {
        "format": FORMAT,
        "version": f"chain-{depth}",
        "features": ["amount", "by_customer.mean_30d"],
        "missing": -1.0,
        "trees": [
            {
                "feature": feature,
                "threshold": threshold,
                "left": left,
                "right": right,
                "value": value,
            },
            ARTIFACT["trees"][1] | {"feature": [1, -1, -1]},
        ],
    }


@pytest.mark.parametrize("depth", [97, 98, 99, 300, 2000])
def test_a_tree_of_any_depth_loads_and_scores_in_python(depth: int) -> None:
    """Deep trees (beyond the nesting Python's parser allows) load and score as the arrays say."""
    doc = chain(depth)
    loaded = pure(parse_model(orjson.dumps(doc)))
    assert not loaded.native
    for amount in [-5.0, 0.0, 0.5, 17.0, depth - 1.0, depth + 0.5, float("nan")]:
        activation = {"amount": amount, "by_customer": {"mean_30d": amount}}
        assert loaded.raw_score(activation) == reference_raw(doc, activation)


@given(st.data())
def test_the_iterative_walk_gives_the_bits_of_the_generated_walk(data: st.DataObject) -> None:
    """Forcing every tree of the bundled model through the walk used for deep trees changes
    no bit of any score, factor or their order."""
    activation: dict[str, Any] = {"weekday": data.draw(st.integers(1, 7), label="weekday")}
    for name, edges in zip(BUNDLED["features"], BUNDLED_EDGES, strict=True):
        if data.draw(st.booleans(), label=f"{name} present"):
            place(activation, name, data.draw(edges_or_floats(edges), label=name))
    generated = pure(bundled_model())
    m = bundled_model()
    iterative = TreeModel(
        m.version, m.features, m.trees, m.missing, m.metadata, native=False, nesting_max=0
    )
    assert repr(iterative.score(activation)) == repr(generated.score(activation))
    assert repr(iterative.raw_score(activation)) == repr(generated.raw_score(activation))


@native
def test_a_deep_tree_scores_the_same_bits_in_c_and_python() -> None:
    """A 300-deep tree: the C walk and the Python walk agree to the bit."""
    fast = parse_model(orjson.dumps(chain(300)))
    for amount in [0.5, 150.25, 299.0, 1e9]:
        activation = {"amount": amount, "by_customer": {"mean_30d": 3.0}}
        assert repr(fast.score(activation)) == repr(pure(fast).score(activation))
