"""Real services for tests and the local stack: the Pub/Sub emulator, redis-server, functions-framework.

Each starts in its own process group on a port picked here and is stopped by killing that
group, so no Java or gunicorn child outlives the test run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
def pubsub_emulator(workdir: Path) -> Iterator[str]:
    """Run the Pub/Sub emulator; yields its HOST:PORT."""
    port = free_port()
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


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """Run a throwaway redis-server with no persistence; yields its redis:// URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian package redis-server)")
    port = free_port()
    process = start(
        [
            binary,
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
        ],
        workdir / "redis.log",
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            if time.monotonic() > deadline or process.popen.poll() is not None:
                raise RuntimeError(f"redis-server did not start:\n{process.output()}")
            time.sleep(0.05)
        yield url
    finally:
        process.stop()


@contextlib.contextmanager
def function_server(
    target: str,
    signature: str,
    env: Mapping[str, str],
    workdir: Path,
    source: Path = ROOT / "detector" / "main.py",
) -> Iterator[str]:
    """Serve one function of detector/main.py with functions-framework; yields its base URL."""
    port = free_port()
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
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", process, timeout=60)
        yield url
    finally:
        process.stop()
