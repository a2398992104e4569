"""The local cluster's second node (``deploy/local/up --nodes 2``), made from the host side.

Node 2 is a whole Kubernetes node on the same machine: its own containerd, libvirtd, virtlogd,
macvtap daemon, edgevirt-cri (installed by the node installer from the wheel, as on node 1) and
kubelet, and later the edgevirt DaemonSets' pods, the same as node 1's. It lives in namespaces of
its own, so the same paths, ports and link names mean its own things there:

* **network**: netns NODE2_NETNS, linked to the host by the veth ``evnode2`` (10.243.0.1/30) <->
  ``eth0`` (10.243.0.2/30, its default route). Its kubelet serves on 10.243.0.2:10250, which the
  API server reaches by the node's name (an /etc/hosts line). The control plane and the registry
  listen on the host's loopback only, so node 2's own 127.0.0.1:6443 and :5000 are forwarded to
  them (DNAT to 10.243.0.1 there with ``route_localnet``, and on the host DNAT from ``evnode2`` back
  to 127.0.0.1, only for those two ports), and the ``kubernetes`` Service (10.96.0.1:443) goes the
  same way for its pods. Pods of node 2 (10.244.1.0/24) and node 1 reach each other by a route.
* **the VM LAN**: node 2's VM network master ``evvm0`` is a veth whose peer ``eth1`` is a port of
  the LAN bridge in ``edgevirt-vmnet`` (vmnet.py), beside node 1's: VMs on both nodes share one L2
  network and gateway, and each node's host-local IPAM hands out its own range of it.
* **mounts**: a mount namespace (kept by a bind of its ns file, :data:`MNTNS`) in which
  :data:`PRIVATE` paths are node 2's own directories under :data:`ROOT` (``/run`` whole, the edgevirt
  and libvirt state, CNI state, pod logs) and :data:`COPIED` ones start as copies of the host's (the
  CNI plugins, libvirt's config, which the node installer edits). The VM images directory is the
  host's (a shared image store). Everything node 2 runs inherits both namespaces.
* **cgroups**: kubelet's cgroupRoot ``/edgevirt-node2`` in every hierarchy, so its pods' cgroups are
  not node 1's.

The components themselves are started by the same code as node 1's (``python3 -m localcluster up``
inside the namespaces with EDGEVIRT_LOCAL_NODE=2: cluster.py, components.py), and stopped by its
``down`` there; :func:`remove` then removes the namespaces, links, rules, directories and the Node.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import pki, vmnet
from .paths import (
    APISERVER_PORT,
    NODE2_ADDR,
    NODE2_HOST_ADDR,
    NODE2_HOST_IF,
    NODE2_LINK_PREFIX,
    NODE2_NAME,
    NODE2_NETNS,
    NODE_ENV,
    REGISTRY_ADDR,
    VM_LAN_NETNS,
    VM_MASTER,
    Paths,
)
from .procs import Process

ROOT = Path("/var/lib/edgevirt-node2")
RUN_DIR = Path("/run/edgevirt-node2")
MNTNS = RUN_DIR / "mnt"
#: paths that are node 2's own (empty) directories ROOT/<path> in its mount namespace
PRIVATE = (
    "/run",
    "/var/lib/edgevirt",
    "/var/lib/libvirt",
    "/var/log/libvirt",
    "/var/cache/libvirt",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
)
#: paths that start as copies of the host's (the node installer and the DaemonSet change them)
COPIED = ("/etc/libvirt", "/opt/cni/bin")
#: host paths node 2 sees as they are (under a private path: mounted before it is covered)
SHARED = ("/var/lib/edgevirt/images",)
#: the host's end of node 2's LAN port while it is made (it moves into node 2 as VM_MASTER)
LAN_VETH = "evvm0n2"
LAN_PORT = "eth1"
NODE_IF = "eth0"
POD_CIDR2 = "10.244.1.0/24"
SERVICE = "10.96.0.1"
FORWARDED_PORTS = (APISERVER_PORT, int(REGISTRY_ADDR.rsplit(":", 1)[1]))
HOST_NAT_CHAIN = "EDGEVIRT-LOCAL-NODE2"
HOST_FW_CHAIN = "EDGEVIRT-LOCAL-NODE2-FW"
COMMENT = "edgevirt local cluster: node 2"
HOSTS = Path("/etc/hosts")
HOSTS_LINE = f"{NODE2_ADDR} {NODE2_NAME}  # {COMMENT}"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_NAME = "edgevirt-node2"
UP_TIMEOUT = 1200  # a first node install builds the node venv


class SecondNodeError(RuntimeError):
    """Node 2 cannot be made or removed; the message names the step and what failed."""


def say(msg: str) -> None:
    print(f"[edgevirt-local] node 2: {msg}", flush=True)


def _run(argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise SecondNodeError(f"`{' '.join(argv)}` failed: {(res.stderr or res.stdout).strip()}")
    return res


def _in_node(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run argv in node 2's network namespace (not its mounts)."""
    return _run(["ip", "netns", "exec", NODE2_NETNS, *argv], check=check)


