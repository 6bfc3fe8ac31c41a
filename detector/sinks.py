"""Where verdicts and dead letters go: a `Sink` protocol with Pub/Sub and memory behind it."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

from detector.errors import PublishFailed

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Publishes one message and returns only once it is stored."""

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        """Publish data with attributes to topic; return the message ID.

        Raises:
            PublishFailed: the message could not be published within the sink's timeout.
        """
        ...


@dataclass
class MemorySink:
    """Keeps published messages in a list, for tests and offline replay."""

    messages: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        self.messages.append((topic, data, dict(attributes)))
        return str(len(self.messages))


class PubSubSink:
    """Publishes through one google-cloud-pubsub client per process.

    The gRPC client is created on first use, so a process forked after import (gunicorn
    workers) never inherits a channel. Every publish waits for its future, with a timeout
    shorter than the function's own, and the client's retries stop at that same deadline.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._client: Any = None
        self._pid = 0
        self._lock = threading.Lock()

    def _publisher(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    self._client = _make_client(self._timeout)
                    self._pid = os.getpid()
        return self._client

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        from google.api_core import exceptions as api_exceptions

        future = self._publisher().publish(topic, data, **attributes)
        try:
            return str(future.result(timeout=self._timeout))
        except futures.TimeoutError:
            raise PublishFailed(f"{topic}: publish did not finish in {self._timeout:g} s") from None
        except api_exceptions.GoogleAPICallError as error:
            raise PublishFailed(f"{topic}: publish failed: {error}") from error
        except api_exceptions.RetryError as error:
            raise PublishFailed(f"{topic}: publish gave up retrying: {error}") from error


def _make_client(timeout: float) -> Any:
    # Imported here: google-cloud-pubsub and gRPC are the slowest imports of the function,
    # and the HTTP function in memory-only tests never needs them.
    from google.api_core.retry import Retry
    from google.cloud import pubsub_v1

    retry = Retry(initial=0.05, maximum=2.0, multiplier=2.0, timeout=timeout)
    return pubsub_v1.PublisherClient(
        # Small batches: a function publishes one verdict and waits for it, so waiting for a
        # batch to fill only adds delay; concurrent requests still share a batch.
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=100, max_latency=0.002),
        publisher_options=pubsub_v1.types.PublisherOptions(retry=retry, timeout=timeout),
    )
