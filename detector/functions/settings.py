"""Settings of the functions, read once from the environment at the edge."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from detector.config import DetectorConfig
from detector.errors import ConfigError
from detector.transaction import DEFAULT_MAX_CLOCK_SKEW
from detector.vocabulary import parse_duration

__all__ = [
    "DEFAULT_DEAD_LETTER_TOPIC",
    "DEFAULT_FEEDBACK_DEAD_LETTER_TOPIC",
    "DEFAULT_RESULTS_TOPIC",
    "Settings",
]

DEFAULT_RESULTS_TOPIC = "fraud-verdicts"
DEFAULT_DEAD_LETTER_TOPIC = "transactions-dead-letter"
DEFAULT_FEEDBACK_DEAD_LETTER_TOPIC = "fraud-feedback-dead-letter"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the functions read from their environment.

    Attributes:
        project: Google Cloud project of the topics (GOOGLE_CLOUD_PROJECT, else GCP_PROJECT).
        results_topic: topic verdicts are published to (RESULTS_TOPIC).
        dead_letter_topic: topic invalid transactions are published to (DEAD_LETTER_TOPIC).
        feedback_dead_letter_topic: topic invalid labels are published to
            (FEEDBACK_DEAD_LETTER_TOPIC), apart from transactions so each can be redriven to
            its own source.
        publish_timeout: seconds to wait for a publish before failing the message
            (PUBLISH_TIMEOUT), kept below the function's own timeout (60 s by default).
        max_clock_skew: seconds a transaction's `timestamp` may lie after its message's
            publish time (over HTTP: its receive time) before it is invalid (MAX_CLOCK_SKEW, a
            duration such as ``5m``).
        max_delivery_attempts: the subscription's dead-letter policy's attempts
            (MAX_DELIVERY_ATTEMPTS): on that attempt a transient failure dead-letters the
            message itself, with its reason, instead of leaving it to the policy.
        detector: rules, model and state store (RULES_FILE, MODEL_PATH, REDIS_URL).
    """

    project: str
    results_topic: str = DEFAULT_RESULTS_TOPIC
    dead_letter_topic: str = DEFAULT_DEAD_LETTER_TOPIC
    feedback_dead_letter_topic: str = DEFAULT_FEEDBACK_DEAD_LETTER_TOPIC
    publish_timeout: float = 30.0
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW
    max_delivery_attempts: int = 5
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from environ (default os.environ).

        Raises:
            ConfigError: a variable is set to an unusable value.
        """
        env = os.environ if environ is None else environ
        project = env.get("GOOGLE_CLOUD_PROJECT") or env.get("GCP_PROJECT") or ""
        timeout_text = env.get("PUBLISH_TIMEOUT", "30")
        try:
            timeout = float(timeout_text)
        except ValueError:
            raise ConfigError(
                f"PUBLISH_TIMEOUT: must be a number of seconds, got {timeout_text!r}"
            ) from None
        if not 0 < timeout <= 540:
            raise ConfigError(f"PUBLISH_TIMEOUT: must be in (0, 540] seconds, got {timeout_text!r}")
        skew_text = env.get("MAX_CLOCK_SKEW", "5m")
        skew = parse_duration(skew_text, setting="MAX_CLOCK_SKEW")
        if skew <= 0:
            raise ConfigError(f"MAX_CLOCK_SKEW: must be more than 0, got {skew_text!r}")
        attempts_text = env.get("MAX_DELIVERY_ATTEMPTS", "5")
        if not attempts_text.strip().isdigit() or not 5 <= int(attempts_text) <= 100:
            # Pub/Sub's own bounds of a dead-letter policy's max_delivery_attempts.
            raise ConfigError(
                f"MAX_DELIVERY_ATTEMPTS: must be a whole number from 5 to 100, got {attempts_text!r}"
            )
        return cls(
            project=project,
            results_topic=env.get("RESULTS_TOPIC") or DEFAULT_RESULTS_TOPIC,
            dead_letter_topic=env.get("DEAD_LETTER_TOPIC") or DEFAULT_DEAD_LETTER_TOPIC,
            feedback_dead_letter_topic=env.get("FEEDBACK_DEAD_LETTER_TOPIC")
            or DEFAULT_FEEDBACK_DEAD_LETTER_TOPIC,
            publish_timeout=timeout,
            max_clock_skew=skew,
            max_delivery_attempts=int(attempts_text),
            detector=DetectorConfig.from_env(env),
        )

    def topic_path(self, topic: str) -> str:
        """Full resource name of a topic given by short name (or already full).

        Raises:
            ConfigError: a short name without GOOGLE_CLOUD_PROJECT.
        """
        if topic.startswith("projects/"):
            return topic
        if not self.project:
            raise ConfigError("GOOGLE_CLOUD_PROJECT: must be set to publish to Pub/Sub")
        return f"projects/{self.project}/topics/{topic}"