def exists() -> bool:
    """Node 2 is (at least partly) there."""
    return bool(leftovers())


# --- network ---
def _link_exists(name: str, netns: str | None = None) -> bool:
    argv = ["ip", *(["-n", netns] if netns else []), "link", "show", "dev", name]
    return _run(argv, check=False).returncode == 0


def _host_rules() -> list[tuple[str, str, list[str]]]:
    jump = ["-m", "comment", "--comment", COMMENT, "-j"]
    ports = ",".join(str(p) for p in FORWARDED_PORTS)
    return [
        ("nat", "PREROUTING", [*jump, HOST_NAT_CHAIN]),
        ("filter", "INPUT", [*jump, HOST_FW_CHAIN]),
        ("nat", HOST_NAT_CHAIN, ["-i", NODE2_HOST_IF, "-d", f"{NODE2_HOST_ADDR}/32", "-p", "tcp",
                                 "-m", "multiport", "--dports", ports,
                                 "-j", "DNAT", "--to-destination", "127.0.0.1"]),
        ("filter", HOST_FW_CHAIN, ["-i", NODE2_HOST_IF, "-d", "127.0.0.0/8", "-m", "conntrack", "!",
                                   "--ctstate", "RELATED,ESTABLISHED,DNAT", "-j", "DROP"]),
    ]  # fmt: skip


def _node_rules() -> list[tuple[str, str, list[str]]]:
    ports = ",".join(str(p) for p in FORWARDED_PORTS)
    svc = ["-d", f"{SERVICE}/32", "-p", "tcp", "--dport", "443", "-j", "DNAT",
           "--to-destination", f"{NODE2_HOST_ADDR}:{APISERVER_PORT}"]  # fmt: skip
    return [
        ("nat", "OUTPUT", ["-d", "127.0.0.1/32", "-p", "tcp", "-m", "multiport", "--dports", ports,
                           "-j", "DNAT", "--to-destination", NODE2_HOST_ADDR]),
        ("nat", "OUTPUT", svc),
        ("nat", "PREROUTING", svc),
        ("nat", "POSTROUTING", ["-o", NODE_IF, "-s", "127.0.0.0/8", "-j", "SNAT", "--to-source", NODE2_ADDR]),
    ]  # fmt: skip


