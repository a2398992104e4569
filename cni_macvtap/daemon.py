"""`macvtap daemon`: the resident process that keeps pyroute2 and netlink sockets warm for the plugin.

A supervisor (cni_macvtap.supervisor) forks workers on demand, up to one per CPU (--workers), all
accepting on the shared socket (one GIL each, so a burst of calls uses every core); a worker idle for
--idle-exit seconds exits, so an idle node keeps the supervisor alone (--min-workers keep some
running); SIGTERM stops them all. The supervisor itself never starts a thread or opens a netlink socket, so
forking from it is safe. It does import what the workers run (pyroute2 and the verbs' modules, which
start no thread and open nothing) and freezes those objects out of the garbage collector before the
first fork (:func:`preload_worker_code`): the workers then share those pages with it instead of each
holding its own copy (supervisor + 2 workers: 53 -> 38 MiB PSS), and only pyroute2's IPRoute, not
every pyroute2 API (cni_macvtap.package_init: 40 -> 33 MiB PSS idle). With --workers 1 the process serves
by itself. The server of each worker is cni_macvtap.server.

Operations: ``/healthz``, ``/readyz`` and ``/metrics`` on --ops-address (cni_macvtap.ops,
cni_macvtap.metrics); ``READY=1`` / ``STOPPING=1`` to systemd (cni_macvtap.sd_notify); --log-level
and --log-format (cni_macvtap.daemon_log).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

from . import daemon_log, ipam
from .daemon_log import log
from .defaults import DEFAULT_SOCKET
from .ops import OpsEndpoint, parse_address
from .sd_notify import READY, STOPPING, Notifier
from .server import MAX_CONNECTIONS, REQUEST_TIMEOUT_S, Server
from .supervisor import Census, ReadyPipe, Supervisor

DEFAULT_OPS_ADDRESS = "127.0.0.1:9642"
#: a worker started on demand exits after this many seconds without a call: longer than the gaps
#: within a burst of pod starts, short enough that a node at rest soon holds the supervisor alone
IDLE_EXIT_S = 60.0


def _serve_worker(server: Server, pipe: ReadyPipe | None, with_metrics: bool, slot: int) -> None:
    """One worker: warm up, say so, then accept on the shared socket until SIGTERM or, when started
    on demand, until it has been idle for ``server.idle_exit`` (then it says it retires)."""

    def on_signal(signum: int, _frame: object) -> None:
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.warm()
    if with_metrics:
        from .metrics import RequestMetrics  # after the fork

        server.metrics = RequestMetrics(slot)  # its files are the slot's: a later worker there continues them
    if pipe is not None:
        server.on_busy = pipe.busy
        pipe.announce()
    if server.serve() and pipe is not None:
        pipe.retiring()


def preload_worker_code() -> None:
    """Import the workers' code in the supervisor, then ``gc.freeze()`` it: forked workers share those
    pages copy-on-write (a collection would otherwise touch every object and copy the page). Nothing
    imported here starts a thread or opens a socket, so forking stays safe."""
    import gc

    # links: pyroute2's IPRoute, without the rest of pyroute2 (cni_macvtap.package_init)
    from . import add, check, hostlocal, links, plugin, release  # noqa: F401

    gc.collect()
    gc.freeze()


def _spawner(
    server: Server,
    pipe: ReadyPipe,
    ops: OpsEndpoint | None,
    with_metrics: bool,
    minimum: int,
    idle_exit: float,
) -> Callable[[int], int]:
    def spawn(slot: int) -> int:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if ops is not None:
                    os.close(ops.fileno())  # the supervisor's socket, not the worker's
                if slot >= minimum:
                    server.idle_exit = idle_exit
                _serve_worker(server, pipe, with_metrics, slot)
            except BaseException as exc:  # a worker must never fall back into the supervisor's loop
                log.error("worker %d failed: %r", os.getpid(), exc)
                code = 1
            finally:
                os._exit(code)
        return pid

    return spawn


def _serve_alone(server: Server, census: Census, ops: OpsEndpoint | None, notifier: Notifier) -> None:
    """--workers 1: this process serves; the ops endpoint runs in a thread."""

    def on_signal(signum: int, _frame: object) -> None:
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("listening on %s (pid %d)", server.path, os.getpid())
    server.warm()
    if ops is not None:
        from .metrics import RequestMetrics

        server.metrics = RequestMetrics(0)
        ops.serve_in_thread()
    census.ready_pids.add(os.getpid())
    notifier.notify(READY)
    server.serve()
    notifier.notify(STOPPING)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="macvtap daemon", description="resident macvtap CNI worker")
    parser.add_argument(
        "--socket", default=DEFAULT_SOCKET, help=f"unix socket path (default {DEFAULT_SOCKET})"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes at most, started as calls come (default: one per CPU); 1 serves from "
        "this process",
    )
    parser.add_argument(
        "--min-workers",
        type=int,
        default=0,
        help="worker processes that always run (default 0: an idle daemon is its supervisor alone, and "
        "the first call after an idle spell waits for a worker to start, a few milliseconds)",
    )
    parser.add_argument(
        "--idle-exit",
        type=float,
        default=IDLE_EXIT_S,
        help=f"seconds without a call after which a worker beyond --min-workers exits "
        f"(default {IDLE_EXIT_S:g})",
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
    parser.add_argument(
        "--ops-address",
        default=None,
        help=f"HOST:PORT of /healthz, /readyz and /metrics (default {DEFAULT_OPS_ADDRESS}; '' disables). "
        "When the default address is taken the daemon runs without it; an address given here must bind",
    )
    parser.add_argument(
        "--host-root",
        default="",
        help="where the node's root is mounted when the daemon runs in a container (e.g. /host): "
        "CNI_PATH's directories and their symlinks are the node's, looked up under it (default: none)",
    )
    parser.add_argument("--log-level", default="info", choices=daemon_log.LEVELS)
    parser.add_argument("--log-format", default="text", choices=daemon_log.FORMATS)
    return parser


def _open_ops(args: argparse.Namespace, census: Census) -> tuple[OpsEndpoint | None, str | None]:
    """(the bound ops endpoint, its metrics dir), or (None, None) when disabled or the default
    address is taken. SystemExit when an address given with --ops-address cannot be had."""
    address = parse_address(DEFAULT_OPS_ADDRESS if args.ops_address is None else args.ops_address)
    if address is None:
        return None, None
    from . import metrics_files

    path = metrics_files.metrics_dir(args.socket)
    metrics_files.enable(path)  # before prometheus_client is imported (by cni_macvtap.metrics, below)
    from .metrics import exposition_registry

    try:
        return OpsEndpoint(address, exposition_registry(path, census), census.readiness), path
    except OSError as e:
        metrics_files.disable(path)
        if args.ops_address is not None:
            raise SystemExit(
                f"macvtap daemon: --ops-address {args.ops_address}: cannot listen: {e.strerror}"
            ) from None
        log.warning("ops endpoint %s not served (%s); pass --ops-address to pick one", address, e.strerror)
        return None, None


def main(argv: list[str] | None = None) -> int:
    """`macvtap daemon [--socket PATH] [--workers N] [--min-workers N] [--idle-exit S] [--max-connections N]
    [--request-timeout S]
    [--ops-address HOST:PORT] [--host-root DIR] [--log-level L] [--log-format text|json]`."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.workers < 1 or args.max_connections < 1 or not args.request_timeout > 0:
        parser.error("--workers and --max-connections must be at least 1, --request-timeout above 0")
    if not 0 <= args.min_workers <= args.workers:
        parser.error(f"--min-workers {args.min_workers}: must be between 0 and --workers ({args.workers})")
    if not args.idle_exit > 0:
        parser.error(f"--idle-exit {args.idle_exit:g}: must be above 0 seconds")
    try:
        parse_address(args.ops_address or "")
    except ValueError as e:
        parser.error(str(e))
    if args.host_root and not (args.host_root.startswith("/") and os.path.isdir(args.host_root)):
        parser.error(
            f"--host-root {args.host_root}: not an absolute path of a directory; mount the node's root there"
        )
    daemon_log.configure(args.log_level, args.log_format, sys.stderr)
    notifier = Notifier.from_environment()
    server = Server(args.socket, args.max_connections, args.request_timeout)
    server.bind()
    ipam.IN_PROCESS = os.environ.get("MACVTAP_DAEMON_EXEC_IPAM", "") != "1"
    ipam.HOST_ROOT = args.host_root.rstrip("/")
    census = Census(configured=args.workers, minimum=1 if args.workers == 1 else args.min_workers)
    ops, metrics_path = None, None
    try:
        ops, metrics_path = _open_ops(args, census)
        if ops is not None:
            log.info("ops endpoints on http://%s:%d", *ops.address)
        if args.workers == 1:
            _serve_alone(server, census, ops, notifier)
        else:
            if os.environ.get("MACVTAP_DAEMON_NO_PRELOAD", "") != "1":  # "1": for the bench's A/B only
                preload_worker_code()
            pipe = ReadyPipe()
            spawn = _spawner(server, pipe, ops, ops is not None, args.min_workers, args.idle_exit)
            Supervisor(spawn, census, pipe, ops, notifier, server.fileno()).run(args.socket)
            pipe.close()
    finally:
        server.stop()
        if ops is not None:
            ops.close()
        if metrics_path is not None:
            from .metrics_files import disable

            disable(metrics_path)
    return 0
