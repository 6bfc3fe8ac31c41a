"""Exceptions of the publisher package.

    PublisherError
    ├── UsageError           a bad option or setting: nothing was started (ValueError)
    ├── ReadError            a file to read is missing or not JSON lines (ValueError)
    ├── WriteError           a file to write cannot be written (OSError)
    └── PubSubError           Pub/Sub refused or could not be reached (RuntimeError)
        └── NotAllPublished       some messages were not published

The command line catches PublisherError, prints `error: <message>` and exits non-zero.
"""

from __future__ import annotations


class PublisherError(Exception):
    """Root of every error the publisher raises on purpose."""


class UsageError(PublisherError, ValueError):
    """An option or setting is invalid; the message names it, the problem and the limit."""


class ReadError(PublisherError, ValueError):
    """An input file is missing, unreadable or not JSON lines."""


class WriteError(PublisherError, OSError):
    """An output file cannot be created or written."""


class PubSubError(PublisherError, RuntimeError):
    """Pub/Sub could not be reached, or a topic or subscription does not exist."""


class NotAllPublished(PubSubError):
    """Some messages were not published.

    Attributes:
        failed: how many messages failed.
        total: how many messages were handed to the client.
    """

    def __init__(self, failed: int, total: int, first_error: str) -> None:
        self.failed = failed
        self.total = total
        super().__init__(
            f"{failed} of {total} messages were not published (first error: {first_error})"
        )