def _iptables(table: str, *args: str, netns: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["iptables", "-w", "-t", table, *args]
    return _in_node(*argv, check=check) if netns else _run(argv, check=check)


def _ensure_rules(rules: list[tuple[str, str, list[str]]], netns: bool) -> None:
    for table, chain, _ in rules:
        builtin = chain.isupper() and chain in ("PREROUTING", "OUTPUT", "INPUT", "POSTROUTING")
        if not builtin and _iptables(table, "-S", chain, netns=netns, check=False).returncode != 0:
            _iptables(table, "-N", chain, netns=netns)
    for table, chain, rule in reversed(rules):
        if _iptables(table, "-C", chain, *rule, netns=netns, check=False).returncode != 0:
            _iptables(table, "-I", chain, *rule, netns=netns)


def _sysctl(path: str, netns: bool) -> None:
    if netns:
        _in_node("sh", "-c", f"echo 1 > {path}")
    else:
        Path(path).write_text("1\n")


def _ensure_network() -> None:
    if not vmnet.netns_exists():
        raise SecondNodeError(f"netns {VM_LAN_NETNS} is missing: bring node 1 up first (deploy/local/up)")
    if not (Path("/run/netns") / NODE2_NETNS).exists():
        _run(["ip", "netns", "add", NODE2_NETNS])
    if not _link_exists(NODE2_HOST_IF):
        _run(["ip", "-n", NODE2_NETNS, "link", "delete", NODE_IF], check=False)
        peer = ["peer", "name", NODE_IF, "netns", NODE2_NETNS]
        _run(["ip", "link", "add", NODE2_HOST_IF, "type", "veth", *peer])
    _run(["ip", "addr", "replace", f"{NODE2_HOST_ADDR}/{NODE2_LINK_PREFIX}", "dev", NODE2_HOST_IF])
    _run(["ip", "link", "set", NODE2_HOST_IF, "up"])
    n = ["ip", "-n", NODE2_NETNS]
    _run([*n, "link", "set", "lo", "up"])
    _run([*n, "addr", "replace", f"{NODE2_ADDR}/{NODE2_LINK_PREFIX}", "dev", NODE_IF])
    _run([*n, "link", "set", NODE_IF, "up"])
    _run([*n, "route", "replace", "default", "via", NODE2_HOST_ADDR])
    _run(["ip", "route", "replace", POD_CIDR2, "via", NODE2_ADDR])
    _sysctl(f"/proc/sys/net/ipv4/conf/{NODE2_HOST_IF}/route_localnet", netns=False)
    _sysctl(f"/proc/sys/net/ipv4/conf/{NODE_IF}/route_localnet", netns=True)
    _sysctl("/proc/sys/net/ipv4/ip_forward", netns=True)  # its pods reach the API server through it
    _ensure_rules(_host_rules(), netns=False)
    _ensure_rules(_node_rules(), netns=True)
    # the VM LAN port: a veth made on the host, one end into the LAN's bridge, the other into node 2
    if not _link_exists(VM_MASTER, NODE2_NETNS):
        _run(["ip", "-n", VM_LAN_NETNS, "link", "delete", LAN_PORT], check=False)
        _run(["ip", "link", "delete", LAN_VETH], check=False)
        _run(["ip", "link", "add", LAN_VETH, "type", "veth", "peer", "name", LAN_PORT, "netns", VM_LAN_NETNS])
        _run(["ip", "link", "set", LAN_VETH, "netns", NODE2_NETNS])
        _run([*n, "link", "set", LAN_VETH, "name", VM_MASTER])
    _run([*n, "link", "set", VM_MASTER, "up"])
    vmnet.attach_port(LAN_PORT)


def _ensure_hosts_line() -> None:
    lines = HOSTS.read_text().splitlines()
    if HOSTS_LINE not in lines:
        # in place, not by rename: /etc/hosts may be a bind mount
        with HOSTS.open("a") as f:
            f.write(("" if not lines or HOSTS.read_text().endswith("\n") else "\n") + HOSTS_LINE + "\n")


def _remove_hosts_line() -> bool:
    text = HOSTS.read_text()
    lines = text.splitlines(keepends=True)
    kept = [line for line in lines if line.rstrip("\n") != HOSTS_LINE]
    if len(kept) == len(lines):
        return False
    with HOSTS.open("w") as f:
        f.write("".join(kept))
    return True


# --- cgroups ---
def _cgroup_dirs() -> list[Path]:
    if not CGROUP_ROOT.is_dir():
        return []
    return [h / CGROUP_NAME for h in sorted(CGROUP_ROOT.iterdir()) if h.is_dir() and not h.is_symlink()]


def _ensure_cgroups() -> None:
    for d in _cgroup_dirs():
        if d.parent.name == "unified" or not (d.parent / "cgroup.procs").exists():
            continue
        d.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):  # cgroup v1 cpuset: a new group starts empty
            if (d / knob).exists() and not (d / knob).read_text().strip():
                (d / knob).write_text((d.parent / knob).read_text())


def _remove_cgroups() -> list[str]:
    left = []
    for top in _cgroup_dirs():
        if not top.is_dir():
            continue
        for sub, _, _ in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
            with contextlib.suppress(OSError):
                Path(sub).rmdir()
        if top.exists():
            left.append(str(top))
    return left


# --- mounts ---
def _own(path: str) -> Path:
    return ROOT / path.lstrip("/")


def _ns_mounts(*argv_lists: list[str]) -> None:
    for argv in argv_lists:
        _run(["nsenter", f"--mount={MNTNS}", "--", *argv])


def _mntns_alive() -> bool:
    return MNTNS.exists() and _run(["nsenter", f"--mount={MNTNS}", "--", "true"], check=False).returncode == 0


