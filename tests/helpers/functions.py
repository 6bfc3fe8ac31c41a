"""functions-framework helpers for the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from stack import services


def startup_error(env: dict[str, str], workdir: Path) -> str:
    """The error with which functions-framework fails to start score_transaction under env."""
    with (
        pytest.raises(RuntimeError) as caught,
        services.function_server("score_transaction", "http", env, workdir),
    ):
        pass
    return str(caught.value)
