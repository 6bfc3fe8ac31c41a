"""The real services tests run against; they live in `stack.services`, shared with the local stack."""

from stack.services import (
    ROOT,
    Process,
    emulator_binary,
    free_port,
    function_server,
    pubsub_emulator,
    redis_server,
    start,
    unique,
    wait_http,
)

__all__ = [
    "ROOT",
    "Process",
    "emulator_binary",
    "free_port",
    "function_server",
    "pubsub_emulator",
    "redis_server",
    "start",
    "unique",
    "wait_http",
]
