"""Real-time fraud screening for Google Cloud Pub/Sub: the detection core and its functions."""

__all__ = [
    "config",
    "engine",
    "errors",
    "functions",
    "model",
    "offline",
    "rules",
    "state",
    "transaction",
    "vocabulary",
]
