"""Replay on several processes: the file cut into event-time shards, the same verdicts.

Shard k decides the lines from byte L_k up to L_(k+1). Before its first line it warms a fresh
store on the lines since W_k, the first line more recent than `horizon` seconds before the
latest event preceding L_k, exactly as one process would feed them (state and the labels that
become known meanwhile) but deciding nothing. The horizon covers whatever can reach a verdict
from the past: the store's retention plus its allowed lateness (older history is outside every
window and `seconds_since_last`), and the label delay (an older transaction's label has been
injected before the shard starts).

That is exact when, for every shard after the first, checked after the run:

- the latest event time before W_k is at least `horizon` older than the latest in the warm-up
  (no line far ahead of its neighbours before W_k, no gap in the stream at the cut), and
- no line the shard decides is more than the allowed lateness behind the latest before it
  (such a line is scored against whatever the store still holds, which depends on when it
  last forgot; one process or another may hold different leftovers).

When a check fails, the whole file is replayed again in one process, and the replay says why.
(What the store remembers of a transaction_id also goes by event time alone: see
`MemoryStore` on retention.)

Each shard writes its verdicts to a part file in a scratch directory (next to the output
when it is a plain file); they are joined in order at the end. Next to the output the first
part becomes the output (renamed) and the others are appended to it in the kernel where it can
(`os.copy_file_range`), instead of copying every verdict through memory.
"""

from __future__ import annotations

import gc
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import IO, Any

from detector.engine import Detector
from detector.errors import InputError, MessageError
from detector.offline.replay import Outcome, Replayer, replay_path
from detector.state import MemoryStore, TiledMemoryStore
from detector.transaction import decode

log = logging.getLogger(__name__)

#: Below this many bytes per worker (about 50,000 transactions) `auto` uses one process:
#: forking, planning and warming up are not worth it for a few seconds of work.
MIN_SHARD_BYTES = 8 << 20

#: A warmed-up line costs less than a decided one (state only, no model, rules or verdict),
#: so later shards, which warm up, get fewer lines to decide. On the handbook stream with the
#: C histories a warm-up line took 0.37-0.41 of a decided one, but later lines decide a
#: little slower: with 0.5 the second of two shards finished 3.5 s before the first (of
#: about 70), with 0.4 it finished 4.2 s after.
WARM_COST = 0.45


@dataclass(frozen=True)
class Shard:
    """Byte offsets (line starts) and 1-based line numbers of one shard's lines."""

    index: int
    warm_from: int
    start: int
    end: int
    warm_line: int
    start_line: int
    #: Line starts inside [start, end) where later shards begin warming up: the shard
    #: reports its latest event time there (see `ShardResult.latest_at`).
    cuts: tuple[int, ...] = ()
    cut_lines: tuple[int, ...] = ()


@dataclass
class ShardResult:
    """What a shard sends back."""

    outcome: Outcome
    #: The latest event time of the lines read before each offset in `Shard.cuts` and before
    #: `Shard.end` (warm-up included: all of them come before the offset).
    latest_at: dict[int, float] = field(default_factory=dict)
    #: The latest event time of the warm-up, and whether `until` stopped the shard.
    warmed_to: float = float("-inf")
    stopped: bool = False
    part: Path | None = None
    #: Lines warmed up on, and the seconds (wall) of the warm-up and of the whole shard.
    warmed: int = 0
    warm_seconds: float = 0.0
    seconds: float = 0.0


def horizon(detector: Detector, label_delay: float) -> float:
    """Seconds of history a shard needs before its first line (see the module docstring)."""
    store = detector.store
    if not isinstance(store, MemoryStore | TiledMemoryStore):
        raise InputError("a parallel replay needs the memory store")
    config = store.config
    return max(config.keep + config.allowed_lateness, label_delay)


def workers_for(path: Path, asked: int | None) -> int:
    """How many processes to use: `asked`, or one per core and per `MIN_SHARD_BYTES`."""
    if asked is not None:
        return max(1, asked)
    try:
        size = path.stat().st_size if path.is_file() else 0
    except OSError:
        size = 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, size // MIN_SHARD_BYTES))


def _line_start(f: IO[bytes], offset: int) -> int:
    """The first line start at or after `offset`."""
    if offset <= 0:
        return 0
    f.seek(offset - 1)
    f.readline()
    return f.tell()


