"""The VM network of the local cluster: kvm pods get a macvtap NIC whose master is VM_MASTER (evvm0),
one end of a veth pair; the other end is VM_LAN_IF (eth0) inside the netns VM_LAN_NETNS
(edgevirt-vmnet), which plays the node's LAN and the VMs' gateway: a bridge LAN_BRIDGE (lan0) there
holds the gateway address (10.245.0.1/24) and the nodes' ports (eth0 for node 1, eth1 for node 2's
master, added by secondnode.py), so VMs on both nodes share one LAN. Host to guest
over the master itself does not work with macvtap, so tests reach VMs from that netns:
`ip netns exec edgevirt-vmnet ping 10.245.0.x`.

Only the link and netns named here are ever touched: a link VM_MASTER that is not our veth (peer
VM_LAN_IF in VM_LAN_NETNS) is an error, never replaced.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .paths import VM_CIDR, VM_GATEWAY, VM_LAN_IF, VM_LAN_NETNS, VM_MASTER

NETNS_DIR = Path("/run/netns")
LAN_BRIDGE = "lan0"
GATEWAY_CIDR = f"{VM_GATEWAY}/{VM_CIDR.split('/')[1]}"


class VMNetError(RuntimeError):
    """The VM network cannot be made; the message names what is in the way."""


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    res = subprocess.run(argv, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise VMNetError(f"`{' '.join(argv)}` failed: {res.stderr.strip()}")
    return res


def _link(name: str, netns: str | None = None) -> dict | None:
    """`ip -d -j link show NAME` as a dict, None when there is no such link."""
    res = _ip("-d", "-j", "link", "show", "dev", name, netns=netns, check=False)
    if res.returncode != 0:
        return None
    try:
        links = json.loads(res.stdout)
    except ValueError:
        return None
    return links[0] if links else None


def _kind(link: dict) -> str | None:
    return (link.get("linkinfo") or {}).get("info_kind")


def netns_exists() -> bool:
    """The netns is there and usable (a file under /run/netns whose mount is gone is not)."""
    if not (NETNS_DIR / VM_LAN_NETNS).exists():
        return False
    return _ip("link", "show", "lo", netns=VM_LAN_NETNS, check=False).returncode == 0


def master_exists() -> bool:
    return _link(VM_MASTER) is not None


def _is_ours(master: dict) -> bool:
    """VM_MASTER is a veth whose peer is VM_LAN_IF in VM_LAN_NETNS."""
    if _kind(master) != "veth" or not netns_exists():
        return False
    peer = _link(VM_LAN_IF, netns=VM_LAN_NETNS)
    return bool(peer) and _kind(peer) == "veth" and peer.get("ifindex") == master.get("link_index")


def _remove_netns() -> None:
    if _ip("netns", "delete", VM_LAN_NETNS, check=False).returncode != 0:
        # A netns file whose mount is already gone: remove the empty file.
        subprocess.run(["umount", "-l", str(NETNS_DIR / VM_LAN_NETNS)], capture_output=True)
        (NETNS_DIR / VM_LAN_NETNS).unlink(missing_ok=True)


def ensure() -> str:
    """Make (or complete) the VM network; idempotent. Returns what it did, for `up` to print."""
    did = []
    master = _link(VM_MASTER)
    if master is not None and not _is_ours(master):
        raise VMNetError(
            f"link {VM_MASTER} exists and is not the cluster's ({_kind(master) or 'device'}, not a veth "
            f"paired with {VM_LAN_IF} in netns {VM_LAN_NETNS}): remove or rename it "
            f"(ip link delete {VM_MASTER}) and run up again"
        )
    if (NETNS_DIR / VM_LAN_NETNS).exists() and not netns_exists():
        _remove_netns()  # a stale netns file (its mount is gone): unusable, and ours by name
    if not netns_exists():
        _ip("netns", "add", VM_LAN_NETNS)
        did.append(f"netns {VM_LAN_NETNS}")
    if master is None:
        if _link(VM_LAN_IF, netns=VM_LAN_NETNS) is not None:  # half of an earlier attempt
            _ip("link", "delete", VM_LAN_IF, netns=VM_LAN_NETNS)
        _ip("link", "add", VM_MASTER, "type", "veth", "peer", "name", VM_LAN_IF, "netns", VM_LAN_NETNS)
        did.append(f"veth {VM_MASTER} <-> {VM_LAN_NETNS}/{VM_LAN_IF}")
    _ip("link", "set", "lo", "up", netns=VM_LAN_NETNS)
    if _link(LAN_BRIDGE, netns=VM_LAN_NETNS) is None:
        _ip("link", "add", LAN_BRIDGE, "type", "bridge", netns=VM_LAN_NETNS)
        did.append(f"bridge {VM_LAN_NETNS}/{LAN_BRIDGE}")
    # an earlier layout kept the gateway on the port itself: it moves to the bridge
    _ip("addr", "flush", "dev", VM_LAN_IF, netns=VM_LAN_NETNS)
    attach_port(VM_LAN_IF)
    _ip("addr", "replace", GATEWAY_CIDR, "dev", LAN_BRIDGE, netns=VM_LAN_NETNS)
    _ip("link", "set", LAN_BRIDGE, "up", netns=VM_LAN_NETNS)
    _ip("link", "set", VM_MASTER, "up")
    where = f"{VM_MASTER} <-> {VM_LAN_NETNS}/{VM_LAN_IF} in {LAN_BRIDGE} {GATEWAY_CIDR}"
    return f"made {', '.join(did)} ({where})" if did else f"already set up ({where})"


def attach_port(ifname: str) -> None:
    """Put the LAN netns' link `ifname` (a node's port) into the LAN bridge and up."""
    _ip("link", "set", ifname, "master", LAN_BRIDGE, netns=VM_LAN_NETNS)
    _ip("link", "set", ifname, "up", netns=VM_LAN_NETNS)


def describe() -> str | None:
    """One line for `status` when the network is complete, else None."""
    master = _link(VM_MASTER)
    if master is None or not _is_ours(master) or "UP" not in master.get("flags", []):
        return None
    addrs = _ip("-j", "addr", "show", "dev", LAN_BRIDGE, netns=VM_LAN_NETNS, check=False).stdout
    try:
        info = json.loads(addrs)[0]
    except (ValueError, IndexError):
        return None
    have = {f"{a['local']}/{a['prefixlen']}" for a in info.get("addr_info", [])}
    port = _link(VM_LAN_IF, netns=VM_LAN_NETNS) or {}
    if GATEWAY_CIDR not in have or "UP" not in info.get("flags", []) or port.get("master") != LAN_BRIDGE:
        return None
    return f"{VM_MASTER} <-> {VM_LAN_NETNS}/{VM_LAN_IF} in {LAN_BRIDGE} {GATEWAY_CIDR}"


def remove() -> list[str]:
    """Delete the veth pair (only when it is ours) and the netns. Returns what was removed; a link
    named VM_MASTER that is not ours stays (and `leftovers` names it)."""
    removed = []
    master = _link(VM_MASTER)
    ours = master is not None and _is_ours(master)
    if ours and _ip("link", "delete", VM_MASTER, check=False).returncode == 0:
        removed.append(f"link {VM_MASTER}")
    if (NETNS_DIR / VM_LAN_NETNS).exists():
        _remove_netns()
        removed.append(f"netns {VM_LAN_NETNS}")
    return removed


def leftovers() -> list[str]:
    left = [f"link {VM_MASTER}"] if master_exists() else []
    return left + ([f"netns {VM_LAN_NETNS}"] if (NETNS_DIR / VM_LAN_NETNS).exists() else [])
