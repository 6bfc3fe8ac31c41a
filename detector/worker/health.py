"""``GET /healthz`` for the platform's probes, served from a thread with the standard library.

200 while the worker pulls and its state store answers; 503 while it drains or when the
store cannot be reached, so a platform stops counting on an instance that cannot decide.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["HealthServer"]

log = logging.getLogger(__name__)

#: None when healthy, else why not (the 503's body).
Probe = Callable[[], str | None]


class HealthServer:
    """Serves ``GET /healthz`` on a port until `close`; any other path is 404."""

    def __init__(self, port: int, probe: Probe, host: str = "") -> None:
        """Bind the port now (so a busy port fails start-up) and serve from a daemon thread.

        Raises:
            OSError: the port cannot be bound.
        """

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/healthz":
                    self._answer(404, "not found")
                    return
                problem = probe()
                self._answer(503 if problem else 200, problem or "ok")

            def _answer(self, status: int, text: str) -> None:
                body = (text + "\n").encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                # Probes every few seconds would flood the log; only failures are worth a line.
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="worker-health", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
