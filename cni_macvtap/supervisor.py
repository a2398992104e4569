"""The supervisor of `macvtap daemon`: starts worker processes when calls come and lets them go when
none do, knows which of them are ready, answers the ops endpoint, tells systemd when it is ready and
stops them on SIGTERM.

Workers are started on demand, as php-fpm's ``ondemand`` process manager does (``--workers`` is the
most that run at once, ``--min-workers`` always run): an idle node keeps the supervisor alone. While
no worker runs, the supervisor watches the listening socket itself; a connection there starts a
worker, which accepts it. A worker that gets a second call while one is under way says it is busy,
and the supervisor starts another (up to ``--workers``) for the burst. A worker beyond
``--min-workers`` that served nothing for ``--idle-exit`` seconds says it retires and exits. Each
worker has a slot (0 .. workers-1), which names its metric files, so the files are bounded and a new
worker in a slot continues its predecessor's counts.

It never starts a thread or opens a netlink socket, so forking from it stays safe (it may have
imported the workers' code, see cni_macvtap.daemon.preload_worker_code). Workers write notes to a
pipe the supervisor watches (ready, busy, retiring: a pid and a kind each); a worker that dies
without retiring counts as a restart, and one of the ``--min-workers`` is replaced at once (any other
is started again by the next call). The loop waits on that pipe, the ops socket and (with no worker
running) the listening socket, never longer than ``TICK_S``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .daemon_log import log
from .ops import OpsEndpoint
from .sd_notify import READY, STOPPING, Notifier

TICK_S = 0.2
NOTE = struct.Struct("=iB")  # pid, kind
NOTE_READY, NOTE_BUSY, NOTE_RETIRING = 0, 1, 2


@dataclass
class Census:
    """Workers at most (``configured``) and always (``minimum``), the pids of those ready, and how
    many died without retiring."""

    configured: int
    minimum: int = 0
    ready_pids: set[int] = field(default_factory=set)
    restarts: int = 0

    @property
    def ready(self) -> int:
        return len(self.ready_pids)

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: ready when the workers that always run are (with none, at once: a call starts
        one)."""
        if self.ready >= self.minimum:
            return True, ""
        return False, f"{self.ready} of {self.minimum} workers ready"


class ReadyPipe:
    """Workers write notes here (ready, busy, retiring); the supervisor reads them. A note is 5 bytes,
    written whole (below PIPE_BUF); a worker never blocks on it (a full pipe drops the note: the
    supervisor is behind, and the next note says the same)."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def _note(self, kind: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self.write_fd, NOTE.pack(os.getpid(), kind))

    def announce(self) -> None:
        """In a worker: this process serves."""
        self._note(NOTE_READY)

    def busy(self) -> None:
        """In a worker: a second call arrived while one is under way."""
        self._note(NOTE_BUSY)

    def retiring(self) -> None:
        """In a worker: it stopped accepting and exits (idle)."""
        self._note(NOTE_RETIRING)

    def drain(self) -> list[tuple[int, int]]:
        """In the supervisor: the (pid, kind) notes since the last call."""
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.read_fd, 4096):
                data += chunk
        return [NOTE.unpack_from(data, i) for i in range(0, len(data) - len(data) % NOTE.size, NOTE.size)]

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class Supervisor:
    """Runs between ``census.minimum`` and ``census.configured`` workers made by ``spawn(slot)`` (which
    forks and returns the pid), watching ``listen_fd`` while none runs."""

    def __init__(
        self,
        spawn: Callable[[int], int],
        census: Census,
        pipe: ReadyPipe,
        ops: OpsEndpoint | None,
        notifier: Notifier,
        listen_fd: int,
    ) -> None:
        self._spawn = spawn
        self.census = census
        self._pipe = pipe
        self._ops = ops
        self._notifier = notifier
        self._listen_fd = listen_fd
        self._slots: dict[int, int] = {}  # slot -> pid of its worker
        self._retiring: set[int] = set()
        self._stop = threading.Event()
        self._announced = False

    @property
    def workers(self) -> dict[int, int]:
        """slot -> pid of the workers running."""
        return dict(self._slots)

    def run(self, socket_path: str) -> None:
        """Until SIGTERM/SIGINT: start and reap workers; then stop and reap them."""

        def on_signal(signum: int, _frame: object) -> None:
            log.info("signal %d: stopping", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        for _ in range(self.census.minimum):
            self._start_worker("always running")
        running = sorted(self._slots.values())
        log.info(
            "listening on %s (pid %d, workers %d-%d on demand, running %s)",
            socket_path, os.getpid(), self.census.minimum, self.census.configured, running,
        )  # fmt: skip
        self._announce_when_ready()
        while not self._stop.is_set():
            self._reap()
            self._wait()
        self._notifier.notify(STOPPING)
        self._stop_children()

    def _start_worker(self, why: str) -> None:
        if len(self._slots) >= self.census.configured:
            return
        slot = min(set(range(self.census.configured)) - set(self._slots))
        pid = self._spawn(slot)
        self._slots[slot] = pid
        log.debug("worker %d started in slot %d (%s)", pid, slot, why)

    def _starting(self) -> bool:
        return any(pid not in self.census.ready_pids for pid in self._slots.values())

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            slot = next((s for s, p in self._slots.items() if p == pid), None)
            if slot is None:
                continue
            del self._slots[slot]
            self.census.ready_pids.discard(pid)
            if pid in self._retiring:
                self._retiring.discard(pid)
                log.info("worker %d retired (idle)", pid)
            else:
                self.census.restarts += 1
                log.warning(
                    "worker %d exited (%d); %s", pid, status,
                    "starting a new one" if slot < self.census.minimum else "the next call starts a new one",
                )  # fmt: skip
            if slot < self.census.minimum:
                self._start_worker("replacing one that always runs")

    def _wait(self) -> None:
        fds: list[int] = [self._pipe.read_fd] + ([self._ops.fileno()] if self._ops is not None else [])
        # no worker accepts (none runs, or those left are retiring): a call must start one
        idle = set(self._slots.values()) <= self._retiring and not self._stop.is_set()
        if idle:
            fds.append(self._listen_fd)
        try:
            readable, _, _ = select.select(fds, [], [], TICK_S)
        except InterruptedError:  # a signal: the loop looks at its stop flag
            return
        if self._pipe.read_fd in readable:
            self._read_notes()
        if idle and self._listen_fd in readable:
            self._start_worker("a call came")
        if self._ops is not None and self._ops.fileno() in readable:
            self._ops.handle_one()

    def _read_notes(self) -> None:
        for pid, kind in self._pipe.drain():
            if pid not in self._slots.values():
                continue
            if kind == NOTE_READY:
                self.census.ready_pids.add(pid)
            elif kind == NOTE_BUSY:
                if not self._starting():
                    self._start_worker(f"worker {pid} is busy")
            elif kind == NOTE_RETIRING:
                self._retiring.add(pid)
                self.census.ready_pids.discard(pid)
        self._announce_when_ready()

    def _announce_when_ready(self) -> None:
        if not self._announced and self.census.ready >= self.census.minimum:
            self._announced = True
            log.info("ready (%d of %d workers always running)", self.census.ready, self.census.minimum)
            self._notifier.notify(READY)

    def _stop_children(self) -> None:
        for pid in self._slots.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in self._slots.values():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
