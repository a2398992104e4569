"""Command-line entry point of edgevirt-controller (cluster mode and node mode).

``edgevirt-controller --mode cluster`` runs the VM-pod controller behind leader election on a
Lease (one replica acts, the others wait); ``--mode node --node NAME`` runs the per-node part.
SIGTERM/SIGINT stop it cleanly (a leader releases its Lease so a standby takes over at once).
A cluster-mode leader that loses its Lease exits with status 1 rather than act without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from kubernetes import client
from prometheus_client import Gauge, start_http_server

from .kube import api_client

if TYPE_CHECKING:
    from .controller import ClusterController
    from .leader import LeaderElector

log = logging.getLogger("edgevirt-controller")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="edgevirt-controller", description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["cluster", "node"], required=True)
    p.add_argument("--node", help="node name (node mode); default $NODE_NAME")
    p.add_argument("--kubeconfig", help="kubeconfig file; default $KUBECONFIG, ~/.kube/config, in-cluster")
    p.add_argument("--namespace", help="watch only this namespace (default: all)")
    p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "edgevirt-system"))
    p.add_argument("--lease-name", default="edgevirt-controller")
    p.add_argument("--lease-duration", type=int, default=15, help="seconds (default 15)")
    p.add_argument("--renew", type=float, default=5.0, help="lease renew period in seconds (default 5)")
    p.add_argument("--identity", default=f"{socket.gethostname()}_{os.getpid()}")
    p.add_argument(
        "--runtime-class",
        default="kvm",
        help="cluster mode: the VM pods' RuntimeClass (default kvm; the admission policy "
        "edgevirt-controller-vm-pods-only admits no other until it is edited to match)",
    )
    p.add_argument("--workers", type=int, default=2, help="cluster mode: reconcile workers (default 2)")
    p.add_argument("--resync", type=float, default=300.0, help="seconds between full resyncs (default 300)")
    p.add_argument("--state-dir", type=Path, default=None, help="node mode: the libvirt layer's state dir")
    p.add_argument("--libvirt-uri", default="qemu:///system")
    p.add_argument(
        "--metrics-port", type=int, default=0, help="serve Prometheus metrics on this port (0: off)"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("urllib3").setLevel(logging.INFO)
    logging.getLogger("kubernetes").setLevel(logging.INFO)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ac = api_client(args.kubeconfig)
    if args.mode == "node":
        return run_node(args, ac, stop)
    return run_cluster(args, ac, stop)


def run_cluster(args: argparse.Namespace, ac: client.ApiClient, stop: threading.Event) -> int:
    from .controller import ClusterController
    from .leader import LeaderElector

    ctl = ClusterController(
        ac,
        namespace=args.namespace,
        resync=args.resync,
        identity=args.identity,
        runtime_class=args.runtime_class,
    )
    elector = LeaderElector(
        client.CoordinationV1Api(ac),
        args.lease_namespace,
        args.lease_name,
        args.identity,
        lease_duration=args.lease_duration,
        renew=args.renew,
    )
    if args.metrics_port:
        serve_metrics(args.metrics_port, elector, ctl)
    threading.Thread(target=elector.run, args=(stop,), name="leader", daemon=True).start()
    log.info("cluster mode: identity %s, lease %s/%s", args.identity, args.lease_namespace, args.lease_name)
    lost = threading.Event()
    threading.Thread(target=stop_on_lost_lease, args=(elector, stop, lost), daemon=True).start()
    ctl.run(stop, leading=elector.is_leader, workers=max(1, args.workers))
    if lost.is_set():
        log.error("lost leadership: exiting")
        return 1
    elector.release()
    return 0


def serve_metrics(port: int, elector: LeaderElector, ctl: ClusterController) -> None:
    """Prometheus metrics of cluster mode: leadership and the work queue's depth."""
    start_http_server(port)
    Gauge("edgevirt_controller_leader", "1 while this replica leads").set_function(
        lambda: float(elector.is_leader.is_set())
    )
    Gauge("edgevirt_controller_queue_depth", "keys waiting").set_function(lambda: float(len(ctl.queue)))


def stop_on_lost_lease(elector: LeaderElector, stop: threading.Event, lost: threading.Event) -> None:
    """Once leader, set ``lost`` and ``stop`` when leadership ends (a leader must not act without it)."""
    elector.is_leader.wait()
    while not stop.is_set():
        if not elector.is_leader.is_set():
            lost.set()
            stop.set()
            return
        stop.wait(0.5)


def run_node(args: argparse.Namespace, ac: client.ApiClient, stop: threading.Event) -> int:
    from .node import DEFAULT_STATE_DIR, NodeController

    node = args.node or os.environ.get("NODE_NAME")
    if not node:
        print("edgevirt-controller: --mode node needs --node NAME (or $NODE_NAME)", file=sys.stderr)
        return 2
    ctl = NodeController(
        ac,
        node,
        namespace=args.namespace,
        state_dir=args.state_dir or DEFAULT_STATE_DIR,
        libvirt_uri=args.libvirt_uri,
        resync=min(args.resync, 60.0),
    )
    log.info("node mode: node %s, state dir %s", node, ctl.state_dir)
    ctl.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