def _event_time(line: bytes) -> float | None:
    """Event time of a line (epoch seconds), None for an invalid or untimed one."""
    try:
        _, transaction = decode(line)
    except MessageError:
        return None
    moment = transaction.timestamp
    return None if moment is None else moment.timestamp()


def _time_at(f: IO[bytes], offset: int, end: int) -> float | None:
    """Event time of the first valid, timed line starting in [offset, end), if any."""
    f.seek(offset)
    while f.tell() < end:
        line = f.readline()
        if not line:
            return None
        when = _event_time(line)
        if when is not None:
            return when
    return None


def _time_before(f: IO[bytes], offset: int) -> float | None:
    """Event time of the last valid, timed line ending before `offset` (a line start)."""
    size = 64 << 10
    while True:
        start = max(0, offset - size)
        f.seek(start)
        lines = f.read(offset - start).split(b"\n")
        if start > 0:
            lines = lines[1:]  # begins before the block
        for line in reversed(lines):
            when = _event_time(line)
            if when is not None:
                return when
        if start == 0:
            return None
        size *= 4


def _first_after(f: IO[bytes], end: int, cutoff: float) -> int:
    """The first line start in [0, end] whose time is after `cutoff`: bisection, then a scan.

    Assumes event-time order; where the file is not in order the result may be off, which
    the checks after the run catch.
    """
    lo, hi = 0, end
    while hi - lo > (64 << 10):
        mid = _line_start(f, (lo + hi) // 2)
        if mid >= hi:
            break
        when = _time_at(f, mid, hi)
        if when is None or when > cutoff:
            hi = mid
        else:
            lo = mid
    f.seek(lo)
    position = lo
    while position < hi:
        line = f.readline()
        when = _event_time(line)
        if when is not None and when > cutoff:
            return position
        position += len(line)
    return hi


def _line_numbers(path: Path, offsets: set[int]) -> dict[int, int]:
    """1-based number of the line starting at each offset (a line start)."""
    numbers: dict[int, int] = {}
    lines = 0
    position = 0
    with path.open("rb") as f:
        for offset in sorted(offsets):
            while position < offset:
                chunk = f.read(min(1 << 20, offset - position))
                if not chunk:
                    break
                lines += chunk.count(b"\n")
                position += len(chunk)
            numbers[offset] = lines + 1
    return numbers


def plan(path: Path, workers: int, history: float, until: float | None = None) -> list[Shard]:
    """Cut the file into `workers` shards of about equal work, warm-up included.

    With `until`, the work is the lines before the first at or after it; the last shard
    still reads to the end of the file (and stops where one process would).
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        limit = size if until is None else _first_after(f, size, math.nextafter(until, -math.inf))
        if workers <= 1 or limit == 0:
            return [Shard(0, 0, 0, size, 1, 1)]

        def warm_start(start: int) -> int:
            # What a shard needs is measured from the latest event before its first line.
            when = _time_before(f, start)
            return start if when is None else _first_after(f, start, when - history)

        # Each later shard also pays for its warm-up: estimate it at an even cut, then give
        # the first shard (which has none) correspondingly more lines.
        even = _line_start(f, limit // workers)
        warm = (even - warm_start(even)) * WARM_COST
        share = (limit + warm * (workers - 1)) / workers
        starts = [0]
        for k in range(1, workers):
            start = _line_start(f, int(share * k - warm * (k - 1)))
            if start > starts[-1] and start < limit:
                starts.append(start)
        warms = [0] + [warm_start(start) for start in starts[1:]]
    ends = [*starts[1:], size]
    cuts = [
        tuple(sorted({w for w in warms[k + 1 :] if start < w < end}))
        for k, (start, end) in enumerate(zip(starts, ends, strict=True))
    ]
    numbers = _line_numbers(path, set(starts) | set(warms))
    return [
        Shard(
            k,
            warms[k],
            start,
            end,
            numbers[warms[k]],
            numbers[start],
            cuts[k],
            tuple(numbers[c] for c in cuts[k]),
        )
        for k, (start, end) in enumerate(zip(starts, ends, strict=True))
    ]


def _between(f: IO[bytes], start: int, end: int) -> Iterator[bytes]:
    """The lines starting in [start, end)."""
    f.seek(start)
    position = start
    for line in f:
        yield line
        position += len(line)
        if position >= end:
            return


def _run_shard(
    detector: Detector,
    path: Path,
    shard: Shard,
    part: Path | None,
    labels: Mapping[str, bool] | None,
    label_delay: float,
    until: datetime | None,
    lateness: float,
    shards: int,
) -> ShardResult:
    def progress(count: int) -> None:
        print(
            f"replay: shard {shard.index + 1}/{shards}: {count:,} transactions",
            file=sys.stderr,
            flush=True,
        )

    out = part.open("wb") if part is not None else None
    try:
        replayer = Replayer(
            detector,
            out.write if out is not None else None,
            labels=labels,
            label_delay=label_delay,
            until=until,
            lateness=lateness,
            progress=progress,
        )
        result = ShardResult(replayer.outcome, part=part)
        started = time.perf_counter()
        with path.open("rb") as f:
            if shard.warm_from < shard.start:
                replayer.warm(_between(f, shard.warm_from, shard.start), shard.warm_line)
            result.warmed_to = replayer.stream.latest
            result.warmed = replayer.stream.number - shard.warm_line + 1
            result.warm_seconds = time.perf_counter() - started
            bounds = [shard.start, *shard.cuts, shard.end]
            numbers = [shard.start_line, *shard.cut_lines]
            for (start, end), number in zip(pairwise(bounds), numbers, strict=True):
                replayer.decide(_between(f, start, end), number)
                result.latest_at[end] = replayer.stream.latest
        result.stopped = replayer.stream.stopped
        result.seconds = time.perf_counter() - started
        print(
            f"replay: shard {shard.index + 1}/{shards}: warmed up on {result.warmed:,} lines in "
            f"{result.warm_seconds:.1f} s, decided {result.outcome.transactions:,} in "
            f"{result.seconds - result.warm_seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        return result
    finally:
        if out is not None:
            out.close()


def _child(connection: Any, run: Callable[[], ShardResult]) -> None:
    # No cyclic garbage collection in a shard, which ends with the replay: each time the replay
    # loop let it run again (after the warm-up and at each cut) it walked millions of live
    # objects once, a second or so each time.
    gc.disable()
    try:
        connection.send(("ok", run()))
    except BaseException:
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def exact(shards: list[Shard], results: list[ShardResult], history: float) -> list[str]:
    """The checks of the module docstring; what failed, if anything."""
    problems = []
    stopped = next((k for k, result in enumerate(results) if result.stopped), len(results) - 1)
    for k in range(1, stopped + 1):
        shard = shards[k]
        # The latest event before the warm-up: each earlier shard read the lines before it
        # that it decided (and its own warm-up, earlier still).
        before = float("-inf")
        for earlier, result in zip(shards[:k], results[:k], strict=True):
            if earlier.end <= shard.warm_from:
                before = max(before, result.latest_at[earlier.end])
            elif earlier.start < shard.warm_from:
                before = max(before, result.latest_at[shard.warm_from])
        if before > results[k].warmed_to - history:
            problems.append(
                f"shard {k + 1}: a line before its warm-up is within {history:.0f} s of the "
                "latest of the warm-up"
            )
        if results[k].outcome.behind:
            problems.append(
                f"shard {k + 1}: {results[k].outcome.behind} line(s) more than the allowed "
                "lateness behind the stream"
            )
    return problems


def merge(results: list[ShardResult], output: IO[bytes] | None) -> Outcome:
    """One outcome from the shards' in order, up to the first that `until` stopped."""
    total = Outcome()
    for result in results:
        outcome = result.outcome
        total.transactions += outcome.transactions
        total.labels_injected += outcome.labels_injected
        total.labels_unknown += outcome.labels_unknown
        total.decisions.update(outcome.decisions)
        total.cpu_seconds += outcome.cpu_seconds
        total.invalid += outcome.invalid
        total.out_of_order += outcome.out_of_order
        total.untimed += outcome.untimed
        total.labelled += outcome.labelled
        total.frauds += outcome.frauds
        total.flagged_frauds += outcome.flagged_frauds
        total.blocked_frauds += outcome.blocked_frauds
        total.rule_hits.update(outcome.rule_hits)
        total.rule_fraud_hits.update(outcome.rule_fraud_hits)
        total.scores.extend(outcome.scores)
        if output is not None and result.part is not None:
            _append(result.part, output)
        if result.stopped:
            break
    return total


def _append(path: Path, output: IO[bytes]) -> None:
    """Copy a file to the end of `output`: in the kernel where it can, else through memory."""
    output.flush()
    start = output.tell()
    with path.open("rb") as part:
        try:
            while os.copy_file_range(part.fileno(), output.fileno(), 1 << 30):
                pass
            output.seek(0, os.SEEK_END)
            return
        except (AttributeError, OSError):  # no copy_file_range (not Linux), or refused
            part.seek(0)
            output.seek(start)
            output.truncate()
        while chunk := part.read(1 << 20):
            output.write(chunk)


def replay_file(
    detector: Detector,
    path: Path,
    output: Path | None,
    workers: int,
    *,
    labels: Mapping[str, bool] | None = None,
    label_delay: float = 0.0,
    until: datetime | None = None,
) -> tuple[Outcome, list[str]]:
    """Replay a file on `workers` processes (forked: each gets a copy of `detector`, whose
    store must be fresh) with the verdicts of one process.

    Returns the outcome and, when the checks failed and the file was replayed in one process
    instead, what failed.
    """
    history = horizon(detector, label_delay)
    assert isinstance(detector.store, MemoryStore | TiledMemoryStore)
    lateness = detector.store.config.allowed_lateness
    started = time.perf_counter()
    shards = plan(path, workers, history, until.timestamp() if until is not None else None)
    if len(shards) == 1:
        return replay_path(detector, path, output, labels, label_delay, until), []
    # Part files in a scratch directory next to the output when that is a plain file there
    # (the first part becomes the output, the others are appended), else in the system's
    # temporary directory (all copied into the output at the end).
    beside = output is not None and (output.is_file() or not output.exists())
    with tempfile.TemporaryDirectory(
        prefix="replay-", dir=output.parent if beside and output is not None else None
    ) as scratch:
        parts = [Path(scratch) / f"part{s.index}" if output else None for s in shards]
        results = _fork(shards, parts, detector, path, labels, label_delay, until, lateness)
        problems = exact(shards, results, history)
        if problems:
            log.warning("parallel replay is not exact here (%s): one process", "; ".join(problems))
            return replay_path(detector, path, output, labels, label_delay, until), problems
        out: IO[bytes] | None = None
        if output is not None:
            if beside and results[0].part is not None:
                os.replace(results[0].part, output)
                results[0].part = None  # it is the output now
                out = output.open("r+b")
                out.seek(0, os.SEEK_END)
            else:
                out = output.open("wb")
        try:
            outcome = merge(results, out)
        finally:
            if out is not None:
                out.close()
    outcome.seconds = time.perf_counter() - started
    outcome.workers = len(shards)
    return outcome, []


def _fork(
    shards: list[Shard],
    parts: list[Path | None],
    detector: Detector,
    path: Path,
    labels: Mapping[str, bool] | None,
    label_delay: float,
    until: datetime | None,
    lateness: float,
) -> list[ShardResult]:
    """Run each shard in a forked process; their results in order.

    Raises:
        InputError: a shard failed (the others are stopped).
    """
    context = multiprocessing.get_context("fork")
    children = []
    try:
        for shard, part in zip(shards, parts, strict=True):
            receiver, sender = context.Pipe(duplex=False)

            def run(shard: Shard = shard, part: Path | None = part) -> ShardResult:
                return _run_shard(
                    detector, path, shard, part, labels, label_delay, until, lateness, len(shards)
                )

            process = context.Process(target=_child, args=(sender, run), daemon=True)
            process.start()
            sender.close()
            children.append((process, receiver))
        results: list[ShardResult] = []
        for process, receiver in children:
            try:
                status, value = receiver.recv()
            except EOFError:
                status, value = "error", f"the process exited with code {process.exitcode}"
            process.join()
            if status != "ok":
                raise InputError(f"a replay shard failed:\n{value}")
            results.append(value)
        return results
    finally:
        for process, receiver in children:
            if process.is_alive():
                process.terminate()
                process.join()
            receiver.close()
