"""The risk model at run time: a tree ensemble read from JSON, scored in pure Python.

Training (`detector.offline.train`, with LightGBM) exports a self-contained artifact, so the function
imports neither numpy nor a boosting library and starts fast. An artifact looks like::

    {"format": "fraud-detector-trees/1",
     "version": "handbook-2026-11-29",           # becomes the verdict's model_version
     "features": ["amount", "by_customer.mean_30d", "by_terminal.fraud_share_30d", ...],
     "missing": -1.0,                             # value of an absent feature
     "state": "tiled",                            # window features trained on (absent: "exact")
     "trees": [{"feature": [0, 2, -1, ...],       # per node; -1 marks a leaf
                "threshold": [220.0, 0.5, 0.0, ...],
                "left": [1, ...], "right": [2, ...],
                "value": [-4.6, ...]}, ...],      # every node's raw score (log-odds)
     "training": {...}}                           # provenance, free form

Semantics: a node sends a transaction left when ``value <= threshold``; the raw score is the
sum of the leaves reached, and the probability its logistic. Feature names are exactly the
activation's (`amount`, `hour`, `weekday`, or `by_<entity>.<feature>`); a feature the
activation lacks (no history, no such entity) takes the artifact's `missing` value, the same
substitution `vector` makes for training, so training and scoring see identical inputs.

Attribution ("Saabas"): walking a tree from the root to its leaf, each split moves the node
value by ``value[child] - value[node]``; that move is credited to the split's feature. Summed
over trees, the credits plus the roots' values equal the raw score exactly. The verdict lists
the three largest by absolute value (log-odds units).

Speed: the ensemble is compiled, at load, into the source of ONE Python function that reads
each feature once into a local and walks every tree as nested ``if`` statements; each leaf adds
its precomputed per-feature path credits. The generated code contains only numbers and
``repr`` of feature names checked against a pattern. Where the optional C extension
`detector.model._forest` is built (``make native``; not in a Cloud Functions upload), the walk runs
there instead: the same comparisons and additions in the same order, so the same bits, faster
(BENCHMARKS.md, "Risk model"). `TreeModel.native` says which one runs.

Errors: `ModelError` (a `ConfigError`) at load, naming the path and the problem; never per
transaction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import orjson

from detector.errors import ModelError
from detector.vocabulary import ENTITY_VARIABLES, window_of

if TYPE_CHECKING:
    from detector.model._forest import Forest

FORMAT = "fraud-detector-trees/1"

#: The window features an artifact may say it was trained on (`StateConfig.tiled`).
STATES = ("tiled", "exact")
#: How many features a verdict names.
TOP_FACTORS = 3
#: Transaction fields a model may read directly (numbers only).
NUMERIC_FIELDS = frozenset({"amount", "hour", "weekday"})
_ENTITY_FEATURE = re.compile(rf"^({'|'.join(ENTITY_VARIABLES.values())})\.([a-z0-9_]+)$")
_MAX_NODES = 1_000_000


class Factor(NamedTuple):
    """One feature's push on the score: its value and its credit in log-odds."""

    feature: str
    value: float
    contribution: float


#: Deepest tree compiled to nested `if`s: Python's tokenizer allows 100 indentation levels,
#: and the walk's body starts one level in.
NESTING_MAX: Final = 90


def default_model_path() -> Path:
    """The bundled default model, trained on the handbook simulation."""
    return Path(__file__).resolve().parent / "models" / "default.json"


def windows_of(features: Iterable[str]) -> frozenset[int]:
    """Seconds of the state windows the features read ("by_terminal.fraud_count_8d" -> 8 days).

    The detector adds them to the store's windows, so a model can use delayed-label windows
    (a fraud count over 8 days holds the labels of days 7 to 8 when labels take 7 days).
    """
    found = (window_of(name) for name in features if "." in name)
    return frozenset(window for window in found if window is not None)


