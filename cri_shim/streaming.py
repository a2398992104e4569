"""The shim's own CRI streaming server: ``Attach`` of VM pods to their serial console, ``Exec`` in
their guest and ``PortForward`` to it.

CRI ``Attach`` answers a URL; kubelet (for ``kubectl attach``) or crictl then connects to it and
upgrades the connection to SPDY/3.1, speaking Kubernetes' remote-command protocol
(``v4.channel.k8s.io``, also v3/v2): the client opens an ``error`` stream, plus ``stdin``, ``stdout``,
``stderr`` (not with a TTY) and ``resize`` (with a TTY) as asked for; the server replies to each, then
copies the console to stdout and stdin to the console; at the end it writes a ``metav1.Status`` to
the error stream (v4) and closes. This is what containerd's and kubelet's streaming servers do
(k8s.io/kubelet/pkg/cri/streaming); WebSocket clients are not served (the API server translates
``kubectl``'s WebSocket to SPDY before kubelet).

URLs carry a one-time random token valid for a minute, like kubelet's streaming cache; the server
listens on loopback only (kubelet runs on the same node). A target is a callable that opens the
console and returns a file descriptor (the VM's pty); the server owns and closes it. This module is
the HTTP side (tokens, the upgrade); ``cri_shim.attach_session`` runs the session after it.
``Exec`` URLs (``/exec/<token>``) run ``cri_shim.exec_session`` (the same remote-command protocol,
with a process the runtime starts for the session), ``PortForward`` URLs (``/portforward/<token>``,
protocol ``portforward.k8s.io``) run ``cri_shim.portforward_session``; a token is good for its own
kind of URL only.

No client can make the server hold much (``StreamingLimits``; each hit is counted in ``limit_hits``
and logged, at most every LIMIT_LOG_INTERVAL per limit): each phase of a connection has a deadline
(the upgrade request, the stream set-up, then idleness), the request head and the data that comes
before the streams are complete are capped, frames and header blocks are bounded by ``spdy``, and
stdin goes to the console one frame at a time (a console that does not read stops our reading, so
TCP holds the client back). Connections without a token yet are capped (a new one closes the oldest:
a flood of idle connections cannot lock kubelet out), and so are attach sessions.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import secrets
import termios
import threading
import time
import tty
from http.server import BaseHTTPRequestHandler

from . import spdy
from .attach_session import AttachRequest, AttachSession, Target
from .exec_session import ExecRequest, ExecSession, Launcher
from .portforward_session import PROTOCOL as PORTFORWARD_PROTOCOL
from .portforward_session import Dialer, PortForwardRequest, PortForwardSession
from .stream_limits import (
    BoundedHTTPServer,
    ConnectionLimit,
    DeadlineReader,
    LimitLog,
    StreamingLimits,
)

log = logging.getLogger(__name__)

PROTOCOLS = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io")
TOKEN_TTL = 60.0

Request = AttachRequest | ExecRequest | PortForwardRequest
#: the URL path of each kind of request
KINDS: dict[type, str] = {AttachRequest: "attach", ExecRequest: "exec", PortForwardRequest: "portforward"}


def open_pty(path: str) -> int:
    """Open a console pty for attaching: read/write, non-blocking, not our controlling terminal, raw
    (QEMU makes its ptys raw; make sure no line discipline edits or echoes the bytes)."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    with contextlib.suppress(termios.error):
        tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: keep what the guest wrote already
    return fd


