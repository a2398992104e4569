"""`macvtap daemon`: keeps pyroute2 and a netlink socket warm and serves plugin calls over a unix socket.

By default one worker process per CPU accepts on the shared socket (pre-forked by a supervisor that
restarts any worker that dies); inside a worker each connection gets its own thread. Each request
carries its own environment and stdin, so two containers' calls never share state beyond the locked
host netlink socket. Operations on the same attachment are serialised by plugin.run (thread lock plus
a record lock shared by all processes). A request from a process in another network namespace is sent back to
run in-process (the daemon only acts on the namespace it lives in).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import socket
import sys
import threading
import time

from . import ipam, namespaces, plugin, wire
from .client import own_netns
from .defaults import DEFAULT_SOCKET
from .errors import DECODING_FAILURE, CNIError


def _log(msg: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} macvtap-daemon: {msg}\n")
    sys.stderr.flush()


class Daemon:
    """The unix-socket server."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.netns = own_netns()
        self._sock: socket.socket | None = None
        self._stop = threading.Event()

    def bind(self) -> None:
        """Create the socket (mode 0600); refuse when another daemon already answers there."""
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOTSOCK):
                os.unlink(self.path)  # stale socket of a dead daemon
            elif exc.errno != errno.ENOENT:
                raise
        else:
            raise SystemExit(f"macvtap daemon: another daemon is already listening on {self.path}")
        finally:
            probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(128)
        self._sock = sock

    def warm(self) -> None:
        """Import pyroute2 and open the host netlink socket before the first request."""
        namespaces.host_links().default_route_link()

    def serve(self) -> None:
        """Accept until stop() is called."""
        assert self._sock is not None
        self._sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    break
                _log(f"accept failed: {exc}")
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        """Stop serving and remove the socket file (the process that bound it)."""
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                netns, env, stdin = wire.recv_request(conn)
            except (OSError, wire.ProtocolError, UnicodeError) as exc:
                _log(f"bad request: {exc}")
                err = CNIError(DECODING_FAILURE, f"malformed request to the macvtap daemon: {exc}")
                self._reply(conn, 1, err.to_json(), err.msg)
                return
            conn.settimeout(None)
            if netns != self.netns:
                self._reply(conn, wire.FALLBACK, b"", "caller is in another network namespace")
                return
            t0 = time.perf_counter()
            out, code, err_text = plugin.run(env, stdin)
            what = f"{env.get('CNI_COMMAND')} {env.get('CNI_CONTAINERID', '')}/{env.get('CNI_IFNAME', '')}"
            ms = 1000 * (time.perf_counter() - t0)
            if code:
                _log(f"{what} failed (exit {code}) in {ms:.1f} ms: {err_text.strip().splitlines()[-1:]}")
                if "Traceback" in err_text:
                    _log(err_text)  # a bug: keep the traceback in the daemon's log, never on stdout
            else:
                _log(f"{what} ok in {ms:.1f} ms")
            self._reply(conn, code, out, err_text)

    @staticmethod
    def _reply(conn: socket.socket, code: int, out: bytes, err: str) -> None:
        try:
            wire.send_reply(conn, code, out, err)
        except OSError as exc:
            _log(f"client went away before the reply: {exc}")


def _serve_worker(daemon: Daemon) -> None:
    """One worker: warm up, then accept on the shared socket until SIGTERM."""

    def on_signal(signum: int, _frame: object) -> None:
        daemon._stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.warm()
    daemon.serve()


def _supervise(daemon: Daemon, workers: int) -> None:
    """Pre-fork `workers` processes that all accept on the socket (one GIL each, so a burst of calls uses
    every core), restart any that dies, stop them all on SIGTERM. The supervisor itself never starts a
    thread or imports pyroute2, so forking from it is safe."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        _log(f"signal {signum}: stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children: dict[int, int] = {}

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _serve_worker(daemon)
            except BaseException as exc:  # a worker must never fall back into the supervisor's loop
                _log(f"worker {os.getpid()} failed: {exc!r}")
                code = 1
            finally:
                os._exit(code)
        children[pid] = slot

    for slot in range(workers):
        spawn(slot)
    _log(f"listening on {daemon.path} (pid {os.getpid()}, workers {sorted(children)})")
    while not stop.is_set():
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid, status = 0, 0
        if pid and pid in children:
            slot = children.pop(pid)
            _log(f"worker {pid} exited ({status}); starting a new one")
            spawn(slot)
        else:
            stop.wait(0.2)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def main(argv: list[str] | None = None) -> int:
    """`macvtap daemon [--socket PATH] [--workers N]`."""
    parser = argparse.ArgumentParser(prog="macvtap daemon", description="resident macvtap CNI worker")
    parser.add_argument(
        "--socket", default=DEFAULT_SOCKET, help=f"unix socket path (default {DEFAULT_SOCKET})"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes (default: one per CPU); 1 serves from this process",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    daemon = Daemon(args.socket)
    daemon.bind()
    ipam.IN_PROCESS = os.environ.get("MACVTAP_DAEMON_EXEC_IPAM", "") != "1"
    try:
        if args.workers == 1:
            _log(f"listening on {args.socket} (pid {os.getpid()})")
            _serve_worker(daemon)
        else:
            _supervise(daemon, args.workers)
    finally:
        daemon.stop()
    return 0
