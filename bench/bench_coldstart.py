"""Cold start: import time of detector/main.py and the first request, against the original.

Usage: .venv/bin/python bench/bench_coldstart.py [--quick] [--repeats N] [--no-pubsub]

Three measurements, each for `detector/main.py` and the blog post's original function
(`bench/original/main.py`), alternating within the same run:

1. Import. A fresh interpreter imports functions-framework (which functions-framework has
   done before it loads the source), then loads the source file as functions-framework does
   (``importlib`` from the file path) and reports how long that load took; also the whole
   process's wall time, interpreter start included. Median of N processes. Target: < 300 ms
   for detector/main.py.
2. First HTTP request. Start ``functions-framework --target score_transaction``, wait for the
   port to accept connections, POST the blog's example transaction; report start-to-listening,
   the first request's latency, start-to-first-answer and a warm request's latency.
3. First Pub/Sub delivery (skipped with ``--no-pubsub``). The same with ``detect_fraud`` against
   the Pub/Sub emulator: the first push carries the cost of importing and connecting the
   Pub/Sub client, which detector/main.py defers to first use.

Then where the load of detector/main.py goes: each import and the loading of the ruleset and
the model, in CPU time. ``--quick`` runs one repeat of each (the smoke test).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import _report  # noqa: E402

from stack.services import free_port, pubsub_emulator, start, unique  # noqa: E402

DETECTOR = ROOT / "detector" / "main.py"
ORIGINAL = ROOT / "bench" / "original" / "main.py"
SOURCES = {"detector/main.py": DETECTOR, "original": ORIGINAL}
BLOG = {"amount": 1200, "merchant": "XYZ Corp", "customer_id": "12345"}
PROJECT = "bench"

# What functions-framework does before and when it loads the source (_function_registry.py).
IMPORT_PROBE = """
import importlib.util, json, os, sys, time
start = time.perf_counter()
import functions_framework
framework = time.perf_counter()
cpu = time.process_time()
path = os.path.realpath(sys.argv[1])
spec = importlib.util.spec_from_file_location(
    "main", path, submodule_search_locations=[os.path.dirname(path)]
)
module = importlib.util.module_from_spec(spec)
sys.modules["main"] = module
spec.loader.exec_module(module)
done = time.perf_counter()
cpu = time.process_time() - cpu
print(json.dumps({"framework": framework - start, "source": done - framework, "cpu": cpu}))
"""


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The functions' environment: a project, and an emulator address so no credentials."""
    env = dict(os.environ)
    env.setdefault("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")
    env["GOOGLE_CLOUD_PROJECT"] = PROJECT
    env.update(extra or {})
    return env


def import_once(source: Path) -> dict[str, float]:
    """Seconds to import functions-framework, then the source; and the process's wall time."""
    begin = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, str(source)],
        capture_output=True,
        text=True,
        env=environment(),
        cwd=ROOT,
        check=False,
    )
    wall = time.perf_counter() - begin
    if result.returncode != 0:
        raise RuntimeError(f"importing {source} failed:\n{result.stderr}")
    times: dict[str, float] = orjson.loads(result.stdout.strip().splitlines()[-1])
    times["process"] = wall
    return times


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.005)
    raise RuntimeError(f"port {port} did not open in {timeout} s")


@dataclass
class FirstRequest:
    listening: float  # process start -> port accepts connections
    first: float  # latency of the first request
    total: float  # process start -> first answer
    warm: float  # median latency of the next requests


@contextlib.contextmanager
def serve(
    source: Path, target: str, signature: str, env: Mapping[str, str], workdir: Path
) -> Iterator[tuple[int, subprocess.Popen[bytes], float]]:
    port = free_port()
    binary = Path(sys.executable).parent / "functions-framework"
    began = time.perf_counter()
    process = start(
        [str(binary), "--source", str(source), "--target", target, "--signature-type",
         signature, "--port", str(port), "--host", "127.0.0.1"],
        workdir / f"{source.parent.name}-{target}-{port}.log",
        env=env,
    )  # fmt: skip
    try:
        yield port, process.popen, began
    finally:
        process.stop()