def _ensure_mounts() -> None:
    if _mntns_alive():
        return
    for path in PRIVATE:
        _own(path).mkdir(parents=True, exist_ok=True)
    for path in COPIED:
        if not _own(path).exists():
            _own(path).parent.mkdir(parents=True, exist_ok=True)
            if Path(path).exists():
                _run(["cp", "-a", path, str(_own(path))])
            else:
                _own(path).mkdir()
    for path in (*PRIVATE, *COPIED, *SHARED):
        Path(path).mkdir(parents=True, exist_ok=True)  # mount points (node 1 made most of them)
    for path in SHARED:
        _own(path).mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    if RUN_DIR.as_posix() not in _mount_targets():
        _run(["mount", "--bind", str(RUN_DIR), str(RUN_DIR)])
    _run(["mount", "--make-private", str(RUN_DIR)])
    MNTNS.touch()
    _run(["unshare", f"--mount={MNTNS}", "--propagation", "private", "true"])
    # the copies of the host's mounts under the private paths go first (they would hold the host's
    # pods' namespaces and volumes alive); then the shared paths, then node 2's own directories
    inner = _run(["nsenter", f"--mount={MNTNS}", "--", "cat", "/proc/self/mountinfo"]).stdout
    covered = [t for t in _mount_targets(inner) if any(t == p or t.startswith(p + "/") for p in PRIVATE)]
    for target in sorted(covered, key=lambda t: t.count("/"), reverse=True):
        _run(["nsenter", f"--mount={MNTNS}", "--", "umount", "-l", target], check=False)
    _ns_mounts(*(["mount", "--bind", p, str(_own(p))] for p in SHARED))
    _ns_mounts(*(["mount", "--rbind", str(_own(p)), p] for p in (*PRIVATE, *COPIED)))


def _mount_targets(mountinfo: str | None = None) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    return [line.split()[4].replace("\\040", " ") for line in text.splitlines()]


# --- certificates ---
def node_paths() -> Paths:
    """Node 2's Paths as the host sees them (its state dir under ROOT)."""
    inside = Paths.default()
    return Paths(state=_own(str(inside.state)), run=_own(str(inside.run)))


def _ensure_pki(host: Paths) -> None:
    mine = node_paths()
    mine.pki.mkdir(parents=True, exist_ok=True)
    mine.pki.chmod(0o700)
    shutil.copy2(host.pki / "ca.crt", mine.pki / "ca.crt")
    pki.kubelet_certs(mine.pki, host.pki / "ca.crt", host.pki / "ca.key", NODE2_NAME, NODE2_ADDR)
    pki.kubeconfig(mine, "kubelet", mine.etc / "kubelet.kubeconfig")


def process(name: str) -> Process:
    """Node 2's component process ``name`` (its pid file, seen from the host): tests stop its
    kubelet with it to play a lost node."""
    state = node_paths().state
    return Process(name, state / "pids" / f"{name}.pid", state / "logs" / f"{name}.log")


# --- the whole node ---
def _localcluster(*args: str, timeout: float, host_network: bool = False) -> subprocess.CompletedProcess:
    """``python3 -m localcluster ARGS`` inside node 2's namespaces, its output passed through
    (``host_network``: in its mounts but the host's network, which reaches the package index)."""
    here = Path(__file__).resolve().parents[1]
    env = {**os.environ, NODE_ENV: "2", "PYTHONPATH": str(here)}
    net = [] if host_network else [f"--net=/run/netns/{NODE2_NETNS}"]
    argv = ["nsenter", *net, f"--mount={MNTNS}", "--", sys.executable, "-m", "localcluster", *args]
    return subprocess.run(argv, env=env, timeout=timeout, check=False)


def ensure(host: Paths) -> None:
    """Make node 2 (idempotent) and start what of it is not running; returns once it is Ready."""
    if not (host.pki / "ca.key").exists():
        raise SecondNodeError("node 1 has no cluster CA yet: bring it up first (deploy/local/up)")
    _ensure_network()
    _ensure_hosts_line()
    _ensure_cgroups()
    _ensure_mounts()
    _ensure_pki(host)
    say(f"network {NODE2_NETNS} ({NODE2_ADDR}), mounts {MNTNS}, cgroup /{CGROUP_NAME}: ready")
    # node 2's network has no route beyond the host (a real node's has): the node venv's packages
    # are fetched with the host's network, into node 2's own directories
    res = _localcluster("node-venv", timeout=UP_TIMEOUT, host_network=True)
    if res.returncode != 0:
        raise SecondNodeError(f"its node venv could not be installed (exit {res.returncode}; see above)")
    res = _localcluster("up", timeout=UP_TIMEOUT)
    if res.returncode != 0:
        raise SecondNodeError(f"its components did not come up (exit {res.returncode}; see above)")


