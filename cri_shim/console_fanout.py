"""One reader per console pty, any number of attached clients: what ``kubectl attach`` to a VM
shares.

A pty has one byte stream: two readers of it split the guest's output between them, each byte going
to whichever read first. That is what happens when a client re-attaches before the streaming server
has noticed the previous client left (a ``kubectl attach`` killed and started again): the old
session's reader takes a byte or two of the new session's output. So each console is opened once
and read by one pump thread that hands every chunk to each :class:`Tap` attached at that moment,
as containerd fans a container's output out to all its attached clients. Input from any tap goes
to the console.

Bounded: a tap holds at most ``max_behind`` bytes its client has not taken; past that the tap ends
(``ended`` names why) instead of holding more. The console is closed when its last tap closes, and
is only opened again after the old pump closed it, so no stale reader ever competes.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import select
import threading
from collections.abc import Callable

MAX_BEHIND = 1 << 20  # bytes of console output a tap's client may be behind


class Tap:
    """One attached client's view of a shared console: output read since it attached, input to it."""

    def __init__(self, console: _Console, max_behind: int) -> None:
        self._console = console
        self._max_behind = max_behind
        self._chunks: collections.deque[bytes] = collections.deque()
        self._held = 0
        self._cond = threading.Condition()
        self.ended: str | None = None  # why reading ended: "" the console closed (the VM stopped)

    def read(self, timeout: float) -> bytes | None:
        """The output since the last read; None if there was none within ``timeout`` s; b"" once
        the tap ended (see :attr:`ended`)."""
        with self._cond:
            if not self._chunks and self.ended is None:
                self._cond.wait(timeout)
            if self._chunks:
                data = b"".join(self._chunks)
                self._chunks.clear()
                self._held = 0
                return data
            return b"" if self.ended is not None else None

    def write(self, data: bytes, stop: threading.Event) -> None:
        """Write ``data`` to the console, waiting while it does not take more (a console that does
        not read holds the writer back); gives up when ``stop`` is set or the console closed."""
        self._console.write(data, stop)

    def close(self) -> None:
        """Detach: no more output for this tap; the console closes when it was the last."""
        self._console.remove(self)

    def _deliver(self, chunk: bytes) -> None:
        with self._cond:
            if self.ended is not None:
                return
            self._held += len(chunk)
            if self._held > self._max_behind:
                self._chunks.clear()
                self._held = 0
                self.ended = f"the client fell over {self._max_behind} bytes behind the console output"
            else:
                self._chunks.append(chunk)
            self._cond.notify_all()

    def _end(self, why: str) -> None:
        with self._cond:
            if self.ended is None:
                self.ended = why
            self._cond.notify_all()


class _Console:
    """An open console pty, its pump thread and its taps."""

    def __init__(self, path: str, fd: int, lock: threading.Lock) -> None:
        self.path, self.fd, self._lock = path, fd, lock
        self.taps: set[Tap] = set()
        self.closing = False  # decided by the pump, under the lock: no tap joins any more
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.thread = threading.Thread(target=self._pump, name=f"console:{path}", daemon=True)

    def remove(self, tap: Tap) -> None:
        with self._lock:
            if tap not in self.taps:
                return
            self.taps.discard(tap)
            with contextlib.suppress(OSError):  # the pump closes the pipe only after the last tap left
                os.write(self._wake_w, b"x")
        tap._end("detached")

    def write(self, data: bytes, stop: threading.Event) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while data and not stop.is_set() and not self.closing:
            try:
                n = os.write(self.fd, data)
                data = data[n:]
            except BlockingIOError:
                poller.poll(1000)

    def _pump(self) -> None:
        """Read the console and hand each chunk to every tap; after the console ended, wait for the
        taps to leave: the fd stays open while a tap may still write to it (a closed fd's number
        may be another file's by then)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                with self._lock:
                    if not self.taps:
                        self.closing = True
                        return
                events = dict(poller.poll(1000))
                if self._wake_r in events:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                if self.fd not in events or self.closing:
                    continue
                why = ""
                try:
                    chunk = os.read(self.fd, 65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    if e.errno != errno.EIO:  # EIO: the pty's other side (QEMU) is gone
                        why = f"reading the console: {e}"
                    chunk = b""
                with self._lock:
                    taps = list(self.taps)
                    if not chunk:
                        self.closing = True
                        poller.unregister(self.fd)
                for tap in taps:
                    if chunk:
                        tap._deliver(chunk)
                    else:
                        tap._end(why)
        finally:
            for fd in (self.fd, self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)


class ConsoleFanout:
    """The consoles attached to now, by pty path; ``opener`` opens one (non-blocking, read/write)."""

    def __init__(self, opener: Callable[[str], int], max_behind: int = MAX_BEHIND) -> None:
        self._open = opener
        self.max_behind = max_behind
        self._lock = threading.Lock()
        self._consoles: dict[str, _Console] = {}

    def tap(self, path: str) -> Tap:
        """Attach to the console at ``path``, opening it unless already open."""
        with self._lock:
            for p, c in list(self._consoles.items()):
                if c.closing and not c.thread.is_alive():
                    del self._consoles[p]
            console = self._consoles.get(path)
            if console is not None and console.closing:
                # its pump closes the fd once its taps left: only then may it be opened again (a
                # console that ended, the VM stopped, has no output left to compete for)
                console.thread.join(5)
                console = None
            if console is None:
                console = _Console(path, self._open(path), self._lock)
                self._consoles[path] = console
                start = True
            else:
                start = False
            tap = Tap(console, self.max_behind)
            console.taps.add(tap)
        if start:
            console.thread.start()
        return tap

    def open_consoles(self) -> list[str]:
        """The pty paths open now (a console whose pump is closing counts until it closed)."""
        with self._lock:
            return [p for p, c in self._consoles.items() if c.thread.is_alive() or not c.closing]

    def close(self) -> None:
        """Detach every tap (the shim stops)."""
        with self._lock:
            consoles = list(self._consoles.values())
            self._consoles.clear()
        for c in consoles:
            for tap in list(c.taps):
                tap.close()
            if c.thread.is_alive():
                c.thread.join(5)
