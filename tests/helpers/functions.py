"""functions-framework helpers for the tests."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from detector.functions import Service
from stack import services


def startup_error(env: dict[str, str], workdir: Path) -> str:
    """The error with which functions-framework fails to start score_transaction under env."""
    with (
        pytest.raises(RuntimeError) as caught,
        services.function_server("score_transaction", "http", env, workdir),
    ):
        pass
    return str(caught.value)


@contextlib.contextmanager
def app(target: str, signature: str, env: dict[str, str]) -> Iterator[tuple[Any, Service]]:
    """functions-framework's app for detector/main.py's `target`, as a Flask test client, and
    the Service behind it with a memory sink in place of Pub/Sub.

    The module is loaded as functions-framework loads it (settings from `env`); the collector
    policy it installs is undone at once, the root logger's handlers afterwards.
    """
    import gc

    import functions_framework

    from detector.functions import MemoryVerdictSink

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    callbacks = gc.callbacks[:]
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        flask_app = functions_framework.create_app(
            target, str(services.ROOT / "detector" / "main.py"), signature
        )
        service: Service = sys.modules["main"].service
        service.sink = MemoryVerdictSink()
        # main.py freezes what is alive (the function's collector policy); frozen objects are
        # invisible to gc.get_referrers, which hypothesis uses to check its own random
        # generator, so the tests run with the collector as it was.
        gc.callbacks[:] = callbacks
        gc.unfreeze()
        yield flask_app.test_client(), service
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        gc.callbacks[:] = callbacks
        gc.unfreeze()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
