"""The small HTTP server of a daemon's operational endpoints, for edgevirt-cri and (later) the
controllers in vmcrd:

* ``/healthz`` - 200 while the process runs (it answers, so it is alive)
* ``/readyz``  - 200 when the daemon's readiness check passes, else 503 with the reason
* ``/metrics`` - the Prometheus registry, in the text format or OpenMetrics (by ``Accept``)

It listens on one TCP address (``--ops-address``, loopback by default; ``""`` disables it), serves
GET and HEAD only, at most ``max_connections`` connections at a time (more are closed at once),
and gives a client ``request_timeout`` seconds to send its request. It runs in daemon threads and
never touches the daemon's own work.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger("edgevirt.ops_http")

#: () -> (ready, why not). Called for every /readyz; it should answer within a few seconds.
Readiness = Callable[[], tuple[bool, str]]

MAX_CONNECTIONS = 16
REQUEST_TIMEOUT_S = 10.0


class AddressError(ValueError):
    """An ops address that cannot be used; the message names the flag and the fix."""


def parse_address(text: str, flag: str = "--ops-address") -> tuple[str, int] | None:
    """``"127.0.0.1:9641"`` or ``"[::1]:9641"`` -> (host, port); ``""`` -> None (disabled)."""
    if text == "":
        return None
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise AddressError(
            f'{flag}: {text!r} is not HOST:PORT; use e.g. "127.0.0.1:9641", "[::1]:9641", or "" to disable'
        )
    return host, int(port)


def address_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT_S
    protocol_version = "HTTP/1.0"
    server_version = "edgevirt-ops"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            status, ctype, body = 200, "text/plain; charset=utf-8", b"ok\n"
        elif path == "/readyz":
            status, ctype, body = self._readyz()
        elif path == "/metrics":
            encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
            status, body = 200, encoder(self.server.registry)
        else:
            status, ctype = 404, "text/plain; charset=utf-8"
            body = b"not found: try /healthz, /readyz, /metrics\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _readyz(self) -> tuple[int, str, bytes]:
        try:
            ok, why = self.server.ready()
        except Exception as e:  # a failing check is an answer: not ready, and why
            log.exception("the readiness check failed")
            ok, why = False, f"readiness check failed: {e}"
        text = "ok\n" if ok else f"not ready: {why}\n"
        return (200 if ok else 503), "text/plain; charset=utf-8", text.encode()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], registry: CollectorRegistry, ready: Readiness, max_connections: int
    ) -> None:
        self.address_family = address_family(address[0])
        self.registry = registry
        self.ready = ready
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # every slot is taken: this one is closed at once
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class OpsServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on ``address``; :meth:`start` binds and serves."""

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        ready: Readiness,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._requested = address
        self._registry = registry
        self._ready = ready
        self._max_connections = max_connections
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OpsServer:
        """Bind (OSError when the address cannot be had) and serve in a daemon thread."""
        self._server = _Server(self._requested, self._registry, self._ready, self._max_connections)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="ops-http", daemon=True
        )
        self._thread.start()
        return self

    @property
    def address(self) -> tuple[str, int]:
        """The address served (the real port when 0 was asked for)."""
        if self._server is None:
            return self._requested
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
