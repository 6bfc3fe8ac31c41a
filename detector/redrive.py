"""`python -m detector redrive`: send dead letters back to the topic they came from.

After a fix (a rules change, Redis back), dead letters are pulled from a subscription of a
dead-letter topic, republished to their `source_topic` with the attributes the detector added
(`DEAD_LETTER_KEYS`) removed, and acked once the republish is stored. A message without a
`source_topic`, or one that `--filter` leaves out, is neither republished nor acked: it comes
back to the subscription when its ack deadline passes. A dry run only counts.

A message the source subscription's own dead-letter policy forwarded (delivered too many
times without success, e.g. through a long outage) carries Pub/Sub's
`CloudPubSubDeadLetterSource*` attributes instead of ours: it counts as `delivery_exhausted`
and goes back to the topic of the subscription it left, without those attributes.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from detector.errors import InputError
from detector.functions import DEAD_LETTER_KEYS

__all__ = ["Outcome", "add_redrive", "parse_filters", "redrive"]

#: Messages pulled per request (Pub/Sub's maximum is 1,000; small keeps leases short).
BATCH = 100

#: What Pub/Sub adds to a message its subscription's dead-letter policy forwards: the message
#: was delivered that many times without an ack, so the detector never wrote a reason.
FORWARDED = "CloudPubSubDeadLetterSource"
_FORWARDED_COUNT = FORWARDED + "DeliveryCount"


@dataclass
class Outcome:
    """Counts per `error_type` of the dead letters redriven, and of those left where they were."""

    redriven: Counter[str] = field(default_factory=Counter)
    left: Counter[str] = field(default_factory=Counter)

    def lines(self, dry_run: bool) -> list[str]:
        done = "would redrive" if dry_run else "redriven"
        lines = [f"{done} {sum(self.redriven.values())}"]
        lines += [f"  {kind}: {count}" for kind, count in sorted(self.redriven.items())]
        if self.left:
            lines.append(f"left {sum(self.left.values())}")
            lines += [f"  {kind}: {count}" for kind, count in sorted(self.left.items())]
        return lines


def parse_filters(texts: list[str]) -> dict[str, str]:
    """`KEY=VALUE` options as a mapping.

    Raises:
        InputError: an option without `=`.
    """
    filters = {}
    for text in texts:
        key, equals, value = text.partition("=")
        if not equals or not key:
            raise InputError(
                f"--filter: must be KEY=VALUE, e.g. error_type=transient_exhausted, got {text!r}"
            )
        filters[key] = value
    return filters


def redrive(
    subscriber: Any,
    publisher: Any,
    subscription: str,
    *,
    filters: Mapping[str, str] | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    timeout: float = 10.0,
) -> Outcome:
    """Pull dead letters from `subscription` and republish each to its `source_topic`.

    Stops when a pull returns nothing new, or after `limit` messages were redriven.

    Args:
        subscriber, publisher: google-cloud-pubsub clients.
        filters: attribute values a message must have to be redriven.
        dry_run: count only; nothing is published, acked or nacked.
    """
    outcome = Outcome()
    seen: set[str] = set()
    topics: dict[str, str] = {}  # subscription -> its topic, for forwarded messages
    wanted = dict(filters or {})
    while limit is None or sum(outcome.redriven.values()) < limit:
        response = subscriber.pull(
            request={"subscription": subscription, "max_messages": BATCH}, timeout=timeout
        )
        fresh = [m for m in response.received_messages if m.message.message_id not in seen]
        if not fresh:
            break
        for received in fresh:
            message = received.message
            seen.add(message.message_id)
            attributes = dict(message.attributes)
            kind = attributes.get("error_type", "(none)")
            source = attributes.get("source_topic", "")
            if "error_type" not in attributes and _FORWARDED_COUNT in attributes:
                # Forwarded by the policy after repeated failures (a long outage): the reason
                # is the delivery count, the source the topic of the subscription it left.
                kind = "delivery_exhausted"
                left = _forwarded_from(attributes)
                if left not in topics:
                    topics[left] = _topic_of(subscriber, left, timeout)
                source = topics[left]
            full = limit is not None and sum(outcome.redriven.values()) >= limit
            if full or any(attributes.get(k) != v for k, v in wanted.items()):
                continue
            if not source:
                outcome.left[f"{kind} (no source_topic)"] += 1
                continue
            if not dry_run:
                kept = {
                    k: v
                    for k, v in attributes.items()
                    if k not in DEAD_LETTER_KEYS and not k.startswith(FORWARDED)
                }
                publisher.publish(source, message.data, **kept).result(timeout=60)
                subscriber.acknowledge(
                    request={"subscription": subscription, "ack_ids": [received.ack_id]}
                )
            outcome.redriven[kind] += 1
    return outcome


def _forwarded_from(attributes: Mapping[str, str]) -> str:
    """The subscription a policy-forwarded message left, as a full path."""
    project = attributes.get(FORWARDED + "SubscriptionProject", "")
    return f"projects/{project}/subscriptions/{attributes.get(FORWARDED + 'Subscription', '')}"


def _topic_of(subscriber: Any, subscription: str, timeout: float) -> str:
    """The topic a subscription reads, or "" when it is gone (the message is then left)."""
    # Imported here, as the clients are in `_run`: the other commands never need gRPC.
    from google.api_core import exceptions

    try:
        return str(
            subscriber.get_subscription(
                request={"subscription": subscription}, timeout=timeout
            ).topic
        )
    except exceptions.NotFound:
        return ""


def _run(args: argparse.Namespace) -> int:
    from google.cloud import pubsub_v1

    filters = parse_filters(args.filter)
    subscription = args.subscription
    if not subscription.startswith("projects/"):
        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "")
        if not project:
            raise InputError("--subscription: a short name needs GOOGLE_CLOUD_PROJECT")
        subscription = f"projects/{project}/subscriptions/{subscription}"
    outcome = redrive(
        pubsub_v1.SubscriberClient(),
        pubsub_v1.PublisherClient(),
        subscription,
        filters=filters,
        dry_run=args.dry_run,
        limit=args.max,
    )
    print("\n".join(outcome.lines(args.dry_run)))
    return 0


def add_redrive(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `redrive` subcommand."""
    parser = commands.add_parser(
        "redrive", help="republish dead letters to the topic they came from"
    )
    parser.add_argument(
        "--subscription", required=True, help="a subscription of a dead-letter topic"
    )
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only messages with this attribute value (repeatable), e.g. error_type=transient_exhausted",
    )
    parser.add_argument("--dry-run", action="store_true", help="only count; change nothing")
    parser.add_argument("--max", type=int, default=None, help="redrive at most N messages")
    parser.set_defaults(run=_run)