def first_request(
    source: Path,
    target: str,
    signature: str,
    env: Mapping[str, str],
    workdir: Path,
    request: Mapping[str, object],
    warm: int,
) -> FirstRequest:
    """Start the function and time its first and following requests (see module doc)."""
    with (
        serve(source, target, signature, env, workdir) as (port, process, began),
        requests.Session() as http,
    ):
        wait_port(port, process)
        listening = time.perf_counter()
        url = f"http://127.0.0.1:{port}{request['path']}"
        headers = {"Content-Type": "application/json"}
        body = request["body"]
        assert isinstance(body, bytes)
        sent = time.perf_counter()
        response = http.post(url, data=body, headers=headers, timeout=60)
        answered = time.perf_counter()
        if response.status_code >= 300:
            raise RuntimeError(
                f"{source}: first request failed: {response.status_code} {response.text}"
            )
        latencies = []
        for _ in range(warm):
            before = time.perf_counter()
            http.post(url, data=body, headers=headers, timeout=60).raise_for_status()
            latencies.append(time.perf_counter() - before)
        return FirstRequest(
            listening=listening - began,
            first=answered - sent,
            total=answered - began,
            warm=statistics.median(latencies) if latencies else float("nan"),
        )


def push_body(topic: str) -> bytes:
    """A Pub/Sub push request as the emulator sends it to a push endpoint."""
    message = {
        "data": base64.b64encode(orjson.dumps({**BLOG, "transaction_id": unique("t")})).decode(),
        "attributes": {},
        "messageId": str(time.time_ns()),
        "publishTime": "2026-11-29T12:00:00.000Z",
    }
    return orjson.dumps(
        {"message": message, "subscription": f"projects/{PROJECT}/subscriptions/{topic}-push"}
    )


# Each step of loading detector/main.py in the order the import performs it, in CPU time
# (process_time: steadier than wall time on a shared machine), functions-framework and
# flask already imported as under functions-framework.
STEPS_PROBE = """
import importlib, json, sys, time
import flask, functions_framework
clock = time.process_time
steps = []
def step(name, action):
    began = clock()
    action()
    steps.append((name, clock() - began))
for name in ("yaml", "detector.transaction", "detector.rules", "detector.state",
             "detector.model", "detector.config", "detector.logs"):
    step("import " + name, lambda: importlib.import_module(name))
from detector.config import DetectorConfig, load_risk_model, load_rules
from detector.state import StateConfig
config = DetectorConfig.from_env()
step("load the ruleset (load_rules)", lambda: load_rules(config, StateConfig()))
step("load the model (load_risk_model)", lambda: load_risk_model(config))
print(json.dumps(steps))
"""


