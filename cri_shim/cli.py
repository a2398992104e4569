"""Command-line entry point of edgevirt-cri: `edgevirt-cri [--config PATH] [--socket PATH]`.

Loads the config, generates the CRI stubs if they are missing, builds the backends, serves until
SIGTERM/SIGINT and removes its socket on the way out."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from . import config as config_mod
from . import protos


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
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the CRI server; returns the exit code."""
    args = _arguments(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("edgevirt-cri")
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        print(f"edgevirt-cri: config error: {e}", file=sys.stderr)
        return 2
    if args.socket:
        cfg.socket = args.socket
    if args.state_dir:
        cfg.state_dir = args.state_dir
    try:
        protos.api()
    except protos.StubError as e:
        print(f"edgevirt-cri: cannot load the CRI stubs: {e}", file=sys.stderr)
        return 1
    from .backends.loader import build
    from .router import Router
    from .server import serve
    from .state import IdIndex

    try:
        backends, handlers, unavailable = build(cfg)
        router = Router(backends, handlers, IdIndex(Path(cfg.state_dir), cfg.fsync), unavailable)
        server = serve(router, cfg.socket, cfg.socket_mode, cfg.workers)
    except (RuntimeError, OSError) as e:
        print(f"edgevirt-cri: cannot start: {e}", file=sys.stderr)
        return 1
    log.info(
        "serving CRI runtime.v1 on unix://%s (config %s); handlers: %s; state in %s",
        cfg.socket,
        cfg.source,
        ", ".join(f"{h or '(default)'} -> {b}" for h, b in sorted(handlers.items())),
        cfg.state_dir,
    )
    for h, why in unavailable.items():
        log.warning("not serving handler %r: %s", h, why)
    threading.Thread(
        target=lambda: log.info("pruned %d stale ID record(s)", router.prune()), daemon=True
    ).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    server.stop(grace=5).wait()
    router.close()
    Path(cfg.socket).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