def vector(activation: Mapping[str, Any], features: Sequence[str], missing: float) -> list[float]:
    """The model's inputs from an activation, absent features replaced by `missing`.

    Training builds its matrix with this function; scoring compiles the same rule.
    """
    values = []
    for name in features:
        if "." in name:
            entity, feature = name.split(".", 1)
            value = (activation.get(entity) or {}).get(feature, missing)
        else:
            value = activation.get(name, missing)
        values.append(float(value))
    return values


@dataclass(frozen=True, slots=True)
class Tree:
    feature: list[int]
    threshold: list[float]
    left: list[int]
    right: list[int]
    value: list[float]


class TreeModel:
    """A gradient-boosted tree ensemble; implements the engine's `RiskModel` protocol.

    Attributes:
        version: the artifact's version label (the verdict's model_version).
        variables: the activation names it reads.
        features: the same, in input order.
    """

    def __init__(
        self,
        version: str,
        features: Sequence[str],
        trees: Sequence[Tree],
        missing: float = -1.0,
        metadata: Mapping[str, Any] | None = None,
        *,
        state: str = "tiled",
        native: bool = True,
        nesting_max: int = NESTING_MAX,
    ) -> None:
        """See the class; `native=False` walks in Python even where the C extension is built.

        `nesting_max`: the deepest tree the Python walk compiles to nested code; a model with
        a deeper tree is walked by a loop instead (same additions in the same order, so the
        same bits, a few times slower).
        """
        self.version = version
        self.features = tuple(features)
        self.variables = frozenset(self.features)
        self._indexes = range(len(self.features))
        self.missing = missing
        self.metadata = dict(metadata or {})
        #: The window features it was trained on: "tiled", or "exact" (artifacts from
        #: before tiles): the detector computes the same ones (`StateConfig.tiled`).
        self.state = state
        self.trees = tuple(trees)
        self.bias = sum(tree.value[0] for tree in self.trees)
        self._credits = [_leaf_credits(tree) for tree in self.trees]
        forest = _forest(self.trees, self._credits, len(self.features)) if native else None
        #: Whether the walk runs in the C extension (else in generated Python).
        self.native = forest is not None
        deepest = max((_depth(tree) for tree in self.trees), default=0)
        if forest is None and deepest > nesting_max:
            self._walk = self._loop_walk()
        else:
            self._walk = self._compile(forest)

    def raw_score(self, activation: Mapping[str, Any]) -> float:
        """The ensemble's raw score (log-odds)."""
        credit: tuple[float, ...] = self._walk(activation)[1]
        return self.bias + sum(credit)

    def score(self, activation: Mapping[str, Any]) -> tuple[float, list[Factor]]:
        """Fraud probability and the `TOP_FACTORS` features that moved it most."""
        values, credit, top = self._walk(activation)
        raw = self.bias + sum(credit)
        if raw >= 0:
            probability = 1.0 / (1.0 + math.exp(-raw))
        else:
            odds = math.exp(raw)
            probability = odds / (1.0 + odds)
        names = self.features
        return probability, [Factor(names[i], values[i], credit[i]) for i in top]

    def _top(self, credit: tuple[float, ...]) -> list[int]:
        """Indexes of the `TOP_FACTORS` largest credits by size, largest first, zeros left out.

        Ties keep input order (a stable sort), as the C walk does.
        """
        size = list(map(abs, credit))
        top = sorted(self._indexes, key=size.__getitem__, reverse=True)[:TOP_FACTORS]
        return [i for i in top if size[i]]

    def _compile(self, forest: Forest | None) -> Any:
        """Generate and compile walk(activation) -> (feature values, credits, top credits).

        Each leaf adds its path's per-feature credits to local accumulators, so one call walks
        every tree with nothing but comparisons and float additions; with a `forest` (the C
        extension's), the generated code only reads the features and the forest walks.
        """
        lines = ["def walk(a):"]
        entities = sorted({name.split(".", 1)[0] for name in self.features if "." in name})
        for n, entity in enumerate(entities):
            lines.append(f"    e{n} = a.get({entity!r}) or E")
        local = {entity: f"e{n}" for n, entity in enumerate(entities)}
        missing = repr(float(self.missing))
        count = len(self.features)
        for i, name in enumerate(self.features):
            # Stores and the engine hold numbers (never None) under present keys, so one
            # dict lookup with a default and float() are the whole substitution `vector`
            # spells out (float: an int is compared as training saw it, in both walks).
            if "." in name:
                entity, feature = name.split(".", 1)
                lines.append(f"    f{i} = float({local[entity]}.get({feature!r}, {missing}))")
            else:
                lines.append(f"    f{i} = float(a.get({name!r}, {missing}))")
            if forest is None:
                lines.append(f"    c{i} = 0.0")
        values = ", ".join(f"f{i}" for i in range(count))
        comma = "," if count == 1 else ""
        if forest is None:
            for tree, credits in zip(self.trees, self._credits, strict=True):
                self._emit(tree, credits, 0, 1, lines)
            accumulators = ", ".join(f"c{i}" for i in range(count))
            lines.append(f"    c = ({accumulators}{comma})")
            lines.append(f"    return ({values}{comma}), c, top(c)")
        else:
            lines.append(f"    v = ({values}{comma})")
            lines.append(f"    c, t = forest(v, {TOP_FACTORS})")
            lines.append("    return v, c, t")
        self.source = "\n".join(lines) + "\n"
        namespace: dict[str, Any] = {"__builtins__": {}, "E": {}, "top": self._top, "float": float}
        if forest is not None:
            namespace["forest"] = forest.walk
        exec(compile(self.source, f"<model {self.version}>", "exec"), namespace)
        return namespace["walk"]

    def _loop_walk(self) -> Any:
        """walk(activation) as `_compile` generates it, by a loop over the node arrays.

        For models with a tree deeper than Python's parser can nest (about 100 levels): each
        leaf adds the same credits in the same order as the generated code, so the sums,
        and hence the scores and factors, are the same bits.
        """
        features, missing, count, top = (
            self.features,
            float(self.missing),
            len(self.features),
            self._top,
        )
        trees = [
            (tree.feature, tree.threshold, tree.left, tree.right, credits)
            for tree, credits in zip(self.trees, self._credits, strict=True)
        ]
        self.source = f"# walked by a loop: a tree is deeper than {NESTING_MAX} levels\n"

        def walk(
            activation: Mapping[str, Any],
        ) -> tuple[tuple[float, ...], tuple[float, ...], list[int]]:
            values = vector(activation, features, missing)
            credit = [0.0] * count
            for feature, threshold, left, right, leaves in trees:
                node = 0
                while (split := feature[node]) >= 0:
                    node = left[node] if values[split] <= threshold[node] else right[node]
                for index, amount in leaves[node]:
                    credit[index] += amount
            sums = tuple(credit)
            return tuple(values), sums, top(sums)

        return walk

    def _emit(
        self,
        tree: Tree,
        credits: dict[int, list[tuple[int, float]]],
        node: int,
        depth: int,
        lines: list[str],
    ) -> None:
        indent = "    " * depth
        feature = tree.feature[node]
        if feature < 0:
            adds = [f"c{f} += {c!r}" for f, c in credits[node]]
            lines.append(indent + ("; ".join(adds) or "pass"))
            return
        lines.append(f"{indent}if f{feature} <= {tree.threshold[node]!r}:")
        self._emit(tree, credits, tree.left[node], depth + 1, lines)
        lines.append(f"{indent}else:")
        self._emit(tree, credits, tree.right[node], depth + 1, lines)

    def to_json(self) -> bytes:
        """The artifact, as `load_model` reads it."""
        return orjson.dumps(
            {
                "format": FORMAT,
                "version": self.version,
                "features": list(self.features),
                "missing": self.missing,
                "state": self.state,
                "trees": [
                    {
                        "feature": t.feature,
                        "threshold": t.threshold,
                        "left": t.left,
                        "right": t.right,
                        "value": t.value,
                    }
                    for t in self.trees
                ],
                "training": self.metadata,
            }
        )


