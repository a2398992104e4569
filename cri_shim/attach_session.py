"""One remote-command attach session over a connection upgraded to SPDY/3.1 (the HTTP side is
``cri_shim.streaming``): collect the client's streams (``error``, ``stdin``, ``stdout``, ``stderr``,
``resize``), answering each, then bridge them to the console until either side ends, and report the
end on the error stream (v4: a ``metav1.Status``), as kubelet's streaming server does.

Bounded (``StreamingLimits``): the streams must all be open within ``stream_creation_timeout``, at
most ``max_streams`` may be opened, what comes before they are (``max_pending``, of which stdin
``max_pending_stream``) is capped; after that the session ends after ``idle_timeout`` without
traffic, and stdin goes to the console one frame at a time (a console that does not read stops our
reading, so TCP holds the client back).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import spdy
from .stream_limits import ConnectionLimit, DeadlineReader, StreamingLimits

log = logging.getLogger("cri_shim.streaming")

STREAM_TYPES = ("error", "stdin", "stdout", "stderr", "resize")


class Console(Protocol):
    """An attached console (``cri_shim.console_fanout.Tap``): output since attaching, input to it."""

    #: why reading ended: "" the console closed (the VM stopped); None while it goes on
    ended: str | None

    def read(self, timeout: float) -> bytes | None:
        """Output since the last read; None when none came within ``timeout`` s; b"" at the end."""
        ...

    def write(self, data: bytes, stop: threading.Event) -> None:
        """Write to the console, waiting while it does not take more, until ``stop`` is set."""
        ...

    def close(self) -> None:
        """Detach."""
        ...


#: Attaches to the console (may raise: the VM is not running).
Target = Callable[[], Console]


@dataclass
class StreamRequest:
    """What a one-time URL is for: which streams the client was told to open, until when."""

    what: str
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool
    expires: float


@dataclass
class AttachRequest(StreamRequest):
    """An attach to a console."""

    target: Target


class AttachSession:
    """One attach: collect the client's streams, then bridge them to the console."""

    def __init__(
        self,
        conn: spdy.Connection,
        req: StreamRequest,
        protocol: str,
        limits: StreamingLimits,
        reader: DeadlineReader,
        on_limit: Callable[[str, str], None],
    ) -> None:
        self.conn, self.req, self.protocol = conn, req, protocol
        self.limits, self.reader, self.on_limit = limits, reader, on_limit
        self.streams: dict[str, int] = {}
        self.opened = 0  # SYN_STREAMs, for max_streams
        self.console: Console | None = None
        self.done = threading.Event()

    def expected(self) -> int:
        r = self.req
        return 1 + r.stdin + r.stdout + r.stderr + (r.tty and self.protocol != "v2.channel.k8s.io")

    def run(self) -> None:
        lim, conn = self.limits, self.conn
        end = time.monotonic() + lim.stream_creation_timeout
        self.reader.expire(
            "stream_creation_timeout",
            f"streams not all open within {lim.stream_creation_timeout:g} s (stream_creation_timeout)",
            lambda: end,
        )
        conn.sock.settimeout(lim.stream_creation_timeout)
        try:
            early_stdin = self._collect_streams()
        except spdy.ProtocolError as e:
            return self._refuse(e)
        except (ConnectionLimit, TimeoutError, EOFError, OSError) as e:
            if isinstance(e, ConnectionLimit):
                self.on_limit(e.limit, f"attach to {self.req.what}: {e}")
            log.info("attach to %s: streams not set up: %s", self.req.what, e)
            return
        self.reader.expire(
            "idle_timeout",
            f"no traffic for {lim.idle_timeout:g} s (idle_timeout)",
            lambda: max(self.reader.last_read, conn.last_sent) + lim.idle_timeout,
        )
        conn.sock.settimeout(lim.idle_timeout)  # a write that cannot go on for that long: gone
        self._start(early_stdin)

    def _start(self, early_stdin: list[bytes]) -> None:
        """Open the console and bridge the streams to it (an exec session starts a process)."""
        assert isinstance(self.req, AttachRequest)
        try:
            self.console = self.req.target()
        except Exception as e:
            log.info("attach to %s: %s", self.req.what, e)
            self.finish(f"error attaching to container: {e}")
            return
        self._bridge(early_stdin)

    def _collect_streams(self) -> list[bytes]:
        """Read frames until the client's streams are open, answering each SYN_STREAM; returns the
        stdin that came early. Bounded: ``max_pending`` bytes of other frames read, of which at most
        ``max_pending_stream`` bytes of stdin kept."""
        lim, conn = self.limits, self.conn
        early: list[bytes] = []
        kept = read = 0
        while len(self.streams) < self.expected():
            f = conn.read_frame()
            if f.kind == spdy.SYN_STREAM:
                self._open(f, record=True)
                continue
            read += 8 + len(f.data)
            if read > lim.max_pending:
                raise spdy.LimitExceeded(
                    "max_pending",
                    f"over {lim.max_pending} bytes of frames before the streams were open (max_pending)",
                )
            if f.kind == spdy.PING:
                conn.ping(f.value)
            elif f.kind == 0 and f.data and f.stream_id == self.streams.get("stdin"):
                kept += len(f.data)
                if kept > lim.max_pending_stream:
                    raise spdy.LimitExceeded(
                        "max_pending_stream",
                        f"over {lim.max_pending_stream} bytes of stdin before the streams were open "
                        "(max_pending_stream)",
                        stream_id=f.stream_id,
                        status=spdy.FLOW_CONTROL_ERROR,
                    )
                early.append(f.data)
        return early

    def _open(self, f: spdy.Frame, record: bool = False) -> None:
        """Answer a SYN_STREAM and, while the streams are set up (``record``), note its type; types
        other than the remote-command ones are answered but not counted, as kubelet does. The
        stream after ``max_streams`` ends the session."""
        self.opened += 1
        if self.opened > self.limits.max_streams:
            raise spdy.LimitExceeded(
                "max_streams",
                f"stream {f.stream_id}: over {self.limits.max_streams} streams opened (max_streams)",
                stream_id=f.stream_id,
                status=spdy.REFUSED_STREAM,
            )
        kind = f.headers.get("streamtype", "")
        if record and kind in STREAM_TYPES:
            self.streams[kind] = f.stream_id
        self.conn.syn_reply(f.stream_id)

    def _refuse(self, e: spdy.ProtocolError) -> None:
        if isinstance(e, spdy.LimitExceeded):
            self.on_limit(e.limit, f"attach to {self.req.what}: {e}")
        log.info("attach to %s: refused: %s", self.req.what, e)
        self.conn.refuse(e)

    def _bridge(self, early_stdin: list[bytes]) -> None:
        pump = threading.Thread(target=self._pump, name=f"attach:{self.req.what}", daemon=True)
        pump.start()
        try:
            for data in early_stdin:
                self._write_console(data)
            while not self.done.is_set():
                self._on_frame(self.conn.read_frame())
        except spdy.ProtocolError as e:
            self.done.set()
            self._refuse(e)
        except ConnectionLimit as e:
            self.on_limit(e.limit, f"attach to {self.req.what}: {e}")
            self.finish(f"attach to {self.req.what} closed: {e}", nowait=True)
        except (EOFError, OSError):
            pass  # the client went away (detach): the VM runs on
        finally:
            self.done.set()
            pump.join(5)
            if self.console is not None:
                self.console.close()

    def _on_frame(self, f: spdy.Frame) -> None:
        if f.kind == spdy.PING:
            self.conn.ping(f.value)
        elif f.kind == spdy.SYN_STREAM:
            self._open(f)
        elif f.kind in (spdy.RST_STREAM, spdy.GOAWAY) and (
            f.kind == spdy.GOAWAY or f.stream_id == self.streams.get("error")
        ):
            self.done.set()
        elif f.kind == 0 and f.stream_id == self.streams.get("stdin") and f.data:
            self._write_console(f.data)
        # resize: a serial console has no window size; SETTINGS/WINDOW_UPDATE: nothing to do

    def _write_console(self, data: bytes) -> None:
        """Write one frame's stdin to the console before reading the next frame: a console that
        does not read holds the client back (TCP) instead of filling our memory."""
        assert self.console is not None
        self.console.write(data, self.done)

    def _pump(self) -> None:
        """Console -> stdout (stderr is never asked for with a TTY; without one the console is
        stdout). Ends when the client is gone or the console closes (the VM stopped)."""
        assert self.console is not None
        out = self.streams.get("stdout")
        try:
            while not self.done.is_set():
                chunk = self.console.read(0.5)
                if chunk is None:
                    continue
                if not chunk:
                    if not self.done.is_set():
                        self.finish(self.console.ended or "")
                    return
                if out is not None:
                    self.conn.data(out, chunk)
        except (EOFError, OSError):
            self.done.set()

    def finish(self, error: str, nowait: bool = False) -> None:
        """Report the end on the error stream (v4: a metav1.Status) and close the output streams;
        ``nowait``: only if the client's window has room (it may not be reading)."""
        status: dict[str, object] = {"metadata": {}, "status": "Success"}
        if error:
            status = {
                "metadata": {},
                "status": "Failure",
                "message": error,
                "reason": "InternalError",
                "code": 500,
            }
        self.send_status(status, nowait)

    def send_status(self, status: dict[str, object], nowait: bool = False) -> None:
        """End the session with ``status`` (a metav1.Status) on the error stream: as JSON (v4), as
        its message when it is a failure (v3, v2), as kubelet's streaming server does; close the
        output streams and the connection."""
        self.done.set()
        err = self.streams.get("error")
        if self.protocol == "v4.channel.k8s.io":
            payload = json.dumps(status).encode()
        else:
            payload = str(status.get("message", "")).encode() if status.get("status") != "Success" else b""
        frames = [
            spdy.data_frame(self.streams[k], b"", True) for k in ("stdout", "stderr") if k in self.streams
        ]
        if err is not None:
            frames.append(spdy.data_frame(err, payload, True))
        if nowait:
            self.conn.send_nowait(b"".join(frames))
        else:
            with contextlib.suppress(EOFError, OSError):
                for frame in frames:
                    self.conn.send(frame)
        self.conn.close()
