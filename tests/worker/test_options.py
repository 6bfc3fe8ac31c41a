"""The worker's options: subscription names and flag limits, with errors that name the flag."""

from __future__ import annotations

import pytest

from detector.errors import ConfigError
from detector.worker.options import WorkerOptions, subscription_path


@pytest.mark.parametrize(
    ("name", "project", "path"),
    [
        ("fraud-worker", "p1", "projects/p1/subscriptions/fraud-worker"),
        ("projects/other/subscriptions/s", "", "projects/other/subscriptions/s"),
    ],
)
def test_subscription_path(name: str, project: str, path: str) -> None:
    assert subscription_path(name, project) == path


@pytest.mark.parametrize(
    ("name", "project", "message"),
    [
        ("fraud-worker", "", "GOOGLE_CLOUD_PROJECT: must be set for the short name --subscription"),
        (
            "projects/p/topics/t",
            "p",
            "--subscription: expected projects/PROJECT/subscriptions/NAME",
        ),
        ("a/b", "p", "--subscription: expected a subscription name, got 'a/b'"),
    ],
)
def test_bad_subscription_names_are_config_errors(name: str, project: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        subscription_path(name, project)


def test_out_of_range_flags_are_all_reported_at_once() -> None:
    """Every problem in one error, each naming its flag and the limit."""
    with pytest.raises(ConfigError) as caught:
        WorkerOptions(subscription="s", batch_size=2000, max_messages=10, drain_timeout=0, lease=5)
    assert str(caught.value) == (
        "--batch-size: must be in 1..1000, got 2000; "
        "--max-messages: must be >= --batch-size (2000), got 10; "
        "--drain-timeout: must be in (0, 60] s, got 0; "
        "--lease: must be in 10..600 s, got 5"
    )
