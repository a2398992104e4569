"""A VM container's serial console: its CRI log and ``kubectl attach``.

* :class:`ConsoleLogs` runs one :class:`~cri_shim.vm.console_log.ConsoleLogConverter` thread per
  running container, from the raw console file virtlogd writes into the container's CRI log; its
  read offset is kept next to the container's record (``<id>.console``) so a restarted shim neither
  repeats nor loses lines.
* :class:`ConsoleAttach` answers Attach with a URL of the shim's streaming server
  (:mod:`cri_shim.streaming`), which bridges the client to the pty QEMU made for the console, read
  once for all the clients attached to it (:mod:`cri_shim.console_fanout`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..vm.console_log import ConsoleLogConverter
from .records import ContainerRecord

if TYPE_CHECKING:  # the streaming server and the console fan-out are imported on the first Attach
    from ..console_fanout import ConsoleFanout, Tap
    from ..streaming import StreamingServer


class ConsoleLogs:
    """The console-log converters of the running containers; state files under ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._running: dict[str, tuple[ConsoleLogConverter, threading.Event]] = {}
        self._lock = threading.Lock()

    def state_file(self, container_id: str) -> Path:
        return self.state_dir / f"{container_id}.console"

    def start(self, c: ContainerRecord) -> None:
        """Start converting ``c``'s console into its log (no-op when running or without a console)."""
        with self._lock:
            if c.id in self._running or not c.console_source:
                return
            conv = ConsoleLogConverter(
                Path(c.console_source), Path(c.log_path), state_file=self.state_file(c.id)
            )
            _thread, stop = conv.start_thread()
            self._running[c.id] = (conv, stop)

    def stop(self, container_id: str, final: bool = True) -> None:
        """Stop the converter after a last pump (``final``: an unterminated last line is complete)."""
        with self._lock:
            entry = self._running.pop(container_id, None)
        if entry is None:
            return
        conv, stop = entry
        stop.set()
        with contextlib.suppress(Exception):
            conv.pump(final=final)
        conv.close()

    def reopen(self, container_id: str) -> bool:
        """Reopen the CRI log after kubelet rotated it; False when no converter runs."""
        with self._lock:
            entry = self._running.get(container_id)
        if entry is None:
            return False
        entry[0].reopen()
        return True

    def forget(self, container_id: str) -> None:
        """Stop the converter and delete its state file (the container is removed)."""
        self.stop(container_id)
        self.state_file(container_id).unlink(missing_ok=True)

    def close(self) -> None:
        for cid in list(self._running):
            self.stop(cid, final=False)


class ConsoleAttach:
    """Attach URLs of a streaming server started on first use (``address`` = ``host:port``)."""

    def __init__(self, address: str, console_pty: Callable[[str], str]) -> None:
        self.address = address
        self._console_pty = console_pty
        self._server: StreamingServer | None = None
        self._consoles: ConsoleFanout | None = None
        self._lock = threading.Lock()

    @property
    def server(self) -> StreamingServer:
        with self._lock:
            if self._server is None:
                from ..streaming import StreamingServer

                host, _, port = self.address.rpartition(":")
                self._server = StreamingServer(host or "127.0.0.1", int(port or 0))
            return self._server

    @property
    def consoles(self) -> ConsoleFanout:
        """The consoles' readers, shared by every client attached to one (made on first use)."""
        with self._lock:
            if self._consoles is None:
                from ..console_fanout import ConsoleFanout
                from ..streaming import open_pty

                self._consoles = ConsoleFanout(open_pty)
            return self._consoles

    def url(self, domain: str, *, stdin: bool, stdout: bool, stderr: bool, tty: bool) -> str:
        """A one-time URL that bridges the client to ``domain``'s serial console."""

        def open_console() -> Tap:
            return self.consoles.tap(self._console_pty(domain))

        return self.server.attach_url(
            open_console, domain, stdin=stdin, stdout=stdout, stderr=stderr, tty=tty
        )

    def close(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.close()
            consoles, self._consoles = self._consoles, None
        if consoles is not None:
            consoles.close()
