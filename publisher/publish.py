"""Sending messages: the sink seam, Pub/Sub and file sinks, and the paced streaming loop.

`stream()` is the core shared by `simulate` and `republish`: it takes outgoing messages in
event-time order, paces them, hands them to a sink, releases labels to a feedback sink once
the simulated clock has passed their delay, and returns counts. Sinks are small Protocol
implementations: a topic of a `Publisher`, `FileSink` (JSON lines) and `MemorySink` (tests).
Publishers: `BatchPublisher` (default: own batching over the generated Publish RPC) and
`LibraryPublisher` (google-cloud-pubsub's PublisherClient.publish); see BENCHMARKS.md.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from publisher.errors import NotAllPublished, PubSubError, UsageError, WriteError
from publisher.pacing import Pacer, Unpaced
from publisher.progress import Progress

log = logging.getLogger(__name__)

# Batches of up to 1,000 messages or 20 ms, whichever comes first; at most 20,000 messages
# (or 50 MB) in flight before publish() blocks, so memory stays flat on a 1.75 M-row run.
BATCH_MAX_MESSAGES = 1_000
BATCH_MAX_BYTES = 5_000_000
BATCH_MAX_LATENCY = 0.02
FLOW_MESSAGE_LIMIT = 20_000
FLOW_BYTE_LIMIT = 50_000_000
# How long the pre-flight topic check waits for Pub/Sub before calling it unreachable.
CHECK_TIMEOUT = 5.0
# How long wait() waits for the last publishes to be confirmed.
DRAIN_TIMEOUT = 120.0


class Sink(Protocol):
    """Where messages go: one call per message, then close() once."""

    def send(self, data: bytes, attributes: Mapping[str, str]) -> None: ...

    def close(self) -> None: ...


@dataclass
class MemorySink:
    """Keeps messages in a list; for tests and dry runs."""

    messages: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    closed: bool = False

    def send(self, data: bytes, attributes: Mapping[str, str]) -> None:
        self.messages.append((data, dict(attributes)))

    def close(self) -> None:
        self.closed = True


class FileSink:
    """Writes each message's data as one line of a file (attributes are dropped)."""

    def __init__(self, path: Path, option: str = "--out") -> None:
        self.path = path
        try:
            self._handle: IO[bytes] = path.open("wb")
        except OSError as error:
            raise WriteError(f"{option}: cannot write {path}: {error.strerror}") from error
        self._option = option
        self._buffer: list[bytes] = []

    def send(self, data: bytes, attributes: Mapping[str, str]) -> None:
        self._buffer.append(data)
        if len(self._buffer) >= 10_000:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        try:
            self._handle.write(b"\n".join(self._buffer) + b"\n")
        except OSError as error:
            raise WriteError(
                f"{self._option}: cannot write {self.path}: {error.strerror}"
            ) from error
        self._buffer.clear()

    def close(self) -> None:
        try:
            self._flush()
        finally:
            self._handle.close()


class Publisher(Protocol):
    """A Pub/Sub publisher: topic checks, one Sink per topic, then wait() and close()."""

    sent: int
    published: int
    failed: int

    def check_topic(self, name: str, option: str = "--topic") -> str: ...

    def topic(self, name: str) -> Sink: ...

    def wait(self, timeout: float = DRAIN_TIMEOUT) -> None: ...

    def close(self) -> None: ...


def describe_target(emulator_host: str | None) -> str:
    """Where a client is pointed, for error messages."""
    return f"emulator at {emulator_host}" if emulator_host else "Google Cloud"


def topic_path(project: str, name: str) -> str:
    """`name` as a full topic path (a full path is kept as it is)."""
    return name if name.startswith("projects/") else f"projects/{project}/topics/{name}"


def client_error(error: Exception, emulator_host: str | None) -> PubSubError:
    """The error to raise when a Pub/Sub client cannot be created (no credentials...)."""
    hint = "" if emulator_host else "; set PUBSUB_EMULATOR_HOST to use the emulator"
    return PubSubError(
        f"cannot create a Pub/Sub client for {describe_target(emulator_host)}{hint}: {error}"
    )


