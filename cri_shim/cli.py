"""Command-line entry point of edgevirt-cri:
`edgevirt-cri [--config PATH] [--socket PATH] [--ops-address HOST:PORT] [--log-format text|json]`.

Loads the config, generates the CRI stubs if they are missing, builds the backends, serves until
SIGTERM/SIGINT and removes its socket on the way out. Under systemd (``Type=notify``) it sends
``READY=1`` once it serves and ``STOPPING=1`` when a signal stops it; ``/healthz``, ``/readyz`` and
``/metrics`` are served on the ops address (:mod:`cri_shim.ops_http`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import config as config_mod
from . import logsetup, malloc_arenas, protos
from .ops_http import AddressError, OpsServer, Readiness, parse_address
from .sd_notify import READY, STOPPING, Notifier

if TYPE_CHECKING:  # imported when serving (they load grpc and the stubs)
    import grpc
    from prometheus_client import CollectorRegistry

    from .backends.base import Backend
    from .metrics import CriMetrics
    from .readiness import CriReadiness
    from .router import Router

DEFAULT_OPS_ADDRESS = "127.0.0.1:9641"
log = logging.getLogger("edgevirt-cri")


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="edgevirt-cri", description="CRI runtime.v1 endpoint for runc, kata and kvm pods"
    )
    ap.add_argument("--config", help="YAML config file (default: built-in: containerd at its default socket)")
    ap.add_argument(
        "--socket",
        help=f"unix socket to serve on (overrides the config; default {config_mod.DEFAULT_SOCKET})",
    )
    ap.add_argument("--state-dir", help="where ID -> backend records live (overrides the config)")
    ap.add_argument(
        "--ops-address",
        default=None,
        help=f"HOST:PORT of /healthz, /readyz and /metrics (default {DEFAULT_OPS_ADDRESS}; '' disables). "
        "When the default address is taken edgevirt-cri runs without it; an address given here must bind",
    )
    ap.add_argument("--log-level", default="info", choices=logsetup.LEVELS)
    ap.add_argument(
        "--log-format", default="text", choices=logsetup.FORMATS, help="text or JSON lines (default text)"
    )
    return ap.parse_args(argv)


@dataclass
class Running:
    """What main() started and must stop."""

    server: grpc.Server
    router: Router
    socket: str
    ops: OpsServer | None = None
    readiness: CriReadiness | None = None
    notifier: Notifier = field(default_factory=lambda: Notifier(None))


def _load(args: argparse.Namespace) -> config_mod.Config:
    cfg = config_mod.load(args.config)
    if args.socket:
        cfg.socket = args.socket
    if args.state_dir:
        cfg.state_dir = args.state_dir
    return cfg


def _ops(
    address: tuple[str, int] | None, explicit: bool, registry: CollectorRegistry, readiness: Readiness
) -> OpsServer | None:
    """The ops server, started; None when disabled or when the default address is taken."""
    if address is None:
        return None
    try:
        return OpsServer(address, registry, readiness).start()
    except OSError as e:
        if explicit:
            raise RuntimeError(f"--ops-address {address[0]}:{address[1]}: cannot listen: {e.strerror}") from e
        log.warning(
            "ops endpoint %s:%d not served (%s); pass --ops-address to choose another", *address, e.strerror
        )
        return None


def _observability(
    cfg: config_mod.Config,
    backends: dict[str, Backend],
    handlers: dict[str, str],
    address: tuple[str, int],
    explicit: bool,
) -> tuple[OpsServer | None, CriReadiness, CriMetrics]:
    """The metrics registry, the readiness check and the ops server serving them (None when the
    default address is taken)."""
    from . import metrics
    from .readiness import CriReadiness

    registry = metrics.new_registry()
    cri_metrics = metrics.CriMetrics(registry)
    vm_backends = {n: b for n, b in backends.items() if cfg.backends[n].type != "containerd"}
    registry.register(metrics.VmCollector(vm_backends))
    for backend in vm_backends.values():  # a backend's own metrics (the kvm handler's image store)
        for collector in getattr(backend, "collectors", list)():
            registry.register(collector)
    registry.register(metrics.HandlerCollector(cfg.handlers, handlers))
    readiness = CriReadiness(cfg.socket, backends[handlers[""]])
    return _ops(address, explicit, registry, readiness), readiness, cri_metrics


def _start(cfg: config_mod.Config, ops_address: tuple[str, int] | None, explicit: bool) -> Running:
    from .backends.loader import build
    from .metrics import metered
    from .router import Router
    from .server import serve
    from .state import IdIndex

    backends, handlers, unavailable = build(cfg)
    observe = None
    ops = readiness = None
    try:
        if ops_address is not None:
            ops, readiness, cri_metrics = _observability(cfg, backends, handlers, ops_address, explicit)
            if ops is not None:
                observe = cri_metrics.observe_request
                backends = metered(backends, cri_metrics)
        router = Router(backends, handlers, IdIndex(Path(cfg.state_dir), cfg.fsync), unavailable)
    except BaseException:
        for backend in backends.values():
            backend.close()
        raise
    try:
        server = serve(router, cfg.socket, cfg.socket_mode, cfg.workers, observe)
    except BaseException:
        router.close()
        if ops is not None:
            ops.stop()
        raise
    if readiness is not None:
        readiness.serving = True
    log.info(
        "serving CRI runtime.v1 on unix://%s (config %s); handlers: %s; state in %s%s",
        cfg.socket,
        cfg.source,
        ", ".join(f"{h or '(default)'} -> {b}" for h, b in sorted(handlers.items())),
        cfg.state_dir,
        f"; ops endpoints on {ops.url}" if ops is not None else "",
    )
    for h, why in unavailable.items():
        log.warning("not serving handler %r: %s", h, why)
    return Running(server, router, cfg.socket, ops, readiness)


def _stop(running: Running) -> None:
    running.notifier.notify(STOPPING)
    log.info("stopping")
    if running.readiness is not None:
        running.readiness.stopping = True
    running.server.stop(grace=5).wait()
    running.router.close()
    if running.ops is not None:
        running.ops.stop()
    if running.readiness is not None:
        running.readiness.close()
    Path(running.socket).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CRI server; returns the exit code."""
    args = _arguments(argv)
    logsetup.configure(args.log_level, args.log_format)
    malloc_arenas.cap()  # before any thread starts
    notifier = Notifier.from_environment()
    try:
        cfg = _load(args)
        explicit = args.ops_address is not None
        ops_address = parse_address(DEFAULT_OPS_ADDRESS if args.ops_address is None else args.ops_address)
    except (config_mod.ConfigError, AddressError) as e:
        print(f"edgevirt-cri: config error: {e}", file=sys.stderr)
        return 2
    try:
        protos.api()
    except protos.StubError as e:
        print(f"edgevirt-cri: cannot load the CRI stubs: {e}", file=sys.stderr)
        return 1
    try:
        running = _start(cfg, ops_address, explicit)
    except (RuntimeError, OSError) as e:
        print(f"edgevirt-cri: cannot start: {e}", file=sys.stderr)
        return 1
    running.notifier = notifier
    router = running.router
    threading.Thread(
        target=lambda: log.info("pruned %d stale ID record(s)", router.prune()), daemon=True
    ).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    notifier.notify(READY)
    stop.wait()
    _stop(running)
    return 0


if __name__ == "__main__":
    sys.exit(main())