class StreamingServer:
    """A loopback HTTP server handing out one-time attach URLs."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, limits: StreamingLimits | None = None
    ) -> None:
        self.limits = limits or StreamingLimits()
        self._pending: dict[str, Request] = {}
        self._lock = threading.Lock()
        self._limit_log = LimitLog()
        server = self

        class Handler(_AttachHandler):
            streaming = server
            timeout = server.limits.handshake_timeout  # sends too; the session changes it

        self.httpd = BoundedHTTPServer((host, port), Handler, self.limits, self._limit_log)
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="cri-streaming", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self.httpd.socket.getsockname()[:2]
        return f"http://{host}:{port}"

    def attach_url(
        self, target: Target, what: str, *, stdin: bool, stdout: bool, stderr: bool, tty: bool
    ) -> str:
        """A one-time URL bridging the client to the console ``target`` opens."""
        expires = time.monotonic() + TOKEN_TTL
        return self._url(AttachRequest(what, stdin, stdout, stderr and not tty, tty, expires, target=target))

    def exec_url(
        self, launch: Launcher, what: str, *, stdin: bool, stdout: bool, stderr: bool, tty: bool
    ) -> str:
        """A one-time URL running the process ``launch`` starts, with the client's streams."""
        expires = time.monotonic() + TOKEN_TTL
        return self._url(ExecRequest(what, stdin, stdout, stderr and not tty, tty, expires, launch=launch))

    def portforward_url(self, dial: Dialer, what: str) -> str:
        """A one-time URL forwarding the client's connections to the ports ``dial`` connects to."""
        return self._url(PortForwardRequest(dial, what, time.monotonic() + TOKEN_TTL))

    def _url(self, req: Request) -> str:
        token = secrets.token_urlsafe(12)
        now = time.monotonic()
        with self._lock:
            for t in [t for t, r in self._pending.items() if r.expires < now]:
                del self._pending[t]
            self._pending[token] = req
        return f"{self.base_url}/{KINDS[type(req)]}/{token}"

    def take(self, token: str, kind: str = "attach") -> Request | None:
        """The request of a token shown on a URL of ``kind`` (used up either way)."""
        with self._lock:
            req = self._pending.pop(token, None)
        if req is None or req.expires < time.monotonic() or KINDS[type(req)] != kind:
            return None
        return req

    @property
    def limit_hits(self) -> collections.Counter[str]:
        """How many times each limit was hit."""
        return self._limit_log.hits

    def limit_hit(self, limit: str, message: str) -> None:
        """Count a hit of ``limit`` and log ``message`` (rate-limited, see LimitLog)."""
        self._limit_log.hit(limit, message)

    def close(self) -> None:
        """Stop listening and end every connection."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd.close_connections()


class _AttachHandler(BaseHTTPRequestHandler):
    streaming: StreamingServer
    server: BoundedHTTPServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by one that keeps the deadlines
        lim, start = self.streaming.limits, time.monotonic()
        self.reader = DeadlineReader(
            self.connection,
            "handshake_timeout",
            f"upgrade request not complete within {lim.handshake_timeout:g} s (handshake_timeout)",
            start + lim.handshake_timeout,
            lim.max_request_head,
        )
        self.rfile = io.BufferedReader(self.reader)

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionLimit as e:  # while the request is read: the session handles its own
            self.streaming.limit_hit(e.limit, f"{self.client_address[0]}: {e}")
            body = f"{e}\n".encode()
            with contextlib.suppress(OSError):
                self.wfile.write(
                    f"HTTP/1.1 {e.status} {'Request Timeout' if e.status == 408 else 'Too Large'}\r\n"
                    f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode()
                    + body
                )

    def log_message(self, format: str, *args: object) -> None:
        log.debug("streaming: " + format, *args)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _fail(self, code: int, message: str) -> None:
        body = (message + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _serve(self) -> None:
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        if len(parts) != 2 or parts[0] not in KINDS.values():
            return self._fail(404, f"no such streaming endpoint: {self.path}")
        kind = parts[0]
        if not self.server.claim_session(self.connection):
            cap = self.streaming.limits.max_sessions
            self.streaming.limit_hit(
                "max_sessions", f"{cap} streaming sessions already: refused one (max_sessions)"
            )
            return self._fail(503, f"{cap} streaming sessions already (max_sessions): try again later")
        req = self.streaming.take(parts[1], kind)
        if req is None:
            return self._fail(404, f"unknown or expired {kind} token: ask the runtime for a new URL")
        if "spdy/3.1" not in (self.headers.get("Upgrade") or "").lower():
            return self._fail(
                400, "this endpoint serves SPDY/3.1 upgrades (Upgrade: SPDY/3.1); WebSocket is not supported"
            )
        offered = [
            p.strip() for v in self.headers.get_all("X-Stream-Protocol-Version") or [] for p in v.split(",")
        ]
        supported = (PORTFORWARD_PROTOCOL,) if kind == "portforward" else PROTOCOLS
        protocol = next((p for p in offered if p in supported), None)
        if protocol is None:
            return self._fail(
                403,
                f"unable to negotiate a stream protocol: client offers {offered}, "
                f"server supports {list(supported)}",
            )
        self.send_response(101, "Switching Protocols")
        self.send_header("Connection", "Upgrade")
        self.send_header("Upgrade", "SPDY/3.1")
        self.send_header("X-Stream-Protocol-Version", protocol)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        conn = spdy.Connection(self.connection, rfile=self.rfile, limits=self.streaming.limits.frames)
        limits, on_limit = self.streaming.limits, self.streaming.limit_hit
        try:
            if isinstance(req, PortForwardRequest):
                PortForwardSession(conn, req, limits, self.reader, on_limit).run()
            else:
                session = ExecSession if isinstance(req, ExecRequest) else AttachSession
                session(conn, req, protocol, limits, self.reader, on_limit).run()
        finally:
            conn.close()
