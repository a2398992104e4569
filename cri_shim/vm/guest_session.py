"""One command running in a guest with its streams on hot-plugged virtio-serial channels: the host
side of a streaming exec (``kubectl exec``) and of one port-forward connection.

:meth:`GuestProcess.start` plugs a channel per stream (``out`` always; ``in`` for stdin, ``err``
for a stderr of its own, ``resize`` with a TTY; :mod:`.channels`), connects to their sockets, starts
:func:`.guest_scripts.session` through the guest agent and waits for the sync byte on each port the
host writes to (bytes sent before the guest opened a port would be lost). Then:

* :meth:`~GuestProcess.write` / :meth:`~GuestProcess.close_stdin`: stdin; closing the socket is an
  end of file for the guest's reader;
* :attr:`~GuestProcess.stdout` / :attr:`~GuestProcess.stderr`: :class:`MarkedReader`\\ s that end at
  the session's random end marker (the host side of a port never sees an end of file);
* :meth:`~GuestProcess.resize`: a TTY's new window size;
* :meth:`~GuestProcess.wait`: polls ``guest-exec-status`` until the command ended (quickly once the
  outputs ended), lets the outputs drain, and answers how it ended (with the agent-captured
  stderr, where port-forward's ``nc`` writes why it could not connect);
* :meth:`~GuestProcess.close`: kills whatever still runs (:func:`.guest_exec.kill`), closes the
  sockets and unplugs the channels; always call it (it is idempotent), also after a failure.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from . import guest_exec, guest_scripts
from .agent import ExecStatus, GuestAgent
from .channels import PREFIX
from .errors import AgentError, VMError

log = logging.getLogger("cri_shim.vm")

#: seconds for the guest to find its ports and answer with the sync bytes
SETUP_TIMEOUT = 15.0
#: seconds the outputs may still take after the command ended
DRAIN_GRACE = 2.0
#: seconds between guest-exec-status polls: first, growth factor, longest (while output flows)
FIRST_POLL = 0.01
POLL_GROWTH = 1.5
LONGEST_POLL = 1.0
READ_SIZE = 64 << 10


class Guests(Protocol):
    """What a session uses of the libvirt layer (:class:`.lifecycle.DomainManager`)."""

    def guest_agent(self, name: str) -> GuestAgent: ...

    def plug_channel(self, name: str, port_name: str) -> str: ...

    def unplug_channel(self, name: str, port_name: str) -> bool: ...

    def session_channels(self, name: str) -> list[str]: ...


@dataclass(frozen=True)
class SessionSpec:
    """What to run and which streams it gets. ``stderr``: ``port`` (a channel of its own),
    ``captured`` (the agent captures it: :attr:`ExecStatus.stderr`) or ``none``."""

    argv: Sequence[str]
    stdin: bool = False
    stderr: str = "port"
    tty: bool = False
    rows: int = 0
    cols: int = 0

    def streams(self) -> list[str]:
        out = ["out"]
        out += ["in"] if self.stdin else []
        out += ["err"] if self.stderr == "port" and not self.tty else []
        out += ["resize"] if self.tty else []
        return out


class MarkedReader:
    """The output of one port: chunks until the end marker (not included), then ``b""``. Holds
    back only a tail that could be the start of the marker, so a prompt is never held back."""

    def __init__(self, sock: socket.socket, marker: bytes) -> None:
        self.sock = sock
        self.marker = marker
        self.ended = threading.Event()
        self.complete = False  # ended at the marker (not at a closed socket)
        self._held = b""

    def read(self) -> bytes:
        while not self.ended.is_set():
            try:
                chunk = self.sock.recv(READ_SIZE)
            except OSError:
                chunk = b""
            if not chunk:
                self.ended.set()
                return self._held
            data, self._held = self._held + chunk, b""
            at = data.find(self.marker)
            if at >= 0:
                self.complete = True
                self.ended.set()
                return data[:at]
            keep = _marker_prefix_len(data, self.marker)
            self._held = data[len(data) - keep :] if keep else b""
            if len(data) > keep:
                return data[: len(data) - keep]
        return b""


def _marker_prefix_len(data: bytes, marker: bytes) -> int:
    """The length of the longest tail of ``data`` that is a proper prefix of ``marker``."""
    for n in range(min(len(data), len(marker) - 1), 0, -1):
        if data.endswith(marker[:n]):
            return n
    return 0


class GuestProcess:
    """One command in domain ``domain``'s guest, its streams on channels of its own."""

    def __init__(self, guests: Guests, domain: str, spec: SessionSpec) -> None:
        self.guests, self.domain, self.spec = guests, domain, spec
        self.id = secrets.token_hex(4)
        self.marker = f"\x1eedgevirt-end:{secrets.token_hex(16)}\x1e"
        self.agent = guests.guest_agent(domain)
        self.pid: int | None = None
        self.status: ExecStatus | None = None
        self.stdout: MarkedReader | None = None
        self.stderr: MarkedReader | None = None
        self._socks: dict[str, socket.socket] = {}
        self._plugged: list[str] = []
        self._lock = threading.Lock()
        self._closed = False
        self._stdin_closed = False

    def port_name(self, stream: str) -> str:
        return f"{PREFIX}{self.id}.{stream}"

    def start(self) -> None:
        """Plug the channels, start the command, wait until the guest holds its ports."""
        try:
            for stream in self.spec.streams():
                path = self.guests.plug_channel(self.domain, self.port_name(stream))
                self._plugged.append(stream)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._socks[stream] = sock
                sock.connect(path)
            marker = self.marker.encode()
            self.stdout = MarkedReader(self._socks["out"], marker)
            if "err" in self._socks:
                self.stderr = MarkedReader(self._socks["err"], marker)
            s = self.spec
            path, args = guest_scripts.session(
                f"{PREFIX}{self.id}", self.marker, s.argv, stdin=s.stdin, stderr=s.stderr,
                tty=s.tty, rows=s.rows, cols=s.cols,
            )  # fmt: skip
            self.pid = self.agent.exec(path, args, capture_output=True)
            self._await_sync([k for k in ("in", "resize") if k in self._socks])
        except BaseException:
            self.close()
            raise

    def _await_sync(self, streams: list[str]) -> None:
        """Read the sync byte the guest writes on each port we write to; fail with the guest's
        reason if the session script ended instead."""
        end = time.monotonic() + SETUP_TIMEOUT
        for stream in streams:
            sock = self._socks[stream]
            while True:
                sock.settimeout(0.05)
                try:
                    got = sock.recv(1)
                except TimeoutError:
                    got = None
                finally:
                    sock.settimeout(None)
                if got:
                    break
                st = self._poll_status()
                if got == b"" or st is not None or time.monotonic() > end:
                    raise VMError(self._setup_failure(st))

    def _setup_failure(self, st: ExecStatus | None) -> str:
        if st is None:
            return f"the guest did not open the session's ports within {SETUP_TIMEOUT:g} s"
        why = st.stderr.decode(errors="replace").strip() or f"exit code {st.shell_exit_code}"
        return f"the guest could not set up the session: {why}"

    def _poll_status(self) -> ExecStatus | None:
        """The command's end, once (the agent forgets a process after reporting its end)."""
        with self._lock:
            if self.status is None and self.pid is not None:
                st = self.agent.exec_status(self.pid)
                if st.exited:
                    self.status = st
            return self.status

    def write(self, data: bytes) -> None:
        """Stdin (blocks while the guest does not read: backpressure)."""
        sock = self._socks.get("in")
        if sock is None or self._stdin_closed:
            raise BrokenPipeError("stdin of the guest session is closed")
        sock.sendall(data)

    def close_stdin(self) -> None:
        """End of file for the guest's reader, after everything written. Only our sending half is
        shut: QEMU's socket chardev drops the connection on a hang-up (both halves closed) at once,
        with what it has not yet handed to the guest (a slow reader's last ~100 KiB: "tar: short
        read"), while a half-close reaches it as an end of file after the last byte. The socket
        itself is closed with the session."""
        sock = self._socks.get("in")
        if sock is not None and not self._stdin_closed:
            self._stdin_closed = True
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    def resize(self, rows: int, cols: int) -> None:
        """A TTY's new window size (ignored without a TTY or once the session ended)."""
        sock = self._socks.get("resize")
        if sock is not None and rows > 0 and cols > 0:
            with contextlib.suppress(OSError):
                sock.sendall(f"{rows} {cols}\n".encode())

    def wait(self, stop: threading.Event | None = None) -> ExecStatus | None:
        """How the command ended, once it did and its outputs drained; None if ``stop`` was set
        first (the caller then closes the session, which kills the command)."""
        stop = stop or threading.Event()
        readers = [r for r in (self.stdout, self.stderr) if r is not None]
        delay = FIRST_POLL
        while (st := self._poll_status()) is None:
            outputs_done = all(r.ended.is_set() for r in readers)
            if stop.wait(FIRST_POLL if outputs_done else delay):
                return None
            delay = min(delay * POLL_GROWTH, LONGEST_POLL)
        end = time.monotonic() + DRAIN_GRACE
        for r in readers:
            r.ended.wait(max(0.0, end - time.monotonic()))
        self._shutdown_outputs()
        return st

    def _shutdown_outputs(self) -> None:
        for stream in ("out", "err"):
            if (sock := self._socks.get(stream)) is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Kill what still runs, close the sockets, unplug the channels (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = self.pid is not None and self.status is None
        if running and self.pid is not None:
            with contextlib.suppress(VMError):
                guest_exec.kill(self.agent, self.pid)
        self._shutdown_outputs()
        for sock in self._socks.values():
            with contextlib.suppress(OSError):
                sock.close()
        self._socks.clear()
        for stream in self._plugged:
            try:
                self.guests.unplug_channel(self.domain, self.port_name(stream))
            except (VMError, AgentError) as e:
                log.warning("session %s of %s: %s", self.id, self.domain, e)
        self._plugged.clear()
