"""The supervisor of `macvtap daemon`: keeps ``--workers`` worker processes running, knows which of
them are ready, answers the ops endpoint, tells systemd when all are ready and stops them on SIGTERM.

It never starts a thread or opens a netlink socket, so forking from it stays safe (it may have
imported the workers' code, see cni_macvtap.daemon.preload_worker_code). A worker reports that
it is warm and serving by writing its pid to a pipe the supervisor watches; a worker that dies is
replaced and stops counting as ready. The loop waits on that pipe and on the ops socket, never
longer than ``TICK_S``, so a dead worker is replaced within that time.
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
PID = struct.Struct("=i")


@dataclass
class Census:
    """Workers configured, the pids of those ready, and how many were replaced."""

    configured: int
    ready_pids: set[int] = field(default_factory=set)
    restarts: int = 0

    @property
    def ready(self) -> int:
        return len(self.ready_pids)

    def readiness(self) -> tuple[bool, str]:
        """For /readyz: ready when every configured worker is."""
        if self.ready >= self.configured:
            return True, ""
        return False, f"{self.ready} of {self.configured} workers ready"


class ReadyPipe:
    """Workers write their pid here once they serve; the supervisor reads them."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)

    def announce(self) -> None:
        """In a worker: this process is ready."""
        os.write(self.write_fd, PID.pack(os.getpid()))

    def drain(self) -> list[int]:
        """In the supervisor: the pids announced since the last call."""
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.read_fd, 4096):
                data += chunk
        return [PID.unpack_from(data, i)[0] for i in range(0, len(data) - len(data) % PID.size, PID.size)]

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class Supervisor:
    """Runs ``census.configured`` workers made by ``spawn()`` (which forks and returns the pid)."""

    def __init__(
        self,
        spawn: Callable[[], int],
        census: Census,
        pipe: ReadyPipe,
        ops: OpsEndpoint | None,
        notifier: Notifier,
    ) -> None:
        self._spawn = spawn
        self.census = census
        self._pipe = pipe
        self._ops = ops
        self._notifier = notifier
        self._children: set[int] = set()
        self._stop = threading.Event()
        self._announced = False

    def run(self, socket_path: str) -> None:
        """Until SIGTERM/SIGINT: keep the workers running; then stop and reap them."""

        def on_signal(signum: int, _frame: object) -> None:
            log.info("signal %d: stopping", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self._children = {self._spawn() for _ in range(self.census.configured)}
        log.info("listening on %s (pid %d, workers %s)", socket_path, os.getpid(), sorted(self._children))
        while not self._stop.is_set():
            self._reap()
            self._wait()
        self._notifier.notify(STOPPING)
        self._stop_children()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            if pid in self._children:
                self._children.discard(pid)
                self.census.ready_pids.discard(pid)
                self.census.restarts += 1
                log.warning("worker %d exited (%d); starting a new one", pid, status)
                self._children.add(self._spawn())

    def _wait(self) -> None:
        fds: list[int] = [self._pipe.read_fd] + ([self._ops.fileno()] if self._ops is not None else [])
        readable, _, _ = select.select(fds, [], [], TICK_S)
        if self._pipe.read_fd in readable:
            self.census.ready_pids.update(p for p in self._pipe.drain() if p in self._children)
            if not self._announced and self.census.ready >= self.census.configured:
                self._announced = True
                log.info("all %d workers ready", self.census.configured)
                self._notifier.notify(READY)
        if self._ops is not None and self._ops.fileno() in readable:
            self._ops.handle_one()

    def _stop_children(self) -> None:
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in self._children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
