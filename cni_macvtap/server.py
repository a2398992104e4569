"""The unix-socket server of one `macvtap daemon` worker: accepts connections, reads one request each,
runs it through plugin.run and answers.

Each connection gets its own thread. A worker started on demand (cni_macvtap.supervisor) is given
``idle_exit``: serve() returns once no call has been under way for that long, and ``on_busy``, called
(at most every ``BUSY_NOTE_EVERY_S``) when a second call arrives while one is under way, so the
supervisor can start another worker for the burst. Each request carries its own environment and stdin, so two
containers' calls never share state beyond the locked host netlink socket; operations on the same
attachment are serialised by the attachment lock (cni_macvtap.locks). A request from a process in
another network namespace is sent back to run in-process (the daemon only acts on the namespace it
lives in).

What a client can make a worker hold is bounded: at most max_connections connections at a time (one
more is handed back at once, to run in-process), a request must arrive whole within request_timeout
seconds, its size is bounded by the wire protocol, and a reply nobody reads is dropped after
request_timeout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import Protocol

from . import namespaces, plugin, wire
from .client import own_netns
from .daemon_log import log
from .errors import DECODING_FAILURE, CNIError

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT_S = 10.0
BUSY_LOG_EVERY_S = 10.0
BUSY_NOTE_EVERY_S = 0.5
ACCEPT_TICK_S = 0.5  # how often serve() looks at its stop flag and its idle time


class Metrics(Protocol):
    """What the server reports to (cni_macvtap.metrics.RequestMetrics; nothing without --ops-address)."""

    def observe(self, command: str | None, seconds: float, exit_code: int, out: bytes) -> None: ...
    def count_not_served(self, reason: str) -> None: ...


def _remove_stale_socket(path: str) -> None:
    """Unlink the socket of a dead daemon; refuse a live daemon or a file that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SystemExit(
            f"macvtap daemon: {path} exists and is not a socket: remove it or choose another --socket"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno != errno.ECONNREFUSED:
            raise
        os.unlink(path)  # nobody listens: a dead daemon's socket
    else:
        raise SystemExit(f"macvtap daemon: another daemon is already listening on {path}")
    finally:
        probe.close()


class Server:
    """The unix-socket server of one worker process."""

    def __init__(
        self, path: str, max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT_S
    ) -> None:
        self.path = path
        self.netns = own_netns()
        self.request_timeout = request_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._busy_count = 0
        self._busy_logged = float("-inf")
        self.metrics: Metrics | None = None  # set in the worker (after the fork) when metrics are on
        self.idle_exit: float | None = None  # seconds without a call after which serve() returns
        self.on_busy: Callable[[], None] | None = None  # a second call arrived while one is under way
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._last_active = time.monotonic()
        self._busy_noted = float("-inf")

    def bind(self) -> None:
        """Create the socket (mode 0600); refuse when another daemon already answers there."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(128)
        self._sock = sock

    def fileno(self) -> int:
        """The listening socket's descriptor (the supervisor watches it while no worker runs)."""
        assert self._sock is not None
        return self._sock.fileno()

    def warm(self) -> None:
        """Import pyroute2 and open the host netlink socket before the first request."""
        namespaces.host_links().default_route_link()

    def serve(self) -> bool:
        """Accept until stop() is called (returns False) or, with ``idle_exit``, until no call has been
        under way for that long (returns True); a connection beyond the limit is handed back at once."""
        assert self._sock is not None
        self._sock.settimeout(ACCEPT_TICK_S)
        self._last_active = time.monotonic()
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                if self._idle_for_long():
                    return True
                continue
            except OSError as exc:
                if self._stop.is_set():
                    break
                log.warning("accept failed: %s", exc)
                continue
            if not self._slots.acquire(blocking=False):
                self._hand_back(conn)
                continue
            self._call_started()
            try:
                threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()
            except RuntimeError:  # no thread to be had: the client does the work itself
                self._call_done()
                self._slots.release()
                self._hand_back(conn)
        return False

    def _idle_for_long(self) -> bool:
        if self.idle_exit is None:
            return False
        with self._in_flight_lock:
            return self._in_flight == 0 and time.monotonic() - self._last_active >= self.idle_exit

    def _call_started(self) -> None:
        with self._in_flight_lock:
            self._in_flight += 1
            concurrent = self._in_flight >= 2
            now = time.monotonic()
            note = concurrent and self.on_busy is not None and now - self._busy_noted >= BUSY_NOTE_EVERY_S
            if note:
                self._busy_noted = now
        if note and self.on_busy is not None:
            self.on_busy()

    def _call_done(self) -> None:
        with self._in_flight_lock:
            self._in_flight -= 1
            self._last_active = time.monotonic()

    def request_stop(self) -> None:
        """Make serve() return (safe from a signal handler)."""
        self._stop.set()

    def stop(self) -> None:
        """Stop serving and remove the socket file (the process that bound it)."""
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _hand_back(self, conn: socket.socket) -> None:
        """All slots are taken: the client runs this call in-process (same code, same answer)."""
        with conn:
            conn.settimeout(1.0)
            self._reply(conn, wire.FALLBACK, b"", "macvtap daemon busy: run the call in-process")
        self._busy_count += 1
        if self.metrics is not None:
            self.metrics.count_not_served("busy")
        now = time.monotonic()
        if now - self._busy_logged >= BUSY_LOG_EVERY_S:
            self._busy_logged = now
            log.warning("busy: every connection slot is taken; %d calls handed back so far", self._busy_count)

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._handle(conn)
        finally:
            self._call_done()
            self._slots.release()

    def _handle(self, conn: socket.socket) -> None:
        try:
            netns, env, stdin = wire.recv_request(conn, time.monotonic() + self.request_timeout)
        except TimeoutError:
            self._not_served("timeout")
            log.warning("a request took longer than %g s to arrive: connection closed", self.request_timeout)
            return
        except (OSError, wire.ProtocolError, UnicodeError) as exc:
            self._not_served("malformed")
            log.warning("bad request: %s", exc)
            err = CNIError(DECODING_FAILURE, f"malformed request to the macvtap daemon: {exc}")
            conn.settimeout(self.request_timeout)
            self._reply(conn, 1, err.to_json(), err.msg)
            return
        if netns != self.netns:
            self._not_served("other_netns")
            self._reply(conn, wire.FALLBACK, b"", "caller is in another network namespace")
            return
        conn.settimeout(None)
        t0 = time.perf_counter()
        out, code, err_text = plugin.run(env, stdin)
        seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.observe(env.get("CNI_COMMAND"), seconds, code, out)
        self._log_call(env, seconds, code, err_text)
        conn.settimeout(self.request_timeout)  # a client that does not read its reply is dropped
        self._reply(conn, code, out, err_text)

    def _not_served(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.count_not_served(reason)

    @staticmethod
    def _log_call(env: dict[str, str], seconds: float, code: int, err_text: str) -> None:
        command = env.get("CNI_COMMAND")
        cid, ifname = env.get("CNI_CONTAINERID", ""), env.get("CNI_IFNAME", "")
        fields = {"command": command, "container_id": cid, "ifname": ifname, "ms": round(1000 * seconds, 2)}
        what = f"{command} {cid}/{ifname}"
        if code:
            last = err_text.strip().splitlines()[-1:]
            log.warning("%s failed (exit %d) in %.1f ms: %s", what, code, fields["ms"], last,
                        extra={**fields, "exit_code": code})  # fmt: skip
            if "Traceback" in err_text:
                log.error("%s", err_text)  # a bug: keep the traceback in the daemon's log, never on stdout
        else:
            log.info("%s ok in %.1f ms", what, fields["ms"], extra=fields)

    @staticmethod
    def _reply(conn: socket.socket, code: int, out: bytes, err: str) -> None:
        try:
            wire.send_reply(conn, code, out, err)
        except OSError as exc:
            log.info("client went away before the reply: %s", exc)
