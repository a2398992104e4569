"""One port-forward session (``kubectl port-forward``, ``crictl port-forward``) over a connection
upgraded to SPDY/3.1 with protocol ``portforward.k8s.io``, as kubelet's streaming server speaks it
(k8s.io/kubelet/pkg/cri/streaming/portforward/httpstream.go).

For every connection the client forwards it opens two streams with the same ``requestID`` header
and the ``port`` header: ``streamType: error`` and ``streamType: data``. Once both are open the
runtime's dialer connects to the port (:class:`Forward`), the data stream is copied both ways (a
FIN from the client ends what the port reads), and at the end both streams are closed; when the
port could not be reached or the forward failed, the reason goes on the error stream first and
both streams are reset. A stream whose pair does not complete within ``stream_creation_timeout``
gets an error. One connection carries many forwarded connections over time: at most
``max_forwards`` at once (a stream over that is refused), and the session ends after
``idle_timeout`` without traffic. Data for one forwarded connection goes to it one frame at a time,
so one that does not read holds the client back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from . import spdy
from .stream_limits import ConnectionLimit, DeadlineReader, StreamingLimits

log = logging.getLogger("cri_shim.streaming")

PROTOCOL = "portforward.k8s.io"


class Forward(Protocol):
    """One forwarded connection to a port of the pod."""

    def read(self) -> bytes:
        """What the port sent (chunks, ``b""`` at the end)."""
        ...

    def write(self, data: bytes) -> None: ...

    def close_write(self) -> None: ...

    def wait(self, stop: threading.Event) -> str | None:
        """Once the connection ended: "" or why it failed; None once ``stop`` is set."""
        ...

    def close(self) -> None: ...


#: connects to a port of the pod
Dialer = Callable[[int], Forward]


@dataclass
class PortForwardRequest:
    """What a one-time port-forward URL forwards to."""

    dial: Dialer
    what: str
    expires: float


@dataclass
class _Pair:
    request_id: str
    port: int = 0
    data: int = 0
    error: int = 0
    forward: Forward | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    timer: threading.Timer | None = None
    closed: bool = False


class PortForwardSession:
    """One port-forward connection: pairs of streams, each pair one forwarded connection."""

    def __init__(
        self,
        conn: spdy.Connection,
        req: PortForwardRequest,
        limits: StreamingLimits,
        reader: DeadlineReader,
        on_limit: Callable[[str, str], None],
    ) -> None:
        self.conn, self.req, self.limits, self.reader, self.on_limit = conn, req, limits, reader, on_limit
        self.pairs: dict[str, _Pair] = {}
        self.by_stream: dict[int, _Pair] = {}
        self.lock = threading.Lock()
        self.done = threading.Event()

    def run(self) -> None:
        lim, conn = self.limits, self.conn
        self.reader.expire(
            "idle_timeout",
            f"no traffic for {lim.idle_timeout:g} s (idle_timeout)",
            lambda: max(self.reader.last_read, conn.last_sent) + lim.idle_timeout,
        )
        conn.sock.settimeout(lim.idle_timeout)
        try:
            while not self.done.is_set():
                self._on_frame(conn.read_frame())
        except spdy.ProtocolError as e:
            if isinstance(e, spdy.LimitExceeded):
                self.on_limit(e.limit, f"port-forward to {self.req.what}: {e}")
            log.info("port-forward to %s: refused: %s", self.req.what, e)
            conn.refuse(e)
        except ConnectionLimit as e:
            self.on_limit(e.limit, f"port-forward to {self.req.what}: {e}")
        except (EOFError, OSError):
            pass  # the client went away
        finally:
            self.done.set()
            with self.lock:
                pairs = list(self.pairs.values())
            for p in pairs:
                self._drop(p)
            conn.close()

    def _on_frame(self, f: spdy.Frame) -> None:
        if f.kind == spdy.PING:
            self.conn.ping(f.value)
        elif f.kind == spdy.SYN_STREAM:
            self._on_stream(f)
        elif f.kind == spdy.GOAWAY:
            self.done.set()
        elif f.kind == spdy.RST_STREAM:
            with self.lock:
                p = self.by_stream.get(f.stream_id)
            if p is not None:
                self._drop(p)
        elif f.kind == 0:
            with self.lock:
                p = self.by_stream.get(f.stream_id)
            if p is not None and f.stream_id == p.data:
                self._to_port(p, f)

    def _on_stream(self, f: spdy.Frame) -> None:
        """Answer a SYN_STREAM and add it to its pair; start forwarding once the pair is whole."""
        kind, port_text = f.headers.get("streamtype", ""), f.headers.get("port", "")
        problem = ""
        if kind not in ("data", "error"):
            problem = f"invalid stream type {kind!r}: want data or error"
        elif not port_text.isdigit() or not 0 < int(port_text) < 65536:
            problem = f"unable to parse {port_text!r} as a port (the port header)"
        request_id = f.headers.get("requestid") or str(f.stream_id - (2 if kind == "data" else 0))
        with self.lock:
            p = self.pairs.get(request_id)
            if not problem and p is None and len(self.pairs) >= self.limits.max_forwards:
                problem = f"{self.limits.max_forwards} forwarded connections at once already (max_forwards)"
                self.on_limit("max_forwards", f"port-forward to {self.req.what}: {problem}")
            if not problem and p is not None and (p.data if kind == "data" else p.error):
                problem = f"{kind} stream of request {request_id} already assigned"
            if problem:
                log.info("port-forward to %s: stream %d refused: %s", self.req.what, f.stream_id, problem)
                self.conn.rst_stream(f.stream_id, spdy.REFUSED_STREAM)
                return
            if p is None:
                p = self.pairs[request_id] = _Pair(request_id, int(port_text))
                p.timer = threading.Timer(self.limits.stream_creation_timeout, self._incomplete, (p,))
                p.timer.daemon = True
                p.timer.start()
            setattr(p, kind, f.stream_id)
            self.by_stream[f.stream_id] = p
            whole = bool(p.data and p.error)
        self.conn.syn_reply(f.stream_id)
        if whole:
            assert p.timer is not None
            p.timer.cancel()
            name = f"portforward:{p.port}"
            threading.Thread(target=self._forward, args=(p,), name=name, daemon=True).start()

    def _incomplete(self, p: _Pair) -> None:
        with self.lock:
            whole = bool(p.data and p.error)
        if not whole:
            self._fail(p, f"timed out waiting for the data and error streams of request {p.request_id}")

    def _to_port(self, p: _Pair, f: spdy.Frame) -> None:
        """Client data for the port, one frame at a time; a FIN ends what the port reads."""
        while not p.ready.wait(0.5):
            if self.done.is_set():
                return
        if p.forward is None:
            return  # the dial failed: already reported
        with contextlib.suppress(OSError):
            if f.data:
                p.forward.write(f.data)
            if f.flags & spdy.FLAG_FIN:
                p.forward.close_write()

    def _forward(self, p: _Pair) -> None:
        """Dial the port, copy what it sends to the data stream, report the end (a thread)."""
        try:
            forward = self.req.dial(p.port)
        except Exception as e:
            p.ready.set()
            self._fail(p, str(e))
            return
        with self.lock:
            closed, p.forward = p.closed, forward
        p.ready.set()
        if closed:  # the client reset the streams or left while we dialed
            forward.close()
            return
        try:
            while chunk := forward.read():
                self.conn.data(p.data, chunk)
            error = forward.wait(self.done)
        except (EOFError, OSError):
            error = None
            self.done.set()
        if error is None or p.closed:
            return
        if error:
            self._fail(p, error)
            return
        with contextlib.suppress(EOFError, OSError):
            self.conn.data(p.data, b"", fin=True)
            self.conn.data(p.error, b"", fin=True)
        self._forget(p)

    def _fail(self, p: _Pair, error: str) -> None:
        """The reason on the error stream, then both streams reset (as kubelet does)."""
        msg = f"error forwarding port {p.port} to pod {self.req.what}: {error}"
        log.info("port-forward: %s", msg)
        with contextlib.suppress(EOFError, OSError):
            if p.error:
                self.conn.data(p.error, msg.encode())
            for sid in (p.data, p.error):
                if sid:
                    self.conn.rst_stream(sid, spdy.CANCEL)
        self._forget(p)

    def _forget(self, p: _Pair) -> None:
        with self.lock:
            p.closed = True
            if self.pairs.get(p.request_id) is p:
                del self.pairs[p.request_id]
            for sid in (p.data, p.error):
                if self.by_stream.get(sid) is p:
                    del self.by_stream[sid]
            forward = p.forward
        if forward is not None:
            forward.close()

    def _drop(self, p: _Pair) -> None:
        """The client reset the stream or left: stop forwarding, nothing to report."""
        if p.timer is not None:
            p.timer.cancel()
        p.ready.set()
        self._forget(p)
