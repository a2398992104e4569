"""The macvtap daemon's operational endpoints over HTTP: ``/healthz`` (the process answers),
``/readyz`` (every worker is warm and serving: 200, else 503 with the reason) and ``/metrics``
(Prometheus; :mod:`cni_macvtap.metrics`).

The supervisor never starts a thread (it forks workers), so this server has none either: the
supervisor's loop waits on its socket and calls :meth:`OpsEndpoint.handle_one` when a client is
there. A client gets ``CLIENT_TIMEOUT_S`` to send its request, so a stuck one delays the loop
(restarting a dead worker) by at most that. With ``--workers 1`` there is no supervisor loop and
:meth:`OpsEndpoint.serve_in_thread` serves it from a thread instead.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by the daemon before prometheus_client may be (cni_macvtap.metrics_files)
    from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("macvtap-daemon")

CLIENT_TIMEOUT_S = 2.0
Readiness = Callable[[], tuple[bool, str]]


def parse_address(text: str) -> tuple[str, int] | None:
    """``"127.0.0.1:9642"`` / ``"[::1]:9642"`` -> (host, port); ``""`` -> None (disabled)."""
    if text == "":
        return None
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(
            f"--ops-address: {text!r} is not HOST:PORT; "
            'use e.g. "127.0.0.1:9642", "[::1]:9642", or "" to disable'
        )
    return host, int(port)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = CLIENT_TIMEOUT_S
    protocol_version = "HTTP/1.0"
    server_version = "macvtap-daemon"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        ctype = "text/plain; charset=utf-8"
        if path == "/healthz":
            status, body = 200, b"ok\n"
        elif path == "/readyz":
            ok, why = self.server.ready()
            status, body = (200, b"ok\n") if ok else (503, f"not ready: {why}\n".encode())
        elif path == "/metrics":
            from prometheus_client.exposition import choose_encoder

            encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
            status, body = 200, encoder(self.server.registry)
        else:
            status, body = 404, b"not found: try /healthz, /readyz, /metrics\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("ops %s %s", self.address_string(), format % args)


class _Server(HTTPServer):
    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, ready: Readiness) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.registry = registry
        self.ready = ready
        super().__init__(address, _Handler)
        self.timeout = 0  # handle_request() never waits: the caller polls the socket


class OpsEndpoint:
    """The bound HTTP endpoint (OSError from the constructor when the address cannot be had)."""

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, ready: Readiness) -> None:
        self._server = _Server(address, registry, ready)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def fileno(self) -> int:
        return self._server.fileno()

    def handle_one(self) -> None:
        """Serve one waiting client (call when the socket is readable)."""
        self._server.handle_request()

    def serve_in_thread(self) -> None:
        self._server.timeout = None
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="ops-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
