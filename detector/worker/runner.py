"""The worker's loop: streaming pull in, micro-batches decided together, verdicts out in batches.

Threads, and what each owns::

    client library (streaming pull) --put--> Batcher --get--> decider --queue--> confirmer
                                                                 |                  |
                                       decide_many (one state call per batch)   wait on each
                                       publish verdicts / dead letters          publish, then
                                       (batching PublisherClient, futures)      ack or nack

Delivery guarantees:

- A message is acked only after its verdict (or dead letter) is confirmed published; a
  transient failure (the state store, a publish that fails or times out) nacks it, so Pub/Sub
  delivers it again. Nothing is acked without a verdict or a dead letter.
- Invalid messages are dead-lettered exactly as `detect_fraud` does (the attributes of
  `detector.functions.service.dead_letter_attributes`), labels go through the function's own
  `Service.on_label`.
- At least once: a worker killed between publishing a verdict and acking its message decides
  that message again on redelivery. The state store records each transaction_id once and scores
  a repeated one against the same history, so state counts it once and the second verdict says
  what the first did (unless older transactions or labels arrived in between).
- On SIGTERM (`run`'s stop event) the worker stops taking messages (those that still arrive
  are nacked), decides and publishes what it holds, acks, and returns within `drain_timeout`;
  what is left unfinished then is nacked or, if stuck in a call, redelivered after its lease.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from detector.engine import Request
from detector.errors import ConfigError, MessageError, StoreUnavailable, TransientError
from detector.functions.service import (
    Message,
    Service,
    dead_letter_attributes,
    verdict_attributes,
)
from detector.transaction import check_clock_skew, decode, rfc3339
from detector.worker.batcher import Batcher
from detector.worker.health import HealthServer
from detector.worker.options import WorkerOptions, subscription_path
from detector.worker.stats import Stats

__all__ = ["Worker"]

log = logging.getLogger(__name__)

#: Names `PublisherClient.publish` takes as arguments: attributes by these names cannot be
#: passed as keywords, so a message carrying one is published through the service's sink.
_PUBLISH_ARGUMENTS = frozenset({"topic", "data", "ordering_key", "retry", "timeout"})

#: Longest pause before the next batch after transient failures in a row (seconds).
_MAX_BACKOFF = 5.0


@dataclass(frozen=True, slots=True)
class _Pending:
    """A message whose verdict (or dead letter) is being published."""

    message: Any  # google.cloud.pubsub_v1.subscriber.message.Message
    published: datetime
    future: concurrent.futures.Future[str]
    verdict: bool


class _InlineScheduler:
    """Runs the subscription's callback on the client's own thread, without a thread pool.

    The transactions' callback only hands the message to the `Batcher`, which never blocks;
    the library's default pool would add a thread switch per message for nothing. Implements
    the library's `Scheduler` interface (queue, schedule, shutdown).
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    @property
    def queue(self) -> queue.Queue[Any]:
        return self._queue

    def schedule(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        callback(*args, **kwargs)

    def shutdown(self, await_msg_callbacks: bool = False) -> list[Any]:
        return []


class Worker:
    """Pulls transactions (and labels) and publishes verdicts until its stop event is set."""

    def __init__(self, service: Service, options: WorkerOptions) -> None:
        """
        Raises:
            ConfigError: a subscription or topic name is unusable.
        """
        settings = service.settings
        self.service = service
        self.options = options
        self.subscription = subscription_path(options.subscription, settings.project)
        self.feedback_subscription = (
            subscription_path(
                options.feedback_subscription, settings.project, "--feedback-subscription"
            )
            if options.feedback_subscription
            else None
        )
        self.results_topic = settings.topic_path(settings.results_topic)
        self.dead_letter_topic = settings.topic_path(settings.dead_letter_topic)
        self.stats = Stats()
        self.batcher: Batcher[Any] = Batcher(options.batch_size, options.batch_wait)
        self._confirming: queue.Queue[list[_Pending] | None] = queue.Queue()
        self._draining = threading.Event()
        self._give_up_at: float | None = None
        self._failures_in_a_row = 0
        self._crash: BaseException | None = None
        self._streams: list[Any] = []
        self._publisher: Any = None
        self._retry: Any = None
        self._source_topic: str | None = None

    # ---------------------------------------------------------------------------- running

    def run(self, stop: threading.Event) -> None:
        """Pull and decide until `stop` is set (SIGTERM) or a stream fails, then drain.

        Raises:
            ConfigError: a subscription does not exist or may not be read.
            TransientError: a stream failed otherwise (the platform restarts the worker).
        """
        from google.api_core.retry import Retry
        from google.cloud import pubsub_v1

        # Created here, not at import: gRPC channels must not cross a fork.
        self._publisher = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(
                max_messages=1000, max_bytes=4_000_000, max_latency=0.005
            )
        )
        timeout = self.service.settings.publish_timeout
        self._retry = Retry(initial=0.05, maximum=2.0, multiplier=2.0, timeout=timeout)
        subscriber = pubsub_v1.SubscriberClient()
        # Dead letters name the topic they came from, so `redrive` can send them back.
        self._source_topic = _topic_of(subscriber, self.subscription)
        health = (
            HealthServer(self.options.port, self.health) if self.options.port is not None else None
        )
        # The lease is also the stream's ack deadline: how long what a dead worker held
        # stays invisible to the others.
        flow = pubsub_v1.types.FlowControl(
            max_messages=self.options.max_messages,
            max_bytes=self.options.max_bytes,
            max_duration_per_lease_extension=int(self.options.lease),
        )
        wake = lambda _future: stop.set()  # noqa: E731 - a stream that ends stops the worker
        threads = [
            threading.Thread(target=self._guard(self._decide_loop, stop), name="worker-decide"),
            threading.Thread(target=self._guard(self._confirm_loop, stop), name="worker-ack"),
        ]
        for thread in threads:
            thread.daemon = True  # a call stuck past the drain must not keep the process up
            thread.start()
        try:
            stream = subscriber.subscribe(
                self.subscription, self._on_transaction, flow, scheduler=_InlineScheduler()
            )
            self._streams.append(stream)
            stream.add_done_callback(wake)
            if self.feedback_subscription is not None:
                feedback = subscriber.subscribe(
                    self.feedback_subscription,
                    self._on_label,
                    pubsub_v1.types.FlowControl(max_messages=100),
                    await_callbacks_on_shutdown=True,
                )
                self._streams.append(feedback)
                feedback.add_done_callback(wake)
            log.info(
                "worker pulling %s%s",
                self.subscription,
                f" and {self.feedback_subscription}" if self.feedback_subscription else "",
                extra={"fields": {"batch_size": self.options.batch_size}},
            )
            next_log = time.monotonic() + self.options.log_interval
            while not stop.wait(max(0.0, next_log - time.monotonic())):
                self._log_interval()
                next_log += self.options.log_interval
        finally:
            self._drain(threads)
            if health is not None:
                health.close()
            self._publisher.stop()
            subscriber.close()
            self._log_interval()
        self._raise_failure()

    def health(self) -> str | None:
        """None while pulling with a reachable store, else why not (GET /healthz)."""
        if self._draining.is_set():
            return "draining"
        if not self._streams or any(stream.done() for stream in self._streams):
            return "not pulling"
        store = self.service.detector.store
        if store is not None:
            try:
                store.check()
            except StoreUnavailable as error:
                return f"state store unreachable: {error}"
        return None

    def _guard(self, loop: Callable[[], None], stop: threading.Event) -> Callable[[], None]:
        """A thread's loop that, if it dies of a bug, stops the worker instead of hanging it."""

        def guarded() -> None:
            try:
                loop()
            except BaseException as error:
                self._crash = error
                stop.set()
                raise

        return guarded

    def _drain(self, threads: list[threading.Thread]) -> None:
        """Stop taking messages, finish and ack what is held, stop the streams."""
        self._give_up_at = time.monotonic() + self.options.drain_timeout
        self._draining.set()
        self.batcher.close()  # the decider hands out what is held, then ends
        threads[0].join(self._left())
        self._confirming.put(None)
        threads[1].join(self._left())
        unfinished = self.batcher.take_all()
        for message in unfinished:
            message.nack()
        if any(thread.is_alive() for thread in threads):
            log.warning(
                "drain: gave up after %g s; messages in flight will be delivered again",
                self.options.drain_timeout,
            )
        # Acks queued so far are sent before the streams' dispatchers stop.
        for stream in self._streams:
            stream.cancel()
        for stream in self._streams:
            with contextlib.suppress(concurrent.futures.TimeoutError):
                stream.exception(timeout=max(self._left(), 0.5))
        log.info(
            "worker stopped",
            extra={"fields": {"acked": self.stats.total_acked, "nacked_on_exit": len(unfinished)}},
        )

    def _left(self) -> float:
        assert self._give_up_at is not None
        return max(0.0, self._give_up_at - time.monotonic())

    def _raise_failure(self) -> None:
        if self._crash is not None:
            raise self._crash
        from google.api_core import exceptions as api_exceptions

        for stream, name in zip(
            self._streams, (self.subscription, self.feedback_subscription), strict=False
        ):
            if not stream.done() or stream.cancelled():
                continue
            try:
                failure = stream.exception(timeout=0)
            except concurrent.futures.CancelledError:
                continue
            if isinstance(failure, api_exceptions.NotFound | api_exceptions.PermissionDenied):
                raise ConfigError(
                    f"subscription {name}: cannot pull: {failure.message}", setting=str(name)
                ) from failure
            if failure is not None:
                raise TransientError(f"subscription {name}: pull failed: {failure}") from failure

    def _log_interval(self) -> None:
        fields = self.stats.interval()
        fields["held"] = len(self.batcher)
        log.info(
            "worker: %s messages/s, mean batch %s, lag p50 %s ms p99 %s ms, %s errors",
            fields["messages_per_s"],
            fields["mean_batch_size"],
            "-" if fields["lag_p50_ms"] is None else fields["lag_p50_ms"],
            "-" if fields["lag_p99_ms"] is None else fields["lag_p99_ms"],
            fields["errors"],
            extra={"fields": fields},
        )

    # ---------------------------------------------------------------------------- transactions

    def _on_transaction(self, message: Any) -> None:
        """The stream's callback: hold the message for a batch (nack it while draining)."""
        if not self.batcher.put(message):
            message.nack()

    def _decide_loop(self) -> None:
        while True:
            if self._failures_in_a_row and not self._draining.is_set():
                # Redelivery would come back at once: give the store or Pub/Sub a moment.
                pause = min(_MAX_BACKOFF, 0.1 * 2 ** (self._failures_in_a_row - 1))
                self._draining.wait(pause)
            batch = self.batcher.get()
            if not batch:
                return  # closed and empty
            self.stats.batch(len(batch))
            self._decide(batch)

    def _decide(self, batch: list[Any]) -> None:
        """Decide a batch with one state call, publish verdicts and dead letters, queue the acks."""
        now = self.service.clock()
        requests: list[Request] = []
        held: list[tuple[Any, datetime]] = []
        invalid: list[tuple[Any, datetime, MessageError]] = []
        for message in batch:
            published = message.publish_time
            avro_json = message.attributes.get("googclient_schemaencoding") == "JSON"
            try:
                raw, transaction = decode(message.data, avro_json=avro_json)
                check_clock_skew(
                    transaction, published or now, self.service.settings.max_clock_skew
                )
            except MessageError as error:
                invalid.append((message, published, error))
                continue
            # As detect_fraud: event time defaults to the publish time, verdicts are stamped now.
            requests.append(Request(raw, transaction, message.message_id, published, now))
            held.append((message, published))
        pending: list[_Pending] = []
        if requests:
            try:
                verdicts = self.service.detector.decide_many(requests)
            except TransientError as failure:
                self._failed([message for message, _ in held], failure)
                verdicts = []
            for (message, published), verdict in zip(held, verdicts, strict=False):
                future = self._publish(
                    self.results_topic, verdict.encode(), verdict_attributes(verdict, published)
                )
                pending.append(_Pending(message, published, future, True))
        for message, published, problem in invalid:
            letter = Message(
                message.data,
                dict(message.attributes),
                message.message_id,
                published,
                source_topic=self._source_topic,
            )
            future = self._publish(
                self.dead_letter_topic, letter.data, dead_letter_attributes(letter, problem)
            )
            pending.append(_Pending(message, published, future, False))
            log.warning(
                "dead-lettered message %s: %s",
                message.message_id,
                problem,
                extra={
                    "fields": {"error_type": problem.error_type, "message_id": message.message_id}
                },
            )
        if pending:
            self._confirming.put(pending)

    def _publish(
        self, topic: str, data: bytes, attributes: Mapping[str, str]
    ) -> concurrent.futures.Future[str]:
        """Publish through the batching client; a future of the message ID."""
        if _PUBLISH_ARGUMENTS.isdisjoint(attributes):
            future: concurrent.futures.Future[str] = self._publisher.publish(
                topic, data, retry=self._retry, **attributes
            )
            return future
        # A dead letter keeps the message's own attributes, whatever their names.
        done: concurrent.futures.Future[str] = concurrent.futures.Future()
        try:
            done.set_result(self.service.sink.publish(topic, data, attributes))
        except TransientError as error:
            done.set_exception(error)
        return done

    def _confirm_loop(self) -> None:
        while True:
            pending = self._confirming.get()
            if pending is None:
                return
            self._confirm(pending)

    def _confirm(self, pending: list[_Pending]) -> None:
        """Ack each message whose publish is confirmed; nack the others."""
        from google.api_core import exceptions as api_exceptions

        give_up = time.monotonic() + self.service.settings.publish_timeout + 1.0
        if self._give_up_at is not None:
            give_up = min(give_up, self._give_up_at)
        verdicts = dead_letters = 0
        lags: list[float] = []
        failed: list[Any] = []
        problem: BaseException | None = None
        for item in pending:
            try:
                item.future.result(timeout=max(0.0, give_up - time.monotonic()))
            except (
                api_exceptions.GoogleAPICallError,
                api_exceptions.RetryError,
                TransientError,
                concurrent.futures.TimeoutError,
            ) as error:
                failed.append(item.message)
                problem = error
                continue
            item.message.ack()
            lags.append(time.time() - item.published.timestamp())
            if item.verdict:
                verdicts += 1
            else:
                dead_letters += 1
        self.stats.acked(verdicts, dead_letters, lags)
        if failed:
            self._failed(failed, problem)
        else:
            self._failures_in_a_row = 0

    def _failed(self, messages: list[Any], error: BaseException | None) -> None:
        """Nack messages after a transient failure, so Pub/Sub delivers them again."""
        for message in messages:
            message.nack()
        self._failures_in_a_row += 1
        self.stats.failed(len(messages))
        log.error(
            "%d messages failed and will be redelivered: %s",
            len(messages),
            error if isinstance(error, TransientError) else f"publish failed: {error!r}",
            extra={"fields": {"messages": len(messages), "error_type": type(error).__name__}},
        )

    # ---------------------------------------------------------------------------- labels

    def _on_label(self, message: Any) -> None:
        """The feedback stream's callback: `Service.on_label`, as record_feedback runs it."""
        # The push envelope record_feedback receives, so the label is read, recorded and
        # dead-lettered (FEEDBACK_DEAD_LETTER_TOPIC) by the same code.
        envelope = {
            "message": {
                "data": base64.b64encode(message.data).decode(),
                "attributes": dict(message.attributes),
                "messageId": message.message_id,
                "publishTime": rfc3339(message.publish_time),
            }
        }
        try:
            self.service.on_label(envelope)
        except TransientError as error:
            self._failed([message], error)
            return
        message.ack()
        self.stats.label()


def _topic_of(subscriber: Any, subscription: str) -> str | None:
    """The topic a subscription reads, or None when it cannot be read (the stream then fails)."""
    # Imported where the clients are (`run`): gRPC is loaded once the worker starts pulling.
    from google.api_core import exceptions

    try:
        return str(subscriber.get_subscription(request={"subscription": subscription}).topic)
    except exceptions.GoogleAPICallError:
        return None
