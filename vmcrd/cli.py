"""Command-line entry point of edgevirt-controller (cluster mode and node mode).

``edgevirt-controller --mode cluster`` runs the VM-pod controller behind leader election on a
Lease (one replica acts, the others wait); ``--mode node --node NAME`` runs the per-node part.
SIGTERM/SIGINT stop it cleanly (a leader releases its Lease so a standby takes over at once).
A cluster-mode leader that loses its Lease exits with status 1 rather than act without it.
``/healthz``, ``/readyz`` and ``/metrics`` are served on ``--ops-address`` (:mod:`vmcrd.ops`);
logs go to stderr as text or JSON lines (``--log-format``, :mod:`cri_shim.logsetup`).
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

from cri_shim import logsetup
from cri_shim.ops_http import AddressError, OpsServer, parse_address

from . import ops

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .leader import LeaderElector

log = logging.getLogger("edgevirt-controller")

#: Where /healthz, /readyz and /metrics are served unless --ops-address says otherwise. Cluster
#: mode runs in a pod of its own: every address of the pod, so kubelet's probes and Prometheus
#: reach it. Node mode shares the node's network (hostNetwork): loopback, like the node's daemons.
DEFAULT_OPS_ADDRESS = {"cluster": "0.0.0.0:9643", "node": "127.0.0.1:9644"}


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
        "--containerd-socket",
        type=Path,
        default=None,
        help="node mode: containerd's socket, where hot-plugged OCI image volumes come from "
        "(default /run/containerd/containerd.sock)",
    )
    p.add_argument(
        "--containerd-root",
        type=Path,
        default=None,
        help="node mode: containerd's root, whose content store holds the image layers "
        "(default /var/lib/containerd)",
    )
    p.add_argument(
        "--ops-address",
        default=None,
        help="HOST:PORT of /healthz, /readyz and /metrics (default: cluster mode "
        f"{DEFAULT_OPS_ADDRESS['cluster']}, node mode {DEFAULT_OPS_ADDRESS['node']}; '' disables). "
        "When the default address is taken the controller runs without it; an address given here must bind",
    )
    p.add_argument("--log-level", default="info", choices=logsetup.LEVELS)
    p.add_argument(
        "--log-format", default="text", choices=logsetup.FORMATS, help="text or JSON lines (default text)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="the same as --log-level debug")
    return p.parse_args(argv)


def configure_logging(args: argparse.Namespace) -> None:
    """Logs at --log-level in --log-format; the HTTP client's own debug lines only when they say more
    than ours would (they name every request)."""
    level = "debug" if args.verbose else args.log_level
    logsetup.configure(level, args.log_format)
    quiet = max(logging.INFO, logging.getLogger().level)
    for noisy in ("urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(quiet)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args)
    explicit = args.ops_address is not None
    try:
        args.ops = parse_address(args.ops_address if explicit else DEFAULT_OPS_ADDRESS[args.mode])
    except AddressError as e:
        print(f"edgevirt-controller: {e}", file=sys.stderr)
        return 2
    args.ops_explicit = explicit
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if args.mode == "node":
            return run_node(args, stop)
        return run_cluster(args, stop)
    except ops.OpsUnavailable as e:
        print(f"edgevirt-controller: {e}", file=sys.stderr)
        return 1


def start_ops(
    args: argparse.Namespace, registry: CollectorRegistry, readiness: ops.Readiness
) -> OpsServer | None:
    server = ops.serve(args.ops, args.ops_explicit, registry, readiness)
    if server is not None:
        log.info("ops endpoints (/healthz /readyz /metrics) on %s", server.url)
    return server


def stop_ops(server: OpsServer | None, readiness: ops.Readiness) -> None:
    readiness.stopping = True
    if server is not None:
        server.stop()


def run_cluster(args: argparse.Namespace, stop: threading.Event) -> int:
    """Cluster mode, on the kubernetes client (its generated API classes: pods, the Lease)."""
    from kubernetes import client

    from .controller import ClusterController
    from .kube import api_client
    from .leader import LeaderElector

    ac = api_client(args.kubeconfig)
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
    registry, readiness = ops.instrument("cluster", ctl.runner, is_leader=elector.is_leader)
    server = start_ops(args, registry, readiness)
    threading.Thread(target=elector.run, args=(stop,), name="leader", daemon=True).start()
    log.info("cluster mode: identity %s, lease %s/%s", args.identity, args.lease_namespace, args.lease_name)
    lost = threading.Event()
    threading.Thread(target=stop_on_lost_lease, args=(elector, stop, lost), daemon=True).start()
    try:
        ctl.run(stop, leading=elector.is_leader, workers=max(1, args.workers))
    finally:
        stop_ops(server, readiness)
    if lost.is_set():
        log.error("lost leadership: exiting")
        return 1
    elector.release()
    return 0


def stop_on_lost_lease(elector: LeaderElector, stop: threading.Event, lost: threading.Event) -> None:
    """Once leader, set ``lost`` and ``stop`` when leadership ends (a leader must not act without it)."""
    elector.is_leader.wait()
    while not stop.is_set():
        if not elector.is_leader.is_set():
            lost.set()
            stop.set()
            return
        stop.wait(0.5)


def run_node(args: argparse.Namespace, stop: threading.Event) -> int:
    """Node mode, on the thin client of :mod:`cri_shim.kube_http`: it never imports the kubernetes
    client (~30 MiB of resident memory on every node)."""
    from cri_shim.kube_http import KubeConfigError, client_from_config

    from .node import DEFAULT_STATE_DIR, NodeController

    node = args.node or os.environ.get("NODE_NAME")
    if not node:
        print("edgevirt-controller: --mode node needs --node NAME (or $NODE_NAME)", file=sys.stderr)
        return 2
    try:
        kube = client_from_config(args.kubeconfig)
    except KubeConfigError as e:
        print(f"edgevirt-controller: {e}", file=sys.stderr)
        return 2
    ctl = NodeController(
        kube,
        node,
        namespace=args.namespace,
        state_dir=args.state_dir or DEFAULT_STATE_DIR,
        libvirt_uri=args.libvirt_uri,
        resync=min(args.resync, 60.0),
        containerd_socket=args.containerd_socket,
        containerd_root=args.containerd_root,
    )
    registry, readiness = ops.instrument("node", ctl.runner, vm_filter=ctl.mine)
    server = start_ops(args, registry, readiness)
    log.info("node mode: node %s, state dir %s", node, ctl.state_dir)
    try:
        ctl.run(stop)
    finally:
        stop_ops(server, readiness)
    return 0


if __name__ == "__main__":
    sys.exit(main())
