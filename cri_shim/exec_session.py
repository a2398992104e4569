"""One remote-command exec session (``kubectl exec``, ``crictl exec``) over a connection upgraded to
SPDY/3.1: the streams are set up and bounded exactly as for an attach (:mod:`.attach_session`,
``StreamingLimits``), but the other end is a process the runtime starts for this session
(:class:`ExecProcess`, e.g. a command in a VM's guest) instead of a console.

* The process is started in a thread while frames are read: with a TTY it waits up to
  FIRST_SIZE_WAIT for the client's first window size (kubectl sends it at once), so the command
  starts with the right size; stdin that comes meanwhile waits (TCP holds the client back).
* stdin goes to the process one frame at a time (a process that does not read holds the client
  back); a FIN on the stdin stream closes the process's stdin; resize messages (JSON
  ``{"Width":W,"Height":H}``) become :meth:`ExecProcess.resize` calls.
* stdout and stderr are copied to their streams; when the process ended and its outputs drained,
  the exit code goes on the error stream as kubelet's streaming server writes it (v4: a Success
  ``metav1.Status``, or a Failure with reason ``NonZeroExitCode`` and an ``ExitCode`` cause).
* A client that goes away ends the session: :meth:`ExecProcess.close` kills what still runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import spdy
from .attach_session import AttachSession, StreamRequest
from .stream_limits import ConnectionLimit

log = logging.getLogger("cri_shim.streaming")

#: seconds a TTY session waits for the client's first window size before starting the command
FIRST_SIZE_WAIT = 0.5
#: bytes of resize messages kept while one is incomplete
MAX_RESIZE_BUFFER = 4096


class ExecProcess(Protocol):
    """The process of one exec session, as the session drives it."""

    def reader(self, stream: str) -> Callable[[], bytes] | None:
        """What reads ``stdout`` or ``stderr`` (chunks, ``b""`` at the end); None if it has none."""
        ...

    def write(self, data: bytes) -> None: ...

    def close_stdin(self) -> None: ...

    def resize(self, rows: int, cols: int) -> None: ...

    def wait(self, stop: threading.Event) -> int | str | None:
        """The exit code once the process ended and its outputs drained (a text: why it could not
        run); None once ``stop`` is set."""
        ...

    def close(self) -> None:
        """Kill what still runs and release everything (idempotent)."""
        ...


#: starts the process for a terminal of (rows, cols); (0, 0) without a TTY or a size
Launcher = Callable[[int, int], ExecProcess]


@dataclass
class ExecRequest(StreamRequest):
    """An exec: what starts the process."""

    launch: Launcher


def exit_status(code: int) -> dict[str, object]:
    """The metav1.Status kubelet's streaming server writes for an exit code."""
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: exit status {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


class ExecSession(AttachSession):
    """One exec: collect the client's streams (as an attach does), start the process, bridge."""

    proc: ExecProcess | None = None

    def _start(self, early_stdin: list[bytes]) -> None:
        assert isinstance(self.req, ExecRequest)
        self.started = threading.Event()
        self.sized = threading.Event()
        self.size = (0, 0)
        self._resize_buf = b""
        self._proc_lock = threading.Lock()
        launcher = threading.Thread(target=self._run_process, name=f"exec:{self.req.what}", daemon=True)
        launcher.start()
        try:
            for data in early_stdin:
                self._stdin(data)
            while not self.done.is_set():
                self._on_exec_frame(self.conn.read_frame())
        except spdy.ProtocolError as e:
            self.done.set()
            self._refuse(e)
        except ConnectionLimit as e:
            self.on_limit(e.limit, f"exec in {self.req.what}: {e}")
            self.finish(f"exec in {self.req.what} closed: {e}", nowait=True)
        except (EOFError, OSError):
            pass  # the client went away, or the session ended and closed the connection
        finally:
            self.done.set()
            self.sized.set()
            launcher.join(30)
            with self._proc_lock:
                proc = self.proc
            if proc is not None:
                proc.close()

    def _on_exec_frame(self, f: spdy.Frame) -> None:
        if f.kind == spdy.PING:
            self.conn.ping(f.value)
        elif f.kind == spdy.SYN_STREAM:
            self._open(f)
        elif f.kind in (spdy.RST_STREAM, spdy.GOAWAY) and (
            f.kind == spdy.GOAWAY or f.stream_id == self.streams.get("error")
        ):
            self.done.set()
        elif f.kind == 0 and f.stream_id == self.streams.get("stdin"):
            if f.data:
                self._stdin(f.data)
            if f.flags & spdy.FLAG_FIN and self._wait_started():
                assert self.proc is not None
                self.proc.close_stdin()
        elif f.kind == 0 and f.stream_id == self.streams.get("resize") and f.data:
            self._on_resize(f.data)

    def _wait_started(self) -> bool:
        """Wait until the process started (or failed to); whether there is one."""
        while not self.started.wait(0.5):
            if self.done.is_set():
                return False
        return self.proc is not None

    def _stdin(self, data: bytes) -> None:
        """One frame of stdin to the process before the next frame is read (backpressure)."""
        if self._wait_started():
            assert self.proc is not None
            with contextlib.suppress(OSError):
                self.proc.write(data)  # its stdin closed: what comes after is dropped

    def _on_resize(self, data: bytes) -> None:
        self._resize_buf = (self._resize_buf + data)[-MAX_RESIZE_BUFFER:]
        decoder = json.JSONDecoder()
        while self._resize_buf.strip():
            text = self._resize_buf.decode(errors="replace").lstrip()
            try:
                msg, end = decoder.raw_decode(text)
            except ValueError:
                return  # incomplete: wait for the rest
            self._resize_buf = text[end:].encode()
            if isinstance(msg, dict):
                rows, cols = msg.get("Height"), msg.get("Width")
                if isinstance(rows, int) and isinstance(cols, int) and rows > 0 and cols > 0:
                    self._resized(rows, cols)

    def _resized(self, rows: int, cols: int) -> None:
        with self._proc_lock:
            self.size = (rows, cols)
            proc = self.proc
        self.sized.set()
        if proc is not None:
            proc.resize(rows, cols)

    def _run_process(self) -> None:
        """Start the process, copy its outputs, report its end (a thread of its own)."""
        assert isinstance(self.req, ExecRequest)
        if self.req.tty and "resize" in self.streams:
            self.sized.wait(FIRST_SIZE_WAIT)
        try:
            size = self.size
            proc = self.req.launch(*size)
        except Exception as e:
            log.info("exec in %s: %s", self.req.what, e)
            self.started.set()
            if not self.done.is_set():
                self.finish(f"error executing command in container: {e}")
            return
        with self._proc_lock:
            self.proc = proc
            resized = self.size != size
        self.started.set()
        if resized:
            proc.resize(*self.size)
        pumps = [
            threading.Thread(target=self._copy, args=(read, self.streams.get(k)), daemon=True)
            for k in ("stdout", "stderr")
            if (read := proc.reader(k)) is not None
        ]
        for t in pumps:
            t.start()
        code = proc.wait(self.done)
        if self.done.is_set() or code is None:
            proc.close()  # the client left: kill what runs, which ends the outputs
        for t in pumps:
            t.join(5)
        if self.done.is_set() or code is None:
            return
        proc.close()  # released before the client hears of the end
        if isinstance(code, str):
            self.finish(f"error executing command in container: {code}")
        else:
            self.send_status(exit_status(code))

    def _copy(self, read: Callable[[], bytes], stream_id: int | None) -> None:
        """One output of the process to its stream (dropped when the client did not ask for it)."""
        try:
            while chunk := read():
                if stream_id is not None:
                    self.conn.data(stream_id, chunk)
        except (EOFError, OSError):
            self.done.set()
