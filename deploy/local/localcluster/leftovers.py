"""What a stopped cluster may leave on the machine, found and removed: pods' network namespaces,
mounts under the cluster's directories, the pod bridge, containerd shims, kubelet's cgroups and
iptables chains, libvirt domains of edgevirt, macvtap device nodes and a stale macvtap daemon
socket, and directories `up` created outside the state dir."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from . import health
from .paths import POD_BRIDGE, Paths, this_node

# Domains created by edgevirt carry this name prefix (the kvm handler and the controller use it).
DOMAIN_PREFIX = "edgevirt-"
CGROUP_ROOT = Path("/sys/fs/cgroup")
KUBELET_CGROUPS = ("kubepods", "kubepods.slice")
KUBELET_CHAINS = {
    "mangle": ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"],
    "nat": ["KUBE-KUBELET-CANARY", "KUBE-MARK-DROP", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"],
    "filter": ["KUBE-KUBELET-CANARY", "KUBE-FIREWALL"],
}


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True)


def mounts_under(*roots: Path, mountinfo: str | None = None) -> list[str]:
    """Mount points below any of `roots`, deepest first (from /proc/self/mountinfo by default)."""
    prefixes = [str(r.resolve()) if r.exists() else str(r) for r in roots]
    found = []
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    for line in mountinfo.splitlines():
        target = line.split()[4].replace("\\040", " ")
        if any(target == p or target.startswith(p + "/") for p in prefixes):
            found.append(target)
    return sorted(set(found), key=lambda t: t.count("/"), reverse=True)


def unmount_all(*roots: Path) -> list[str]:
    done = []
    for target in mounts_under(*roots):
        if _run("umount", target).returncode != 0:
            _run("umount", "-l", target)
        done.append(target)
    return done


def pod_netns() -> list[str]:
    """Network namespaces made for pods: containerd's CRI names them cni-<uuid>, the kvm handler
    cni-kvm-<12 hex>."""
    d = Path("/run/netns")
    return sorted(p.name for p in d.iterdir() if p.name.startswith("cni-")) if d.exists() else []


def remove_netns(names: list[str]) -> None:
    for n in names:
        if _run("ip", "netns", "delete", n).returncode != 0:
            # A netns file whose mount is already gone: remove the empty file.
            _run("umount", "-l", f"/run/netns/{n}")
            Path(f"/run/netns/{n}").unlink(missing_ok=True)


def remove_bridge() -> bool:
    return _run("ip", "link", "delete", POD_BRIDGE).returncode == 0


def bridge_exists() -> bool:
    return _run("ip", "link", "show", POD_BRIDGE).returncode == 0


def tap_nodes(device_dir: Path) -> list[str]:
    """What the macvtap plugin left under its deviceDir (<deviceDir>/<containerID>/<ifname> nodes)."""
    if not device_dir.is_dir():
        return []
    return sorted(str(p) for p in device_dir.rglob("*") if not p.is_dir()) or sorted(
        str(p) for p in device_dir.iterdir()
    )


def remove_tap_nodes(device_dir: Path) -> list[str]:
    """Remove everything under deviceDir (the directory itself stays)."""
    found = tap_nodes(device_dir)
    if device_dir.is_dir():
        for entry in device_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return found


def remove_stale_socket(path: Path) -> bool:
    """Unlink a unix socket nobody listens on (a daemon killed with -9); one that a live daemon
    listens on stays."""
    if not path.exists() and not path.is_symlink():
        return False
    if health.unix_listening(path):
        return False
    path.unlink(missing_ok=True)
    return True


def shims(paths: Paths) -> list[int]:
    """containerd shim processes that belong to our containerd: by its socket address, in our mount
    namespace (the second node's containerd has the same socket path in its own)."""
    pids = []
    sock = str(paths.containerd_sock)
    mine = os.stat("/proc/self/ns/mnt").st_ino
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            ours = argv and b"containerd-shim" in argv[0] and sock.encode() in argv
            if ours and os.stat(proc / "ns" / "mnt").st_ino == mine:
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def kill_shims(paths: Paths) -> list[int]:
    pids = shims(paths)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    return pids


def kubelet_cgroups() -> list[Path]:
    """Cgroup directories kubelet made (QoS tiers and pods), deepest first, in every hierarchy."""
    found: list[Path] = []
    if not CGROUP_ROOT.exists():
        return found
    root = this_node().cgroup_root.strip("/")
    names = KUBELET_CGROUPS if not root else tuple(f"{root}/{n}" for n in KUBELET_CGROUPS)
    for hierarchy in CGROUP_ROOT.iterdir():
        for name in names:
            top = hierarchy / name
            if top.is_dir():
                found.extend(Path(p) for p, _, _ in os.walk(top))
    return sorted(found, key=lambda p: str(p).count("/"), reverse=True)


def remove_cgroups() -> list[Path]:
    left = []
    for d in kubelet_cgroups():
        try:
            d.rmdir()
        except OSError:
            left.append(d)
    return left


def remove_iptables_chains() -> list[str]:
    """Remove the chains kubelet adds (and the jumps to them from built-in chains)."""
    removed = []
    for table, chains in KUBELET_CHAINS.items():
        rules = _run("iptables", "-t", table, "-S").stdout.splitlines()
        present = [c for c in chains if f"-N {c}" in rules]
        for rule in rules:
            parts = rule.split()
            if (
                parts[:1] == ["-A"]
                and parts[1] not in present
                and any(parts[i] == "-j" and parts[i + 1] in present for i in range(len(parts) - 1))
            ):
                _run("iptables", "-t", table, "-D", *parts[1:])
        for chain in present:
            _run("iptables", "-t", table, "-F", chain)
        for chain in present:
            if _run("iptables", "-t", table, "-X", chain).returncode == 0:
                removed.append(f"{table}/{chain}")
    return removed


def edgevirt_domains() -> list[str]:
    if not Path("/var/run/libvirt/libvirt-sock").exists():
        return []
    out = _run("virsh", "-c", "qemu:///system", "list", "--all", "--name")
    return [n for n in out.stdout.split() if n.startswith(DOMAIN_PREFIX)]


def remove_domains() -> list[str]:
    names = edgevirt_domains()
    for n in names:
        _run("virsh", "-c", "qemu:///system", "destroy", n)
        _run("virsh", "-c", "qemu:///system", "undefine", n, "--nvram")
        _run("virsh", "-c", "qemu:///system", "undefine", n)
    return names


class CreatedPaths:
    """A ledger of directories outside the state dir that `up` (or the components it started)
    created, so `down` removes exactly those and nothing that was there before."""

    WATCHED = ("/var/log/pods", "/var/log/containers", "/etc/cni/net.d", "/var/lib/cni")

    def __init__(self, paths: Paths) -> None:
        self.file = paths.state / "created-paths.json"

    def record_before_up(self) -> None:
        if self.file.exists():
            return
        missing = [p for p in self.WATCHED if not Path(p).exists()]
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(missing))

    def remove(self) -> list[str]:
        try:
            created = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return []
        removed = []
        for p in created:
            if Path(p).exists():
                subprocess.run(["rm", "-rf", "--one-file-system", p], check=False)
                removed.append(p)
        self.file.unlink(missing_ok=True)
        return removed
