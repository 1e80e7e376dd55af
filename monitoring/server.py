"""The side-port HTTP server: ``/metrics``, ``/healthz`` and ``/readyz``."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from monitoring.health import Health


class MetricsServer:
    """Serves metrics and health on their own host and port, in a background thread."""

    def __init__(self, registry: CollectorRegistry, health: Health, *, host: str, port: int) -> None:
        self.registry = registry
        self.health = health
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlparse(self.path).path
                if path == "/metrics":
                    encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                    self._send(200, encoder(server.registry), content_type)
                elif path == "/healthz":
                    liveness = server.health.liveness()
                    if liveness.alive:
                        self._send_json(200, {"status": "alive"})
                    else:
                        self._send_json(503, {"status": "unhealthy", "reasons": liveness.reasons})
                elif path == "/readyz":
                    report = server.health.readiness()
                    body = {"status": "ready" if report.ready else "not ready", "reasons": report.reasons}
                    if report.details:
                        body["details"] = report.details
                    self._send_json(200 if report.ready else 503, body)
                else:
                    self._send_json(404, {"error": "not found"})

            def _send_json(self, status: int, body: dict[str, Any]) -> None:
                self._send(status, json.dumps(body).encode(), "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # A balancer's health check may read the status line and hang up: nothing to report.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Scrapes are not worth a log line."""
                return

        return Handler
