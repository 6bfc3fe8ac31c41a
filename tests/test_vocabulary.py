"""The detector's vocabulary: one duration grammar, names derived from one list of entities."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detector.errors import ConfigError
from detector.vocabulary import (
    ENTITIES,
    ENTITY_VARIABLES,
    format_duration,
    parse_duration,
    window_of,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("7d", 604800.0),
        ("12h", 43200.0),
        ("15m", 900.0),
        ("90s", 90.0),
        ("90", 90.0),
        ("0", 0.0),
        ("1.5h", 5400.0),
        (" 2d ", 172800.0),
    ],
)
def test_durations_read_a_number_and_an_optional_unit(text: str, seconds: float) -> None:
    """Every duration of the project is written this way: CLI flags, windows, settings."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "1w", "h", "-1d", "7 days", "1e3s"])
def test_a_bad_duration_names_the_setting(bad: str) -> None:
    """The error names what was being read, the grammar and the text."""
    with pytest.raises(
        ConfigError, match=r"^--label-delay: expected a number and one of d, h"
    ) as e:
        parse_duration(bad, setting="--label-delay")
    assert e.value.setting == "--label-delay"


@given(st.integers(1, 10**8))
def test_formatted_durations_parse_back(seconds: int) -> None:
    """Feature suffixes are durations: what `format_duration` writes, `parse_duration` reads."""
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("feature", "window"),
    [
        ("count_1h", 3600),
        ("by_card.mean_30d", 2592000),
        ("fraud_count_8d", 691200),
        ("seconds_since_last", None),
        ("amount", None),
        ("count_0h", None),
    ],
)
def test_window_of_a_feature(feature: str, window: int | None) -> None:
    """A feature's window is its suffix; features without one have none."""
    assert window_of(feature) == window


def test_entity_variables_follow_the_entity_kinds() -> None:
    """Rules and model name each entity kind's features `by_<kind>`."""
    assert list(ENTITY_VARIABLES) == list(ENTITIES)
    assert all(variable == f"by_{kind}" for kind, variable in ENTITY_VARIABLES.items())
