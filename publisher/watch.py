"""The watcher's edge: a streaming pull of verdicts from a subscription into a `Tally`.

What is counted and how lives in publisher.report (pure); how it is shown, in
publisher.display. `watch()` pulls until N verdicts or an idle timeout, feeding each message
to the tally and telling a `Display` as it goes, also while nothing arrives.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any, Protocol

from publisher.errors import PubSubError, UsageError
from publisher.report import Tally, Verdict, parse_verdict

__all__ = ["Display", "WatchOptions", "watch"]

log = logging.getLogger(__name__)


class Display(Protocol):
    """Shows a tally while it grows; update() is called after each verdict and when idle."""

    def update(self, tally: Tally) -> None: ...


@dataclass(frozen=True)
class WatchOptions:
    """When to stop: after `count` verdicts, or `idle_timeout` seconds without one."""

    count: int | None = None
    idle_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.count is not None and self.count < 1:
            raise UsageError(f"--count: must be >= 1, got {self.count}")
        if not self.idle_timeout > 0:
            raise UsageError(f"--idle-timeout: must be > 0, got {self.idle_timeout}")


def watch(
    project: str,
    subscription: str,
    options: WatchOptions,
    tally: Tally,
    emulator_host: str | None = None,
    display: Display | None = None,
    now: Callable[[], float] = time.monotonic,
) -> tuple[str, float]:
    """Pull verdicts from a subscription into `tally` until done.

    Returns:
        (stopped_by, seconds): "count", "idle" or "interrupt", and the time it took.

    Raises:
        PubSubError: the subscription does not exist or Pub/Sub cannot be reached.
    """
    # Imported here: gRPC is the slowest import of the tools, and only watching needs it.
    from google.api_core import exceptions
    from google.auth.exceptions import GoogleAuthError
    from google.cloud import pubsub_v1
    from google.cloud.pubsub_v1 import types

    from publisher.publish import check_exists, client_error

    try:
        subscriber = pubsub_v1.SubscriberClient()
    except GoogleAuthError as error:
        raise client_error(error, emulator_host) from error
    path = (
        subscription
        if subscription.startswith("projects/")
        else subscriber.subscription_path(project, subscription)
    )
    check_exists(
        lambda p, **kw: subscriber.get_subscription(subscription=p, **kw),
        "subscription",
        path,
        "--subscription",
        emulator_host,
    )

    inbox: queue.SimpleQueue[Verdict] = queue.SimpleQueue()

    def on_message(message: Any) -> None:
        inbox.put(parse_verdict(message.data, dict(message.attributes), message.publish_time))
        message.ack()

    start = now()
    stopped_by = "idle"
    pull = subscriber.subscribe(
        path, on_message, flow_control=types.FlowControl(max_messages=2_000)
    )
    try:
        last = now()
        while options.count is None or tally.total < options.count:
            if pull.done():
                raise PubSubError(f"--subscription: pulling from {path} failed: {pull.exception()}")
            try:
                verdict = inbox.get(timeout=min(0.5, options.idle_timeout))
            except queue.Empty:
                if display is not None:
                    display.update(tally)
                if now() - last >= options.idle_timeout:
                    break
                continue
            last = now()
            tally.add(verdict)
            if display is not None:
                display.update(tally)
        else:
            stopped_by = "count"
    except KeyboardInterrupt:
        stopped_by = "interrupt"
    finally:
        pull.cancel()
        try:
            pull.result(timeout=10)
        except (exceptions.GoogleAPICallError, TimeoutError, CancelledError):
            # The pull is over either way; how it ended does not change the report.
            log.debug("streaming pull ended", exc_info=True)
        subscriber.close()
    return stopped_by, now() - start
