"""Where verdicts and dead letters go: the `VerdictSink` protocol, Pub/Sub and memory behind it."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from detector.errors import PublishFailed

__all__ = ["MemoryVerdictSink", "PubSubVerdictSink", "VerdictSink"]

log = logging.getLogger(__name__)


class VerdictSink(Protocol):
    """Publishes one message and returns only once it is stored."""

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        """Publish data with attributes to topic; return the message ID.

        Raises:
            PublishFailed: the message could not be published within the sink's timeout.
        """
        ...


@dataclass
class MemoryVerdictSink:
    """Keeps published messages in a list, for tests and offline replay."""

    messages: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        self.messages.append((topic, data, dict(attributes)))
        return str(len(self.messages))


class PubSubVerdictSink:
    """Publishes through one Pub/Sub client per process, one Publish RPC per message.

    The gRPC client is created on first use, so a process forked after import (gunicorn
    workers) never inherits a channel. Each publish is one synchronous Publish call from the
    calling thread, retried on transient errors with backoff until the sink's timeout, which
    is shorter than the function's own.

    Not the batching `PublisherClient.publish()`: a function publishes one verdict and waits
    for it, and with few requests in flight (Cloud Functions run one per instance by default;
    the emulator pushes about two at a time) its batch thread and futures only cost, in CPU
    and in wall time (BENCHMARKS.md, "End to end").
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._client: Any = None
        self._pid = 0
        self._lock = threading.Lock()

    def _publisher(self) -> _Publisher:
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    self._client = _make_client(self._timeout)
                    self._pid = os.getpid()
        publisher: _Publisher = self._client
        return publisher

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        # Imported here with the client (`_make_client`): part of the slow gRPC imports.
        from google.api_core import exceptions as api_exceptions

        publisher = self._publisher()
        request = publisher.request(
            topic=topic, messages=[publisher.message(data=data, attributes=dict(attributes))]
        )
        try:
            response = publisher.api.publish(
                request=request, retry=publisher.retry, timeout=self._timeout
            )
        except api_exceptions.DeadlineExceeded:
            raise PublishFailed(f"{topic}: publish did not finish in {self._timeout:g} s") from None
        except api_exceptions.GoogleAPICallError as error:
            raise PublishFailed(f"{topic}: publish failed: {error}") from error
        except api_exceptions.RetryError as error:
            raise PublishFailed(f"{topic}: publish gave up retrying: {error}") from error
        return str(response.message_ids[0])


@dataclass(frozen=True)
class _Publisher:
    """The publisher API of one client, the retry policy and the request types."""

    api: Any
    retry: Any
    request: Any
    message: Any


def _make_client(timeout: float) -> _Publisher:
    # Imported here: google-cloud-pubsub and gRPC are the slowest imports of the function,
    # and the HTTP function in memory-only tests never needs them.
    from google.api_core.retry import Retry
    from google.cloud import pubsub_v1

    # The high-level client only for its connection set-up (credentials, endpoint, the
    # emulator from PUBSUB_EMULATOR_HOST); publishing goes through its API client.
    client = pubsub_v1.PublisherClient()
    return _Publisher(
        api=client.api,
        retry=Retry(initial=0.05, maximum=2.0, multiplier=2.0, timeout=timeout),
        request=pubsub_v1.types.PublishRequest,
        message=pubsub_v1.types.PubsubMessage,
    )
