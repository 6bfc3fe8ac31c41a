"""The streaming-pull worker: transactions pulled in micro-batches, decided together, verdicts published in batches.

`python -m detector worker` (`detector.worker.command`) runs a `Worker` (`runner`), which
takes batches from a `Batcher`, reports through `Stats` and answers probes with a
`HealthServer`; `WorkerOptions` holds its flags. Only the online detector is imported, never
`detector.offline`, which the worker's image leaves out.
"""

from __future__ import annotations

from detector.worker.batcher import Batcher
from detector.worker.health import HealthServer
from detector.worker.options import WorkerOptions, subscription_path
from detector.worker.runner import Worker
from detector.worker.stats import Stats

__all__ = ["Batcher", "HealthServer", "Stats", "Worker", "WorkerOptions", "subscription_path"]