def _depth(tree: Tree) -> int:
    """Splits on the longest path from the root to a leaf (a lone leaf: 0)."""
    deepest = 0
    stack = [(0, 0)]
    while stack:
        node, depth = stack.pop()
        if tree.feature[node] < 0:
            deepest = max(deepest, depth)
        else:
            stack += [(tree.left[node], depth + 1), (tree.right[node], depth + 1)]
    return deepest


def _leaf_credits(tree: Tree) -> dict[int, list[tuple[int, float]]]:
    """What each leaf adds, by node: (feature, credit) for its path's features, in order.

    The raw score is bias + the sum of the credits (they telescope from the root to the
    leaf), so a leaf only adds its path's credits; a zero credit adds nothing. Both walks
    (generated Python and C) add exactly these, in this order.
    """
    leaves: dict[int, list[tuple[int, float]]] = {}
    stack: list[tuple[int, dict[int, float]]] = [(0, {})]
    while stack:
        node, credit = stack.pop()
        feature = tree.feature[node]
        if feature < 0:
            leaves[node] = [(f, c) for f, c in sorted(credit.items()) if c]
            continue
        for child in (tree.left[node], tree.right[node]):
            branch = dict(credit)
            branch[feature] = branch.get(feature, 0.0) + tree.value[child] - tree.value[node]
            stack.append((child, branch))
    return leaves