def remove(host: Paths, kubectl) -> list[str]:
    """Stop everything node 2 runs (its own ``down``), delete its Node, and remove its namespaces,
    links, rules, cgroups and directories. Returns what was removed."""
    removed = []
    if _mntns_alive() and (Path("/run/netns") / NODE2_NETNS).exists():
        res = _localcluster("down", timeout=600)
        if res.returncode != 0:
            say(f"its down reported leftovers (exit {res.returncode}); removing its namespaces anyway")
        removed.append("its components")
    if kubectl is not None and kubectl("delete", "node", NODE2_NAME, "--ignore-not-found", "--wait=false"):
        removed.append(f"Node {NODE2_NAME}")
    _kill_leftover_processes()
    if MNTNS.exists():
        _run(["umount", str(MNTNS)], check=False)
        removed.append(f"mount namespace {MNTNS}")
    if RUN_DIR.as_posix() in _mount_targets():
        _run(["umount", "-l", str(RUN_DIR)], check=False)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    if (Path("/run/netns") / NODE2_NETNS).exists():
        _run(["ip", "netns", "delete", NODE2_NETNS], check=False)
        removed.append(f"netns {NODE2_NETNS} (and its links {NODE2_HOST_IF}, {VM_MASTER} <-> {LAN_PORT})")
    for name in (NODE2_HOST_IF, LAN_VETH):
        if _run(["ip", "link", "delete", name], check=False).returncode == 0:
            removed.append(f"link {name}")
    for table, chain, rule in _host_rules()[:2]:
        while _iptables(table, "-C", chain, *rule, check=False).returncode == 0:
            _iptables(table, "-D", chain, *rule)
    for table, chain in (("nat", HOST_NAT_CHAIN), ("filter", HOST_FW_CHAIN)):
        if _iptables(table, "-S", chain, check=False).returncode == 0:
            _iptables(table, "-F", chain)
            _iptables(table, "-X", chain)
            removed.append(f"iptables {table}/{chain}")
    if _remove_hosts_line():
        removed.append(f"the {HOSTS} line of {NODE2_NAME}")
    if _cgroup_dirs() and any(d.exists() for d in _cgroup_dirs()):
        left = _remove_cgroups()
        removed.append(f"cgroup /{CGROUP_NAME}" + (f" (left: {', '.join(left)})" if left else ""))
    if ROOT.exists():
        _run(["rm", "-rf", "--one-file-system", str(ROOT)], check=False)
        removed.append(str(ROOT))
    return removed


def _processes() -> list[int]:
    """Processes in node 2's mount namespace (by its ns file's inode)."""
    try:
        ns = os.stat(MNTNS).st_ino
    except OSError:
        return []
    if ns == 0 or not _mntns_alive():
        return []
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(proc / "ns" / "mnt").st_ino == ns:
                    found.append(int(proc.name))
    return found


def _kill_leftover_processes() -> None:
    for pid in _processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


def leftovers() -> list[str]:
    left = [f"process {pid} in node 2's mount namespace" for pid in _processes()]
    if (Path("/run/netns") / NODE2_NETNS).exists():
        left.append(f"netns {NODE2_NETNS}")
    left += [f"link {n}" for n in (NODE2_HOST_IF, LAN_VETH) if _link_exists(n)]
    left += [f"iptables {t}/{c}" for t, c in (("nat", HOST_NAT_CHAIN), ("filter", HOST_FW_CHAIN))
             if _iptables(t, "-S", c, check=False).returncode == 0]  # fmt: skip
    if HOSTS.exists() and HOSTS_LINE in HOSTS.read_text().splitlines():
        left.append(f"{HOSTS} line {NODE2_NAME}")
    left += [f"cgroup {d}" for d in _cgroup_dirs() if d.exists()]
    left += [str(p) for p in (ROOT, RUN_DIR) if p.exists()]
    return left
