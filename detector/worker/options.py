"""The worker's own settings (subscriptions, batching, flow control), apart from the functions'.

Everything the functions read from the environment (topics, rules, model, state) comes from
`detector.functions.Settings`; these come from command-line flags, and `port` from PORT.
"""

from __future__ import annotations

from dataclasses import dataclass

from detector.errors import ConfigError

__all__ = ["WorkerOptions", "subscription_path"]


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How the worker pulls and batches.

    Attributes:
        subscription: pull subscription of the transactions (short name or full path).
        feedback_subscription: pull subscription of the fraud labels, if any.
        batch_size: transactions decided together at most (one state store call).
        batch_wait: seconds the first message of a batch waits for others at most.
        max_messages: messages received and not yet acked, at most (flow control); a
            batch never exceeds it, so it must be at least `batch_size`.
        max_bytes: bytes of such messages, at most (flow control).
        log_interval: seconds between two progress lines.
        drain_timeout: seconds a SIGTERM leaves to finish what is held before exiting
            (platforms kill after 10 s).
        lease: seconds of each ack-deadline extension (10..600). Messages held by a worker
            that dies come back to the others after at most this long; held messages are
            extended while the worker lives, so a short lease only costs more extensions.
        port: serve GET /healthz on this port (PORT); None for no server.
    """

    subscription: str
    feedback_subscription: str | None = None
    batch_size: int = 500
    batch_wait: float = 0.02
    max_messages: int = 5_000
    max_bytes: int = 100 * 1024 * 1024
    log_interval: float = 60.0
    drain_timeout: float = 8.0
    lease: float = 60.0
    port: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.batch_size <= 1000:
            problems.append(f"--batch-size: must be in 1..1000, got {self.batch_size}")
        if not 0 <= self.batch_wait <= 10:
            problems.append(f"--batch-wait: must be in 0..10 s, got {self.batch_wait:g}")
        if self.max_messages < self.batch_size:
            problems.append(
                f"--max-messages: must be >= --batch-size ({self.batch_size}), "
                f"got {self.max_messages}"
            )
        if self.max_bytes < 1024 * 1024:
            problems.append(f"--max-bytes: must be >= 1048576 (1 MiB), got {self.max_bytes}")
        if self.log_interval <= 0:
            problems.append(f"--log-interval: must be > 0 s, got {self.log_interval:g}")
        if not 0 < self.drain_timeout <= 60:
            problems.append(f"--drain-timeout: must be in (0, 60] s, got {self.drain_timeout:g}")
        if not 10 <= self.lease <= 600:
            problems.append(f"--lease: must be in 10..600 s, got {self.lease:g}")
        if self.port is not None and not 0 <= self.port <= 65535:
            problems.append(f"PORT: must be a TCP port (0..65535), got {self.port}")
        if problems:
            raise ConfigError("; ".join(problems))


def subscription_path(name: str, project: str, setting: str = "--subscription") -> str:
    """Full resource name of a subscription given by short name (or already full).

    Raises:
        ConfigError: a short name without GOOGLE_CLOUD_PROJECT, or a malformed full path.
    """
    if name.startswith("projects/"):
        parts = name.split("/")
        if len(parts) != 4 or parts[2] != "subscriptions" or not parts[1] or not parts[3]:
            raise ConfigError(
                f"{setting}: expected projects/PROJECT/subscriptions/NAME, got {name!r}",
                setting=setting,
            )
        return name
    if not name or "/" in name:
        raise ConfigError(f"{setting}: expected a subscription name, got {name!r}", setting=setting)
    if not project:
        raise ConfigError(
            f"GOOGLE_CLOUD_PROJECT: must be set for the short name {setting} {name}",
            setting="GOOGLE_CLOUD_PROJECT",
        )
    return f"projects/{project}/subscriptions/{name}"
