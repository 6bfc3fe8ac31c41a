"""Fixtures shared by every test module: real services, fresh names, a clean environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from stack import services
from tests.helpers.pubsub import PROJECT

# Property tests check results, not speed: on a loaded 2-core machine an example can take
# longer than hypothesis's default deadline of 200 ms without anything being wrong.
settings.register_profile("project", deadline=None)
settings.load_profile("project")


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """HOST:PORT of a real Pub/Sub emulator shared by the whole session."""
    with services.pubsub_emulator(tmp_path_factory.mktemp("emulator")) as host:
        yield host


@pytest.fixture()
def pubsub_env(emulator: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point the Pub/Sub client of this process at the emulator; returns the variables set."""
    env = {"PUBSUB_EMULATOR_HOST": emulator, "GOOGLE_CLOUD_PROJECT": PROJECT}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real redis-server shared by the whole session."""
    with services.redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of one node of a real three-master Redis Cluster shared by the whole session."""
    with services.redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as url:
        yield url


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """Tests may change os.environ; each starts from the same one."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    return tmp_path