def check_exists(
    get: Callable[..., Any], kind: str, path: str, option: str, emulator_host: str | None
) -> str:
    """Fetch a topic or subscription once; raise PubSubError if missing or unreachable.

    Args:
        get: the client's get_topic or get_subscription, called as get(path, retry, timeout).
        kind: "topic" or "subscription", for the message.
    """
    # Imported here, as the clients are: gRPC is the slowest import, and `--out` never needs it.
    from google.api_core import exceptions, retry
    from google.auth.exceptions import GoogleAuthError

    try:
        get(path, retry=retry.Retry(timeout=CHECK_TIMEOUT), timeout=CHECK_TIMEOUT)
    except exceptions.NotFound as error:
        raise PubSubError(f"{option}: {kind} {path} does not exist") from error
    except (exceptions.GoogleAPICallError, exceptions.RetryError, GoogleAuthError) as error:
        raise PubSubError(
            f"cannot reach Pub/Sub ({describe_target(emulator_host)}): {error}"
        ) from error
    return path


def check_topic(client: Any, path: str, option: str, emulator_host: str | None) -> str:
    """Raise PubSubError unless the topic exists; returns its path."""
    return check_exists(
        lambda p, **kw: client.get_topic(topic=p, **kw), "topic", path, option, emulator_host
    )