def _forest(
    trees: Sequence[Tree], credits: Sequence[dict[int, list[tuple[int, float]]]], width: int
) -> Forest | None:
    """The trees as the C extension's `Forest`, or None where it is not built."""
    try:
        from detector.model._forest import Forest
    except ImportError:
        return None
    feature: list[int] = []
    threshold: list[float] = []
    left: list[int] = []
    right: list[int] = []
    roots: list[int] = []
    starts: list[int] = []
    add_feature: list[int] = []
    add_credit: list[float] = []
    for tree, leaves in zip(trees, credits, strict=True):
        offset = len(feature)
        roots.append(offset)
        for node, split in enumerate(tree.feature):
            feature.append(split)
            threshold.append(tree.threshold[node])
            left.append(tree.left[node] + offset if split >= 0 else 0)
            right.append(tree.right[node] + offset if split >= 0 else 0)
            starts.append(len(add_feature))
            for f, c in leaves.get(node, ()):
                add_feature.append(f)
                add_credit.append(c)
    starts.append(len(add_feature))
    return Forest(width, feature, threshold, left, right, roots, starts, add_feature, add_credit)


def _check_feature(name: object) -> str | None:
    if not isinstance(name, str):
        return f"must be a string, got {name!r}"
    if name in NUMERIC_FIELDS or _ENTITY_FEATURE.match(name):
        return None
    return (
        f"must be one of {', '.join(sorted(NUMERIC_FIELDS))} or by_<entity>.<feature>, got {name!r}"
    )


