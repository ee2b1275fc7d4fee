"""Liveness, readiness and the small HTTP server that exposes them with /metrics.

- ``/healthz`` (liveness): 200 while every loop that has reported a heartbeat
  reported one within ``stale_after`` seconds; 503 naming the stale loops
  otherwise. A wedged loop (a deadlocked exporter back-pressures the tracker,
  which then stops beating) is what a liveness probe should restart.
- ``/readyz`` (readiness): 200 once the runtime said tracing is attached
  (:meth:`Health.set_ready`), 503 before that and again once it starts
  shutting down.
- ``/metrics``: the Prometheus exposition of a :class:`clovisor.metrics.Metrics`
  (OpenMetrics when the scraper asks for it).

The server is a ``ThreadingHTTPServer`` on a daemon thread: scrapes never
wait for the tracing loops, and the loops never wait for a scrape.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["DEFAULT_STALE_AFTER", "Health", "StatusServer", "serve"]

DEFAULT_STALE_AFTER: Final = 30.0


class Health:
    """Heartbeats per loop and a readiness flag; thread-safe by construction.

    ``beat(loop)`` only stores a float, which is atomic under the GIL, so the
    loops pay no lock for it. A loop that never beat is not checked: before
    the runtime starts, the process counts as alive.
    """

    def __init__(
        self,
        *,
        stale_after: float = DEFAULT_STALE_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if stale_after <= 0:
            raise ValueError("stale_after must be > 0")
        self.stale_after = stale_after
        self._clock = clock
        self._beats: dict[str, float] = {}
        self._ready = False
        self._not_ready = "not tracing"

    def beat(self, loop: str = "main") -> None:
        """Record that ``loop`` is making progress (call it once per iteration)."""
        self._beats[loop] = self._clock()

    def retire(self, loop: str) -> None:
        """Stop watching ``loop`` (it ended on purpose)."""
        self._beats.pop(loop, None)

    def set_ready(self, ready: bool, reason: str = "not tracing") -> None:
        """``reason``: what /readyz answers while not ready (one line)."""
        self._ready = ready
        self._not_ready = reason

    def liveness(self) -> tuple[bool, str]:
        now = self._clock()
        stale = sorted(loop for loop, t in list(self._beats.items()) if now - t > self.stale_after)
        if stale:
            return False, f"stale: {', '.join(stale)} (no heartbeat for {self.stale_after:g}s)"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        return (True, "ok") if self._ready else (False, self._not_ready)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # A client that opens a connection and sends nothing must not hold a
    # thread for ever.
    timeout = 10
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _respond(self, *, head: bool) -> None:
        path = self.path.partition("?")[0]
        status, body, content_type = 404, b"not found\n", "text/plain; charset=utf-8"
        srv = self.server
        if path == "/metrics" and srv.metrics is not None:
            try:
                body, content_type = srv.metrics.render(self.headers.get("Accept", ""))
                status = 200
            except Exception as exc:  # a collector bug must not kill the server
                status, body = 500, f"metrics failed: {exc}\n".encode()
        elif path == "/healthz":
            ok, text = srv.health.liveness()
            status, body = (200 if ok else 503), (text + "\n").encode()
        elif path == "/readyz":
            ok, text = srv.health.readiness()
            status, body = (200 if ok else 503), (text + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # One access-log line per scrape and probe is noise in an agent's log.
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    metrics: Metrics | None
    health: Health


class _Server6(_Server):
    address_family = socket.AF_INET6


class StatusServer:
    """A running status server; ``close()`` stops it and frees the port."""

    def __init__(self, server: _Server, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> StatusServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def serve(
    host: str, port: int, *, metrics: Metrics | None = None, health: Health | None = None
) -> StatusServer:
    """Serve /metrics, /healthz and /readyz on ``host:port`` from a daemon thread.

    ``port`` 0 picks a free port (see :attr:`StatusServer.port`). Raises
    ``OSError`` if the address cannot be bound.
    """
    server = (_Server6 if ":" in host else _Server)((host, port), _Handler)
    server.metrics = metrics
    server.health = health if health is not None else Health()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="status", daemon=True
    )
    thread.start()
    return StatusServer(server, thread)
