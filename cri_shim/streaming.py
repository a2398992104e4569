"""The shim's own CRI streaming server: ``Attach`` of VM pods to their serial console.

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
console and returns a file descriptor (the VM's pty); the server owns and closes it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import select
import termios
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import spdy

log = logging.getLogger(__name__)

PROTOCOLS = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io")
TOKEN_TTL = 60.0
STREAM_CREATION_TIMEOUT = 30.0

#: Opens the console to attach to; returns a read/write file descriptor (non-blocking).
Target = Callable[[], int]


@dataclass
class AttachRequest:
    target: Target
    what: str
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool
    expires: float


def open_pty(path: str) -> int:
    """Open a console pty for attaching: read/write, non-blocking, not our controlling terminal, raw
    (QEMU makes its ptys raw; make sure no line discipline edits or echoes the bytes)."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    with contextlib.suppress(termios.error):
        tty.setraw(fd, termios.TCSANOW)  # not TCSAFLUSH: keep what the guest wrote already
    return fd


class StreamingServer:
    """A loopback HTTP server handing out one-time attach URLs."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._pending: dict[str, AttachRequest] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(_AttachHandler):
            streaming = server

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="cri-streaming", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def attach_url(
        self, target: Target, what: str, *, stdin: bool, stdout: bool, stderr: bool, tty: bool
    ) -> str:
        token = secrets.token_urlsafe(12)
        now = time.monotonic()
        with self._lock:
            for t in [t for t, r in self._pending.items() if r.expires < now]:
                del self._pending[t]
            self._pending[token] = AttachRequest(
                target, what, stdin, stdout, stderr and not tty, tty, now + TOKEN_TTL
            )
        return f"{self.base_url}/attach/{token}"

    def take(self, token: str) -> AttachRequest | None:
        with self._lock:
            req = self._pending.pop(token, None)
        return req if req and req.expires >= time.monotonic() else None

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _AttachHandler(BaseHTTPRequestHandler):
    streaming: StreamingServer
    protocol_version = "HTTP/1.1"

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
        if len(parts) != 2 or parts[0] != "attach":
            return self._fail(404, f"no such streaming endpoint: {self.path}")
        req = self.streaming.take(parts[1])
        if req is None:
            return self._fail(404, "unknown or expired attach token: ask the runtime for a new URL (Attach)")
        if "spdy/3.1" not in (self.headers.get("Upgrade") or "").lower():
            return self._fail(
                400, "this endpoint serves SPDY/3.1 upgrades (Upgrade: SPDY/3.1); WebSocket is not supported"
            )
        offered = [
            p.strip() for v in self.headers.get_all("X-Stream-Protocol-Version") or [] for p in v.split(",")
        ]
        protocol = next((p for p in offered if p in PROTOCOLS), None)
        if protocol is None:
            return self._fail(
                403,
                f"unable to negotiate a stream protocol: client offers {offered}, "
                f"server supports {list(PROTOCOLS)}",
            )
        self.send_response(101, "Switching Protocols")
        self.send_header("Connection", "Upgrade")
        self.send_header("Upgrade", "SPDY/3.1")
        self.send_header("X-Stream-Protocol-Version", protocol)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        conn = spdy.Connection(self.connection, rfile=self.rfile)
        try:
            _Session(conn, req, protocol).run()
        finally:
            conn.close()


class _Session:
    """One attach: collect the client's streams, then bridge them to the console."""

    def __init__(self, conn: spdy.Connection, req: AttachRequest, protocol: str) -> None:
        self.conn, self.req, self.protocol = conn, req, protocol
        self.streams: dict[str, int] = {}
        self.fd: int | None = None
        self.done = threading.Event()

    def expected(self) -> int:
        r = self.req
        return 1 + r.stdin + r.stdout + r.stderr + (r.tty and self.protocol != "v2.channel.k8s.io")

    def run(self) -> None:
        conn = self.conn
        conn.sock.settimeout(STREAM_CREATION_TIMEOUT)
        pending: list[spdy.Frame] = []
        try:
            while len(self.streams) < self.expected():
                f = conn.read_frame()
                if f.kind == spdy.SYN_STREAM:
                    self.streams[f.headers.get("streamtype", "")] = f.stream_id
                    conn.syn_reply(f.stream_id)
                elif f.kind == spdy.PING:
                    conn.ping(f.value)
                elif f.kind == 0:
                    pending.append(f)  # stdin sent right after its stream was created
        except (TimeoutError, EOFError, spdy.ProtocolError, OSError) as e:
            log.info("attach to %s: streams not set up: %s", self.req.what, e)
            return
        conn.sock.settimeout(None)
        try:
            self.fd = self.req.target()
        except Exception as e:
            log.info("attach to %s: %s", self.req.what, e)
            self.finish(f"error attaching to container: {e}")
            return
        pump = threading.Thread(target=self._pump, name=f"attach:{self.req.what}", daemon=True)
        pump.start()
        try:
            for f in pending:
                self._on_frame(f)
            while not self.done.is_set():
                self._on_frame(conn.read_frame())
        except (EOFError, spdy.ProtocolError, OSError):
            pass  # the client went away (detach): the VM runs on
        finally:
            self.done.set()
            pump.join(5)
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def _on_frame(self, f: spdy.Frame) -> None:
        if f.kind == spdy.PING:
            self.conn.ping(f.value)
        elif f.kind in (spdy.RST_STREAM, spdy.GOAWAY) and (
            f.kind == spdy.GOAWAY or f.stream_id == self.streams.get("error")
        ):
            self.done.set()
        elif f.kind == 0 and f.stream_id == self.streams.get("stdin") and f.data:
            self._write_console(f.data)
        # resize: a serial console has no window size; SETTINGS/WINDOW_UPDATE: nothing to do

    def _write_console(self, data: bytes) -> None:
        assert self.fd is not None
        while data and not self.done.is_set():
            try:
                n = os.write(self.fd, data)
                data = data[n:]
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)

    def _pump(self) -> None:
        """Console -> stdout (stderr is never asked for with a TTY; without one the console is
        stdout). Ends when the client is gone or the console closes (the VM stopped)."""
        assert self.fd is not None
        out = self.streams.get("stdout")
        try:
            while not self.done.is_set():
                r, _, _ = select.select([self.fd], [], [], 0.5)
                if not r:
                    continue
                try:
                    chunk = os.read(self.fd, 65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    if e.errno != errno.EIO:  # EIO: the pty's other side (QEMU) is gone
                        raise
                    chunk = b""
                if not chunk:
                    self.finish("")
                    return
                if out is not None:
                    self.conn.data(out, chunk)
        except (EOFError, OSError):
            self.done.set()

    def finish(self, error: str) -> None:
        """Report the end on the error stream (v4: a metav1.Status) and close the output streams."""
        self.done.set()
        err = self.streams.get("error")
        if self.protocol == "v4.channel.k8s.io":
            status = {"metadata": {}, "status": "Success"}
            if error:
                status = {
                    "metadata": {},
                    "status": "Failure",
                    "message": error,
                    "reason": "InternalError",
                    "code": 500,
                }
            payload = json.dumps(status).encode()
        else:
            payload = error.encode()
        with contextlib.suppress(EOFError, OSError):
            for kind in ("stdout", "stderr"):
                if kind in self.streams:
                    self.conn.data(self.streams[kind], b"", fin=True)
            if err is not None:
                self.conn.data(err, payload, fin=True)
        self.conn.close()