def load_steps(repeats: int) -> list[tuple[str, float]]:
    """Median CPU seconds of each step of loading detector/main.py (see STEPS_PROBE)."""
    samples: dict[str, list[float]] = defaultdict(list)
    order: list[str] = []
    for _ in range(repeats):
        result = subprocess.run(
            [sys.executable, "-c", STEPS_PROBE],
            capture_output=True,
            text=True,
            env=environment(),
            cwd=ROOT,
            check=True,
        )
        for name, seconds in orjson.loads(result.stdout.strip().splitlines()[-1]):
            if name not in samples:
                order.append(name)
            samples[name].append(seconds)
    return [(name, statistics.median(samples[name])) for name in order]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat of each (smoke test)")
    parser.add_argument("--repeats", type=int, help="processes per measurement")
    parser.add_argument("--no-pubsub", action="store_true", help="skip the emulator part")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 7)
    warm = 3 if args.quick else 20

    print(_report.header("Cold start (bench/bench_coldstart.py)"))
    print(f"{repeats} processes per measurement, detector and original alternating; medians.\n")

    imports: dict[str, list[dict[str, float]]] = {name: [] for name in SOURCES}
    for _ in range(repeats):
        for name, source in SOURCES.items():
            imports[name].append(import_once(source))
    rows = []
    for name, samples in imports.items():
        rows.append(
            (
                name,
                ms(statistics.median(s["source"] for s in samples)),
                ms(statistics.median(s["cpu"] for s in samples)),
                ms(statistics.median(s["framework"] for s in samples)),
                ms(statistics.median(s["process"] for s in samples)),
            )
        )
    print("Import (ms):\n")
    print(
        _report.table(
            ["source", "load the source (target < 300)", "of which CPU",
             "functions-framework before it", "whole process (python -c)"],
            rows,
        )
    )  # fmt: skip
    detector_import = statistics.median(s["source"] for s in imports["detector/main.py"])
    original_import = statistics.median(s["source"] for s in imports["original"])
    verdict = "met" if detector_import < 0.3 else f"missed by {ms(detector_import - 0.3)} ms"
    print(
        f"\nTarget (import of detector/main.py under 300 ms): {verdict} "
        f"({ms(detector_import)} ms; {detector_import / original_import:.2f}x the original)\n"
    )

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        http_request = {"path": "/", "body": orjson.dumps(BLOG)}
        firsts: dict[str, list[FirstRequest]] = {name: [] for name in SOURCES}
        for _ in range(repeats):
            for name, source in SOURCES.items():
                firsts[name].append(
                    first_request(
                        source, "score_transaction", "http", environment(), workdir,
                        http_request, warm,
                    )
                )  # fmt: skip
        print("First HTTP request, score_transaction (ms):\n")
        print(first_table(firsts))

        if not args.no_pubsub:
            with pubsub_emulator(workdir) as host:
                from google.cloud import pubsub_v1

                env = environment({"PUBSUB_EMULATOR_HOST": host})
                os.environ["PUBSUB_EMULATOR_HOST"] = host
                publisher = pubsub_v1.PublisherClient()
                results = unique("coldstart-verdicts")
                publisher.create_topic(name=f"projects/{PROJECT}/topics/{results}")
                env["RESULTS_TOPIC"] = results
                topic = unique("coldstart-tx")
                firsts = {name: [] for name in SOURCES}
                for _ in range(repeats):
                    for name, source in SOURCES.items():
                        request = {"path": f"/projects/{PROJECT}/topics/{topic}",
                                   "body": push_body(topic)}  # fmt: skip
                        firsts[name].append(
                            first_request(
                                source, "detect_fraud", "cloudevent", env, workdir, request, 0
                            )
                        )
                publisher.transport.close()
            print("\nFirst Pub/Sub push, detect_fraud, publishing to the emulator (ms):\n")
            print(first_table(firsts, warm=False))

    print(
        "\nWhere the load of detector/main.py goes (CPU ms, median; functions-framework and "
        "flask already imported; each import counts only what earlier steps did not load):\n"
    )
    steps = load_steps(repeats)
    step_rows = [(name, f"{value * 1000:.0f}") for name, value in steps]
    step_rows.append(("total of the steps", f"{sum(v for _, v in steps) * 1000:.0f}"))
    cpu = statistics.median(s["cpu"] for s in imports["detector/main.py"])
    step_rows.append(("whole load of detector/main.py, CPU", f"{cpu * 1000:.0f}"))
    print(_report.table(["step", "CPU ms"], step_rows))
    return 0


def first_table(firsts: Mapping[str, Sequence[FirstRequest]], warm: bool = True) -> str:
    rows = []
    for name, samples in firsts.items():
        row = [
            name,
            ms(statistics.median(s.listening for s in samples)),
            ms(statistics.median(s.first for s in samples)),
            ms(statistics.median(s.total for s in samples)),
        ]
        if warm:
            row.append(f"{statistics.median(s.warm for s in samples) * 1000:.1f}")
        rows.append(row)
    head = ["function", "start to listening", "first request", "start to first answer"]
    if warm:
        head.append("warm request")
    return _report.table(head, rows)


if __name__ == "__main__":
    raise SystemExit(main())