def _parse_tree(index: int, raw: Any, n_features: int) -> tuple[Tree | None, list[str]]:
    where = f"trees[{index}]"
    if not isinstance(raw, dict):
        return None, [f"{where}: must be an object, got {type(raw).__name__}"]
    problems = []
    arrays: dict[str, list[Any]] = {}
    for key in ("feature", "threshold", "left", "right", "value"):
        value = raw.get(key)
        if not isinstance(value, list) or not value:
            problems.append(f"{where}.{key}: must be a non-empty list")
        else:
            arrays[key] = value
    if problems:
        return None, problems
    size = len(arrays["feature"])
    if size > _MAX_NODES or any(len(v) != size for v in arrays.values()):
        return None, [f"{where}: node arrays must have one equal length <= {_MAX_NODES}"]
    numbers = (int, float)
    for key in ("threshold", "value"):
        if not all(
            isinstance(v, numbers) and not isinstance(v, bool) and math.isfinite(v)
            for v in arrays[key]
        ):
            problems.append(f"{where}.{key}: must hold finite numbers only")
    for key in ("feature", "left", "right"):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in arrays[key]):
            problems.append(f"{where}.{key}: must hold integers only")
    if problems:
        return None, problems
    feature, left, right = arrays["feature"], arrays["left"], arrays["right"]
    # Every node must be reached exactly once from the root, children after parents:
    # this rules out cycles and keeps the generated code finite.
    seen = [False] * size
    stack = [0]
    while stack:
        node = stack.pop()
        if seen[node]:
            return None, [f"{where}: node {node} is reached twice"]
        seen[node] = True
        if feature[node] < 0:
            continue
        if feature[node] >= n_features:
            return None, [f"{where}.feature[{node}]: must be < {n_features}, got {feature[node]}"]
        for child in (left[node], right[node]):
            if not node < child < size:
                return None, [f"{where}: node {node} has child {child}, outside ({node}, {size})"]
            stack.append(child)
    if not all(seen):
        return None, [f"{where}: {seen.count(False)} nodes are unreachable from the root"]
    return Tree(
        feature,
        [float(v) for v in arrays["threshold"]],
        left,
        right,
        [float(v) for v in arrays["value"]],
    ), []


def parse_model(data: bytes, source: str = "<model>") -> TreeModel:
    """Build a model from artifact bytes.

    Raises:
        ModelError: not JSON, wrong format, or malformed; lists every problem found.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise ModelError(f"{source}: not a JSON model artifact ({error})") from None
    if not isinstance(doc, dict):
        raise ModelError(f"{source}: must be a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise ModelError(f"{source}: format: must be {FORMAT!r}, got {doc.get('format')!r}")
    problems = []
    version = doc.get("version")
    if not isinstance(version, str) or not version:
        problems.append(f"version: must be a non-empty string, got {version!r}")
    features = doc.get("features")
    if not isinstance(features, list) or not features:
        problems.append("features: must be a non-empty list of feature names")
        features = []
    for i, name in enumerate(features):
        problem = _check_feature(name)
        if problem:
            problems.append(f"features[{i}]: {problem}")
    missing = doc.get("missing", -1.0)
    if isinstance(missing, bool) or not isinstance(missing, int | float):
        problems.append(f"missing: must be a number, got {missing!r}")
    state = doc.get("state", "exact")
    if state not in STATES:
        problems.append(f"state: must be one of {', '.join(STATES)}, got {state!r}")
    raw_trees = doc.get("trees")
    trees: list[Tree] = []
    if not isinstance(raw_trees, list) or not raw_trees:
        problems.append("trees: must be a non-empty list")
    else:
        for index, raw in enumerate(raw_trees):
            tree, found = _parse_tree(index, raw, len(features))
            problems.extend(found)
            if tree is not None:
                trees.append(tree)
    if problems:
        raise ModelError(f"{source}: " + "; ".join(problems))
    metadata = doc.get("training")
    return TreeModel(
        str(version),
        features,
        trees,
        float(missing),
        metadata if isinstance(metadata, dict) else None,
        state=str(state),
    )


def load_model(path: str | Path) -> TreeModel:
    """Read a model artifact from a file.

    Raises:
        ModelError: the file is missing, unreadable or not a valid artifact.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ModelError(f"MODEL_PATH: no model file at {str(path)!r}") from None
    except OSError as error:
        raise ModelError(f"MODEL_PATH: cannot read {str(path)!r} ({error.strerror})") from None
    return parse_model(data, f"model {str(path)!r}")
