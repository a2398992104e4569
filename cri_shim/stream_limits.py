"""What one client may cost the streaming server (``cri_shim.streaming``: attach, exec,
port-forward), and the parts that hold it to that: ``StreamingLimits`` (the options, each default
with its reason), ``DeadlineReader`` (reads that end at a phase's deadline and, for the request
head, at a byte budget), ``BoundedHTTPServer`` (counts connections: a new one beyond
``max_handshakes`` without a token closes the oldest; at most ``max_sessions`` sessions) and
``LimitLog`` (counts every hit, logs a warning at most every LIMIT_LOG_INTERVAL per limit). Frame
and header-block limits are ``spdy``'s.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from . import spdy

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger("cri_shim.streaming")

#: seconds from accepting a connection to a complete upgrade request (kubelet and crictl send it at
#: once, over loopback)
HANDSHAKE_TIMEOUT = 10.0
#: seconds from the upgrade to the last of the client's streams (kubelet's stream creation timeout)
STREAM_CREATION_TIMEOUT = 30.0
#: seconds without a frame either way before a session is closed (kubelet's
#: streamingConnectionIdleTimeout and containerd's stream_idle_timeout default)
IDLE_TIMEOUT = 4 * 3600.0
#: bytes of the upgrade request's line and headers (kubelet forwards the user's request headers)
MAX_REQUEST_HEAD_BYTES = 64 << 10
#: connections that have not shown a token yet; a new one closes the oldest
MAX_HANDSHAKES = 32
#: sessions (attach, exec, port-forward) at once (each holds a few threads and at most a frame and
#: the early stdin)
MAX_SESSIONS = 64
#: SYN_STREAMs per connection (a remote-command client opens at most 5)
MAX_STREAMS = 8
#: connections one port-forward session forwards at once (each is a pair of streams and, for a VM,
#: a process and two virtio-serial channels in the guest)
MAX_FORWARDS = 16
#: stdin kept from before the streams are complete (SPDY/3.1's initial stream window: 64 KiB)
MAX_PENDING_STREAM_BYTES = 64 << 10
#: all frames read before the streams are complete, SYN_STREAMs aside (a frame header counts 8)
MAX_PENDING_BYTES = 256 << 10
#: seconds between two log lines about the same limit
LIMIT_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class StreamingLimits:
    """What one client may cost the server (the constants above say why each default)."""

    handshake_timeout: float = HANDSHAKE_TIMEOUT
    stream_creation_timeout: float = STREAM_CREATION_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    max_request_head: int = MAX_REQUEST_HEAD_BYTES
    max_handshakes: int = MAX_HANDSHAKES
    max_sessions: int = MAX_SESSIONS
    max_streams: int = MAX_STREAMS
    max_forwards: int = MAX_FORWARDS
    max_pending_stream: int = MAX_PENDING_STREAM_BYTES
    max_pending: int = MAX_PENDING_BYTES
    frames: spdy.FrameLimits = field(default_factory=spdy.FrameLimits)

    def __post_init__(self) -> None:
        spdy.check_positive(self, "StreamingLimits")


class ConnectionLimit(Exception):
    """A connection ran past a deadline or a size limit: ``limit`` names the option, ``status`` is
    the HTTP answer if the request was still being read."""

    def __init__(self, limit: str, message: str, status: int = 408) -> None:
        super().__init__(message)
        self.limit, self.status = limit, status


class LimitLog:
    """Counts the hits of each limit (``hits``) and logs them: a warning, then the same limit again
    LIMIT_LOG_INTERVAL later at the earliest, with the number of hits in between."""

    def __init__(self) -> None:
        self.hits: collections.Counter[str] = collections.Counter()
        self._next: dict[str, float] = {}
        self._unlogged: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def hit(self, limit: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.hits[limit] += 1
            if now < self._next.get(limit, -math.inf):
                self._unlogged[limit] += 1
                return
            self._next[limit] = now + LIMIT_LOG_INTERVAL
            more = self._unlogged.pop(limit, 0)
        log.warning(
            "streaming: %s%s", message, f" ({more} more of these since the last report)" if more else ""
        )


class DeadlineReader(io.RawIOBase):
    """A connection's socket as a raw stream whose reads end at a deadline (a total: a socket
    timeout would start again with every byte of a slow client) and, while the request head is
    read, at a byte budget. ``last_read`` is when bytes last came in."""

    def __init__(
        self, sock: socket.socket, limit: str, message: str, deadline: float, budget: int | None
    ) -> None:
        super().__init__()
        self.sock = sock
        self.last_read = time.monotonic()
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        self.expire(limit, message, lambda: deadline, budget)

    def expire(
        self, limit: str, message: str, deadline: Callable[[], float], budget: int | None = None
    ) -> None:
        """From now on reads fail with ConnectionLimit(limit, message) past ``deadline()``."""
        self.limit, self.message, self.deadline, self.budget = limit, message, deadline, budget

    def readable(self) -> bool:
        return True

    def readinto(self, buf: WriteableBuffer) -> int:
        while True:
            left = self.deadline() - time.monotonic()
            if left <= 0:
                raise ConnectionLimit(self.limit, self.message)
            if self._poller.poll(math.ceil(min(left, 3600.0) * 1000)):
                break  # else look again: the deadline may have moved (idle time counts writes)
        view = memoryview(buf).cast("B")
        if self.budget is not None:
            if self.budget <= 0:
                raise ConnectionLimit(
                    "max_request_head", "request line and headers over the limit (max_request_head)", 431
                )
            view = view[: self.budget]
        n = self.sock.recv_into(view)
        if self.budget is not None:
            self.budget -= n
        self.last_read = time.monotonic()
        return n


class BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its connections: at most ``max_handshakes`` without a token
    (a new one closes the oldest) and at most ``max_sessions`` that are sessions."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        limits: StreamingLimits,
        limit_log: LimitLog,
    ) -> None:
        self.limits, self.limit_log = limits, limit_log
        self._conns: dict[socket.socket, bool] = {}  # socket -> in a session?; oldest first
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        assert isinstance(request, socket.socket)  # a stream server
        cap = self.limits.max_handshakes
        with self._conns_lock:
            waiting = [s for s, in_session in self._conns.items() if not in_session]
            if len(waiting) >= cap:
                del self._conns[waiting[0]]
                with contextlib.suppress(OSError):
                    waiting[0].shutdown(socket.SHUT_RDWR)  # its thread reads EOF and ends
            self._conns[request] = False
        if len(waiting) >= cap:
            self.limit_log.hit(
                "max_handshakes", f"{cap} connections without a token yet: closed the oldest (max_handshakes)"
            )
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket | tuple[bytes, socket.socket]) -> None:
        with self._conns_lock:
            if isinstance(request, socket.socket):
                self._conns.pop(request, None)
        super().shutdown_request(request)

    def claim_session(self, request: socket.socket) -> bool:
        """Turn a connection into a session, unless there are ``max_sessions`` already."""
        with self._conns_lock:
            if sum(self._conns.values()) >= self.limits.max_sessions:
                return False
            self._conns[request] = True
            return True

    def close_connections(self) -> None:
        with self._conns_lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("streaming: connection from %s failed", client_address, exc_info=True)
