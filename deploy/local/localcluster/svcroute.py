"""The route to the API server from pods: the local cluster's stand-in for kube-proxy.

Pods reach the API server through the ``kubernetes`` Service: kubelet gives every container
``KUBERNETES_SERVICE_HOST=10.96.0.1`` and ``KUBERNETES_SERVICE_PORT=443``, which in-cluster clients
(edgevirt-controller's Deployment and DaemonSet among them) dial. This cluster runs no kube-proxy,
and its API server listens on 127.0.0.1:6443 only, so this Setup makes that one Service work:

* nat chain ``EDGEVIRT-LOCAL-SVC``, jumped to from PREROUTING (pods on the bridge) and OUTPUT
  (host-network pods and the host): 10.96.0.1:443/tcp -> DNAT 127.0.0.1:6443;
* the pod bridge ``edgevirt0`` is made up front (the CNI bridge plugin takes a bridge that exists)
  with ``route_localnet=1``, without which the kernel drops packets from it to 127.0.0.1;
* filter chain ``EDGEVIRT-LOCAL-SVC-FW`` in INPUT drops what else would now reach loopback from the
  bridge (only DNAT'd connections may), as kube-proxy does for its localhost node ports.

The API server's certificate names 10.96.0.1, so clients verify it as on any cluster. ``down``
removes the chains (and the bridge with its setting).
"""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

from .paths import APISERVER_PORT, POD_BRIDGE, SERVICE_CIDR, Paths

SERVICE_IP = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))  # the `kubernetes` Service
SERVICE_PORT = 443
TARGET = f"127.0.0.1:{APISERVER_PORT}"
NAT_CHAIN = "EDGEVIRT-LOCAL-SVC"
FW_CHAIN = "EDGEVIRT-LOCAL-SVC-FW"
COMMENT = "edgevirt local cluster: the kubernetes Service"
ROUTE_LOCALNET = Path(f"/proc/sys/net/ipv4/conf/{POD_BRIDGE}/route_localnet")


class RouteError(RuntimeError):
    """The route cannot be made; the message names the command that failed."""


def rules() -> list[tuple[str, str, list[str]]]:
    """(table, chain, rule) of every rule this Setup owns, jumps first."""
    jump = ["-m", "comment", "--comment", COMMENT, "-j"]
    dnat = ["-d", f"{SERVICE_IP}/32", "-p", "tcp", "--dport", str(SERVICE_PORT)]
    return [
        ("nat", "PREROUTING", [*jump, NAT_CHAIN]),
        ("nat", "OUTPUT", [*jump, NAT_CHAIN]),
        ("filter", "INPUT", [*jump, FW_CHAIN]),
        ("nat", NAT_CHAIN, [*dnat, "-j", "DNAT", "--to-destination", TARGET]),
        (
            "filter",
            FW_CHAIN,
            ["-i", POD_BRIDGE, "-d", "127.0.0.0/8", "-m", "conntrack", "!", "--ctstate",
             "RELATED,ESTABLISHED,DNAT", "-j", "DROP"],
        ),
    ]  # fmt: skip


def _iptables(table: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["iptables", "-w", "-t", table, *args]
    res = subprocess.run(argv, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RouteError(f"`{' '.join(argv)}` failed: {res.stderr.strip()}")
    return res


def _has_chain(table: str, chain: str) -> bool:
    return _iptables(table, "-S", chain, check=False).returncode == 0


def _has_rule(table: str, chain: str, rule: list[str]) -> bool:
    return _iptables(table, "-C", chain, *rule, check=False).returncode == 0


def _bridge() -> bool:
    return subprocess.run(["ip", "link", "show", POD_BRIDGE], capture_output=True).returncode == 0


def ensure(paths: Paths | None = None) -> str:
    """Make the route (idempotent); what was done, for ``up`` to print."""
    did = []
    if not _bridge():
        res = subprocess.run(
            ["ip", "link", "add", POD_BRIDGE, "type", "bridge"], capture_output=True, text=True
        )
        if res.returncode != 0:
            raise RouteError(f"`ip link add {POD_BRIDGE} type bridge` failed: {res.stderr.strip()}")
        did.append(f"bridge {POD_BRIDGE}")
    if ROUTE_LOCALNET.read_text().strip() != "1":
        ROUTE_LOCALNET.write_text("1\n")
        did.append(f"route_localnet on {POD_BRIDGE}")
    for table, chain in (("nat", NAT_CHAIN), ("filter", FW_CHAIN)):
        if not _has_chain(table, chain):
            _iptables(table, "-N", chain)
    for table, chain, rule in reversed(rules()):  # chains filled before the jumps to them
        if not _has_rule(table, chain, rule):
            _iptables(table, "-I" if chain in ("PREROUTING", "OUTPUT", "INPUT") else "-A", chain, *rule)
            did.append(f"{table}/{chain} rule")
    return f"{describe()}" + (f"; made {', '.join(did)}" if did else "")


def describe(paths: Paths | None = None) -> str | None:
    """The route when it is complete, else None."""
    complete = (
        _bridge()
        and ROUTE_LOCALNET.exists()
        and ROUTE_LOCALNET.read_text().strip() == "1"
        and all(_has_rule(table, chain, rule) for table, chain, rule in rules())
    )
    return f"{SERVICE_IP}:{SERVICE_PORT} -> {TARGET}" if complete else None


def remove(paths: Paths | None = None) -> list[str]:
    """Remove the rules and chains, and route_localnet from the bridge (which goes with the pod
    network)."""
    removed = []
    if ROUTE_LOCALNET.exists() and ROUTE_LOCALNET.read_text().strip() != "0":
        ROUTE_LOCALNET.write_text("0\n")
        removed.append(f"route_localnet on {POD_BRIDGE}")
    for table, chain, rule in rules()[:3]:
        while _has_rule(table, chain, rule):
            _iptables(table, "-D", chain, *rule)
    for table, chain in (("nat", NAT_CHAIN), ("filter", FW_CHAIN)):
        if _has_chain(table, chain):
            _iptables(table, "-F", chain)
            _iptables(table, "-X", chain)
            removed.append(f"iptables {table}/{chain}")
    return removed


def leftovers(paths: Paths | None = None) -> list[str]:
    return [f"iptables {t}/{c}" for t, c in (("nat", NAT_CHAIN), ("filter", FW_CHAIN)) if _has_chain(t, c)]