class _Counts:
    """Thread-safe success and failure counts, and the futures still pending."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: set[futures.Future[Any]] = set()
        self.sent = 0
        self.published = 0
        self.failed = 0
        self.first_error = ""

    def track(self, future: futures.Future[Any], messages: int) -> None:
        with self.lock:
            self.sent += messages
            self.pending.add(future)

    def done(self, future: futures.Future[Any], messages: int) -> None:
        error = future.exception()
        with self.lock:
            self.pending.discard(future)
            if error is None:
                self.published += messages
            else:
                self.failed += messages
                if not self.first_error:
                    self.first_error = f"{type(error).__name__}: {error}"

    def wait(self, timeout: float) -> None:
        """Wait on every pending future; raise NotAllPublished if any message failed."""
        with self.lock:
            pending = list(self.pending)
        _, not_done = futures.wait(pending, timeout=timeout)
        with self.lock:
            if not_done:
                self.failed += sum(1 for future in not_done if not future.done())
                self.first_error = self.first_error or f"not confirmed within {timeout:.0f} s"
            if self.failed:
                raise NotAllPublished(self.failed, self.sent, self.first_error)


class _Counting:
    """What both publishers share: counts of sent, published and failed messages, topics."""

    project: str
    _client: Any
    _emulator_host: str | None
    _counts: _Counts

    sent = property(lambda self: self._counts.sent)
    published = property(lambda self: self._counts.published)
    failed = property(lambda self: self._counts.failed)

    def check_topic(self, name: str, option: str = "--topic") -> str:
        return check_topic(
            self._client, topic_path(self.project, name), option, self._emulator_host
        )

    def topic(self, name: str) -> Sink:
        return _TopicSink(self.publish, topic_path(self.project, name))

    def publish(self, path: str, data: bytes, attributes: Mapping[str, str]) -> None:
        raise NotImplementedError


class LibraryPublisher(_Counting):
    """google-cloud-pubsub's PublisherClient.publish(): its batching and flow control.

    Simple and standard, but each publish() costs ~150 us of Python (a proto-plus message,
    a future, flow-control and batch locks), which caps it near 6,000 messages/s on this
    machine; `BatchPublisher` is the default for that reason (see BENCHMARKS.md).
    """

    def __init__(self, project: str, emulator_host: str | None = None) -> None:
        # Imported here: the client pulls in gRPC, which `--out` runs never need.
        from google.auth.exceptions import GoogleAuthError
        from google.cloud import pubsub_v1
        from google.cloud.pubsub_v1 import types

        self.project = project
        self._emulator_host = emulator_host
        try:
            self._client = pubsub_v1.PublisherClient(
                batch_settings=types.BatchSettings(
                    max_messages=BATCH_MAX_MESSAGES,
                    max_bytes=BATCH_MAX_BYTES,
                    max_latency=BATCH_MAX_LATENCY,
                ),
                publisher_options=types.PublisherOptions(
                    flow_control=types.PublishFlowControl(
                        message_limit=FLOW_MESSAGE_LIMIT,
                        byte_limit=FLOW_BYTE_LIMIT,
                        limit_exceeded_behavior=types.LimitExceededBehavior.BLOCK,
                    )
                ),
            )
        except GoogleAuthError as error:
            raise client_error(error, emulator_host) from error
        self._counts = _Counts()

    def publish(self, path: str, data: bytes, attributes: Mapping[str, str]) -> None:
        future = self._client.publish(path, data, **attributes)
        self._counts.track(future, 1)
        future.add_done_callback(lambda f: self._counts.done(f, 1))

    def wait(self, timeout: float = DRAIN_TIMEOUT) -> None:
        self._counts.wait(timeout)

    def close(self) -> None:
        self._client.stop()


class BatchPublisher(_Counting):
    """Batches messages itself and sends each batch with one Publish RPC from a thread pool.

    The same batching and flow control as the library's PublisherClient (a batch goes when
    it has `max_messages`, `max_bytes`, or is `max_latency` old; send() blocks while
    `max_batches_in_flight` batches are unconfirmed), but messages are raw protobufs and
    there is one future per batch, not per message: ~10x less Python per message. Uses the
    generated client of google-cloud-pubsub (`google.pubsub_v1.PublisherClient`), whose
    Publish call retries transient errors with the service's default policy. Every batch
    future is awaited and its messages counted as published or failed.
    """

    def __init__(
        self,
        project: str,
        emulator_host: str | None = None,
        *,
        max_messages: int = BATCH_MAX_MESSAGES,
        max_bytes: int = BATCH_MAX_BYTES,
        max_latency: float = BATCH_MAX_LATENCY,
        max_batches_in_flight: int = FLOW_MESSAGE_LIMIT // BATCH_MAX_MESSAGES,
        threads: int = 4,
    ) -> None:
        # Imported here: the client pulls in gRPC, which `--out` runs never need.
        from google.auth.exceptions import GoogleAuthError
        from google.pubsub_v1 import PublisherClient, types

        self.project = project
        self._emulator_host = emulator_host
        try:
            if emulator_host:
                from google.auth.credentials import AnonymousCredentials

                self._client = PublisherClient(
                    client_options={"api_endpoint": emulator_host},
                    credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                )
            else:
                self._client = PublisherClient()
        except GoogleAuthError as error:
            raise client_error(error, emulator_host) from error
        self._message = types.PubsubMessage.pb()
        self._request = types.PublishRequest
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._max_latency = max_latency
        self._slots = threading.BoundedSemaphore(max_batches_in_flight)
        self._executor = futures.ThreadPoolExecutor(threads, thread_name_prefix="publish")
        self._lock = threading.Lock()
        self._buffers: dict[str, tuple[float, list[Any], int]] = {}
        self._counts = _Counts()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._flush_old, name="publish-timer", daemon=True)
        self._timer.start()

    def publish(self, path: str, data: bytes, attributes: Mapping[str, str]) -> None:
        message = self._message(data=data, attributes=attributes)
        full = None
        with self._lock:
            started, batch, size = self._buffers.get(path) or (time.monotonic(), [], 0)
            batch.append(message)
            size += len(data) + 64
            if len(batch) >= self._max_messages or size >= self._max_bytes:
                full = batch
                self._buffers.pop(path, None)
            else:
                self._buffers[path] = (started, batch, size)
        if full is not None:
            self._submit(path, full)

    def _submit(self, path: str, batch: list[Any]) -> None:
        self._slots.acquire()  # flow control: blocks the producer while too much is in flight
        request = self._request.wrap(self._request.pb()(topic=path, messages=batch))
        try:
            future = self._executor.submit(self._client.publish, request=request)
        except RuntimeError:
            self._slots.release()
            raise
        self._counts.track(future, len(batch))
        future.add_done_callback(lambda f: self._finished(f, len(batch)))

    def _finished(self, future: futures.Future[Any], messages: int) -> None:
        self._slots.release()
        self._counts.done(future, messages)

    def _take(self, older_than: float | None) -> list[tuple[str, list[Any]]]:
        now = time.monotonic()
        with self._lock:
            ready = [
                path
                for path, (started, _, _) in self._buffers.items()
                if older_than is None or now - started >= older_than
            ]
            return [(path, self._buffers.pop(path)[1]) for path in ready]

    def _flush_old(self) -> None:
        while not self._stop.wait(self._max_latency / 2):
            for path, batch in self._take(self._max_latency):
                self._submit(path, batch)

    def flush(self) -> None:
        """Send every buffered message now."""
        for path, batch in self._take(None):
            self._submit(path, batch)

    def wait(self, timeout: float = DRAIN_TIMEOUT) -> None:
        self.flush()
        self._counts.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        self._timer.join()
        self.flush()
        self._executor.shutdown(wait=True)
        self._client.transport.close()


@dataclass(frozen=True)
class _TopicSink:
    """A Sink publishing to one topic through a shared publisher."""

    publish: Callable[[str, bytes, Mapping[str, str]], None]
    path: str

    def send(self, data: bytes, attributes: Mapping[str, str]) -> None:
        self.publish(self.path, data, attributes)

    def close(self) -> None:
        return None


def make_publisher(kind: str, project: str, emulator_host: str | None) -> Publisher:
    """ "batch" (default, fast) or "library" (PublisherClient.publish)."""
    if kind == "library":
        return LibraryPublisher(project, emulator_host)
    if kind == "batch":
        return BatchPublisher(project, emulator_host)
    raise UsageError(f"publisher: must be 'batch' or 'library', got {kind!r}")


@dataclass(frozen=True)
class Outgoing:
    """A message to send, with what the loop needs to know about it.

    Attributes:
        data: the message body (one JSON object).
        attributes: Pub/Sub attributes (dropped by file sinks).
        event_time: Unix seconds of the transaction, for pacing and label release.
        label: the label line for the side file, if known.
        feedback: the feedback message body, if known.
    """

    data: bytes
    attributes: Mapping[str, str]
    event_time: float = 0.0
    label: bytes | None = None
    feedback: bytes | None = None


@dataclass(frozen=True)
class StreamSummary:
    """What a run did."""

    sent: int
    frauds: int
    labels_written: int
    feedback_sent: int
    feedback_held: int
    seconds: float
    stopped_by: str  # "end", "count", "duration" or "interrupt"

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class StreamOptions:
    """How to run the loop (from the command line)."""

    count: int | None = None
    duration: float | None = None
    label_delay: float | None = None  # None: no feedback messages
    pacer: Pacer = field(default_factory=Unpaced)
    progress: Progress | None = None
    now: Callable[[], float] = time.monotonic


def stream(
    messages: Iterable[Outgoing],
    sink: Sink,
    options: StreamOptions,
    labels: Sink | None = None,
    feedback: Sink | None = None,
) -> StreamSummary:
    """Send messages in order until they run out, `count` is reached or `duration` passes.

    Labels go to `labels` as soon as their transaction is sent (a side file: ground truth
    never travels with the transaction). If `feedback` and `options.label_delay` are set,
    each label is sent to `feedback` once a transaction at least `label_delay` seconds later
    in event time has been sent; labels not yet due at the end are held back (counted).
    """
    start = options.now()
    deadline = start + options.duration if options.duration is not None else None
    due: collections.deque[tuple[float, bytes, Mapping[str, str]]] = collections.deque()
    sent = frauds = labels_written = feedback_sent = 0
    stopped_by = "end"
    progress = options.progress
    try:
        for message in messages:
            if options.count is not None and sent >= options.count:
                stopped_by = "count"  # count == 0
                break
            if deadline is not None and options.now() >= deadline:
                stopped_by = "duration"
                break
            options.pacer.wait(message.event_time)
            sink.send(message.data, message.attributes)
            sent += 1
            if message.label is not None:
                if b'"is_fraud":true' in message.label:
                    frauds += 1
                if labels is not None:
                    labels.send(message.label, {})
                    labels_written += 1
            if feedback is not None and options.label_delay is not None and message.feedback:
                due.append(
                    (message.event_time + options.label_delay, message.feedback, message.attributes)
                )
                while due and due[0][0] <= message.event_time:
                    _, body, attributes = due.popleft()
                    feedback.send(body, attributes)
                    feedback_sent += 1
            if progress is not None:
                progress.update(sent)
            if options.count is not None and sent >= options.count:
                stopped_by = "count"
                break
    except KeyboardInterrupt:
        stopped_by = "interrupt"
    if progress is not None:
        progress.close()
    if due:
        log.info("%s labels not yet due at the end of the run were not sent", len(due))
    return StreamSummary(
        sent=sent,
        frauds=frauds,
        labels_written=labels_written,
        feedback_sent=feedback_sent,
        feedback_held=len(due),
        seconds=options.now() - start,
        stopped_by=stopped_by,
    )
