"""`macvtap daemon`: the resident process that keeps pyroute2 and netlink sockets warm for the plugin.

A supervisor pre-forks one worker per CPU (--workers), all accepting on the shared socket (one GIL
each, so a burst of calls uses every core), restarts any worker that dies and stops them all on
SIGTERM. The supervisor itself never starts a thread or imports pyroute2, so forking from it is safe.
With --workers 1 the process serves by itself. The server of each worker is cni_macvtap.server.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading

from . import ipam
from .defaults import DEFAULT_SOCKET
from .server import MAX_CONNECTIONS, REQUEST_TIMEOUT_S, Server, log


def _serve_worker(server: Server) -> None:
    """One worker: warm up, then accept on the shared socket until SIGTERM."""

    def on_signal(signum: int, _frame: object) -> None:
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.warm()
    server.serve()


def _spawn(server: Server) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _serve_worker(server)
        except BaseException as exc:  # a worker must never fall back into the supervisor's loop
            log(f"worker {os.getpid()} failed: {exc!r}")
            code = 1
        finally:
            os._exit(code)
    return pid


def _supervise(server: Server, workers: int) -> None:
    """Keep `workers` worker processes running until SIGTERM, then stop and reap them."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log(f"signal {signum}: stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children = {_spawn(server) for _ in range(workers)}
    log(f"listening on {server.path} (pid {os.getpid()}, workers {sorted(children)})")
    while not stop.is_set():
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid, status = 0, 0
        if pid and pid in children:
            children.discard(pid)
            log(f"worker {pid} exited ({status}); starting a new one")
            children.add(_spawn(server))
        else:
            stop.wait(0.2)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help=f"connections one worker serves at a time; more are handed back to run in-process "
        f"(default {MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=REQUEST_TIMEOUT_S,
        help=f"seconds a request may take to arrive, and a reply to be read (default {REQUEST_TIMEOUT_S:g})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`macvtap daemon [--socket PATH] [--workers N] [--max-connections N] [--request-timeout S]`."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.workers < 1 or args.max_connections < 1 or not args.request_timeout > 0:
        parser.error("--workers and --max-connections must be at least 1, --request-timeout above 0")
    server = Server(args.socket, args.max_connections, args.request_timeout)
    server.bind()
    ipam.IN_PROCESS = os.environ.get("MACVTAP_DAEMON_EXEC_IPAM", "") != "1"
    try:
        if args.workers == 1:
            log(f"listening on {args.socket} (pid {os.getpid()})")
            _serve_worker(server)
        else:
            _supervise(server, args.workers)
    finally:
        server.stop()
    return 0
