"""up, down and status of the local cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from . import images, leftovers, nodeinstall, pki, secondnode
from .components import Component, Setup, by_name, components, processes, which_missing
from .health import port_in_use
from .paths import Paths, node_name, this_node
from .procs import wait_for


def say(msg: str) -> None:
    print(f"[edgevirt-local] {msg}", flush=True)


class ClusterError(RuntimeError):
    """A clear, user-facing reason why the cluster could not be brought up or down."""


def _owner_of_port(port: int) -> str:
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    return out.strip() or "unknown process"


def _start(c: Component, paths: Paths) -> str:
    proc = c.process(paths)
    restarted = ""
    pid = proc.pid()
    if pid and proc.running() and c.stale(paths, pid):
        proc.stop()
        restarted = f"restarted (pid {pid} ran an older install or setup); "
    if proc.running():
        wait_for(f"{c.name} to be ready", lambda: c.ready(paths), c.timeout, proc)
        return f"already running (pid {proc.pid()})"
    if c.may_be_external:
        try:
            if c.ready(paths):
                return "already running outside this cluster; using it, will not stop it"
        except OSError:
            pass
    for port in c.ports:
        if port_in_use(port):
            raise ClusterError(
                f"{c.name}: port 127.0.0.1:{port} is taken by {_owner_of_port(port)}; stop that process "
                f"(or run deploy/local/down if it is a cluster of another checkout) and run up again"
            )
    c.prepare(paths)
    pid = proc.start(c.argv(paths), env=c.environment(paths))
    wait_for(f"{c.name} to be ready", lambda: c.ready(paths), c.timeout, proc)
    return f"{restarted}started (pid {pid}, log {proc.logfile})"


def kubectl(paths: Paths, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [paths.tool("kubectl"), f"--kubeconfig={paths.kubeconfig}", *args],
        capture_output=True,
        text=True,
        check=check,
    )


def node_ready(paths: Paths) -> bool:
    out = kubectl(paths, "get", "node", node_name(), "-o", "json", check=False)
    if out.returncode != 0:
        return False
    conds = json.loads(out.stdout)["status"].get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def up(only: list[str] | None = None, nodes: int | None = None) -> None:
    """Start what is not running, in order; wait for the node to be Ready. ``nodes`` 2 adds the second
    node (secondnode.py), 1 removes it, None leaves it as it is."""
    if os.geteuid() != 0:
        raise ClusterError("deploy/local/up needs root (network namespaces, containerd, kubelet, libvirtd)")
    missing = which_missing()
    if missing:
        raise ClusterError(f"missing prerequisites: {', '.join(missing)}; run deploy/install/install first")
    paths = Paths.default()
    for d in (paths.state, paths.pids, paths.logs, paths.etc, paths.data, paths.run):
        d.mkdir(parents=True, exist_ok=True)
    leftovers.CreatedPaths(paths).record_before_up()
    if (paths.pki / "admin.crt").exists():  # a cluster another checkout brought up: its kubeconfig
        pki.kubeconfig(paths, "admin", paths.kubeconfig)  # here too, before a component needs it
    wanted = [by_name()[n] for n in only] if only else components()
    t0 = time.monotonic()
    for c in wanted:
        say(f"{c.name}: {c.ensure(paths) if isinstance(c, Setup) else _start(c, paths)}")
        if c.name == "registry":
            images.ensure_images(paths)
            say(f"registry: images {images.describe()}")
    if (paths.pki / "admin.crt").exists():
        pki.kubeconfig(paths, "admin", paths.kubeconfig)
    if only is None or "kubelet" in only:
        say(f"waiting for node {node_name()} to be Ready")
        wait_for(
            f"node {node_name()} Ready", lambda: node_ready(paths), 180, _kubelet(paths).process(paths), 1
        )
        say(f"node {node_name()} is Ready ({time.monotonic() - t0:.1f}s); kubeconfig: {paths.kubeconfig}")
    if this_node().index == 1 and nodes == 2:
        existed = secondnode.exists()
        try:
            secondnode.ensure(paths)
        except BaseException:
            if not existed:  # a node 2 made now and failing halfway leaves nothing behind
                gone = secondnode.remove(paths, _kubectl_ok(paths))
                say(f"the second node failed to come up; removed what was made of it: {', '.join(gone)}")
            raise
    elif this_node().index == 1 and nodes == 1 and secondnode.exists():
        gone = secondnode.remove(paths, _kubectl_ok(paths))
        say(f"removed the second node: {', '.join(gone)}")


def _kubelet(paths: Paths) -> Component:
    c = by_name()["kubelet"]
    assert isinstance(c, Component)
    return c


def _kubectl_ok(paths: Paths):
    """kubectl as a predicate for secondnode.remove (None when the API server is not up)."""
    if not by_name()["kube-apiserver"].process(paths).running():  # type: ignore[union-attr]
        return None
    return lambda *args: kubectl(paths, *args, check=False).returncode == 0


def _remove_pods(paths: Paths) -> None:
    """Stop and remove every pod sandbox through CRI while the runtimes still run, so that they tear
    down networks, mounts and VMs themselves: through edgevirt-cri first (it reaches the kvm
    handler too), then through containerd for anything left."""
    endpoints = [
        (name, sock)
        for name, sock in (("edgevirt-cri", paths.cri_sock), ("containerd", paths.containerd_sock))
        if by_name()[name].process(paths).running()  # type: ignore[union-attr]
    ]
    for name, sock in endpoints:
        crictl = [paths.tool("crictl"), "--runtime-endpoint", f"unix://{sock}", "--timeout", "30s"]
        pods = subprocess.run([*crictl, "pods", "-q"], capture_output=True, text=True).stdout.split()
        if pods:
            say(f"removing {len(pods)} pod sandbox(es) through {name}")
            subprocess.run([*crictl, "rmp", "--force", *pods], capture_output=True, text=True)


def down(purge: bool = False) -> list[str]:
    """Stop exactly what up started (by pid, reverse order) and remove what the cluster left.
    Returns what was still found afterwards (empty when the machine is clean)."""
    paths = Paths.default()
    if this_node().index == 1 and secondnode.exists():
        gone = secondnode.remove(paths, _kubectl_ok(paths))
        say(f"removed the second node: {', '.join(gone)}")
    kubelet = _kubelet(paths).process(paths)
    if kubelet.stop():
        say("kubelet: stopped")
    _remove_pods(paths)
    doms = leftovers.remove_domains()
    if doms:
        say(f"libvirt: removed domains {', '.join(doms)}")
    for c in reversed(components()):
        if isinstance(c, Setup):
            gone = c.remove(paths)
            if gone:
                say(f"{c.name}: removed {', '.join(gone)}")
            continue
        proc = c.process(paths)
        if proc.stop():
            say(f"{c.name}: stopped")
        elif proc.pidfile.exists():
            proc.pidfile.unlink(missing_ok=True)
    if leftovers.remove_stale_socket(paths.macvtap_sock):
        say(f"removed the stale socket {paths.macvtap_sock}")
    killed = leftovers.kill_shims(paths)
    if killed:
        say(f"killed {len(killed)} leftover containerd shim(s)")
    um = leftovers.unmount_all(paths.state, paths.run)
    if um:
        say(f"unmounted {len(um)} mount(s) under the cluster's directories")
    ns = leftovers.pod_netns()
    if ns:
        leftovers.remove_netns(ns)
        say(f"removed {len(ns)} pod network namespace(s)")
    if leftovers.remove_bridge():
        say(f"removed link {leftovers.POD_BRIDGE}")
    taps = leftovers.remove_tap_nodes(paths.macvtap_device_dir)
    if taps:
        say(f"removed {len(taps)} macvtap device node(s) under {paths.macvtap_device_dir}")
    leftovers.remove_iptables_chains()
    left_cg = leftovers.remove_cgroups()
    removed = leftovers.CreatedPaths(paths).remove()
    if removed:
        say(f"removed {', '.join(removed)} (created by the cluster)")
    shutil.rmtree(paths.run, ignore_errors=True)
    if purge:
        shutil.rmtree(paths.state, ignore_errors=True)
        paths.kubeconfig.unlink(missing_ok=True)
        say(f"purged {paths.state}")
    return remaining(paths) + [f"cgroup {p}" for p in left_cg]


def remaining(paths: Paths) -> list[str]:
    """Everything of the cluster still on the machine."""
    left = [f"process {c.name}" for c in processes() if c.process(paths).running()]
    for c in components():
        if isinstance(c, Setup):
            left += c.leftovers(paths)
    left += [f"shim pid {p}" for p in leftovers.shims(paths)]
    left += [f"mount {m}" for m in leftovers.mounts_under(paths.state, paths.run)]
    left += [f"netns {n}" for n in leftovers.pod_netns()]
    left += [f"link {leftovers.POD_BRIDGE}"] if leftovers.bridge_exists() else []
    left += [f"domain {d}" for d in leftovers.edgevirt_domains()]
    left += [f"device node {n}" for n in leftovers.tap_nodes(paths.macvtap_device_dir)]
    if this_node().index == 1:
        left += [f"node 2: {x}" for x in secondnode.leftovers()]
    return left


def status() -> int:
    paths = Paths.default()
    rc = 0
    for c in components():
        if isinstance(c, Setup):
            desc = _safe_value(lambda c=c: c.describe(paths))
            if desc is None:
                rc = 3
            print(f"{c.name:26} {'set up (' + desc + ')' if desc else 'missing'}")
            continue
        proc = c.process(paths)
        pid = proc.pid()
        if pid:
            state = f"running (pid {pid})"
        elif c.may_be_external and _safe(lambda c=c: c.ready(paths)):
            state = "running (external)"
        else:
            state = "stopped" + (" (exited: pid file left)" if proc.exited_early() else "")
            rc = 3
        print(f"{c.name:26} {state}")
    if this_node().index == 1:
        node2 = secondnode.leftovers()
        state = f"present ({len(node2)} parts; up --nodes 1 removes it)" if node2 else "none"
        print(f"{'second node':26} {state}")
    return rc


def _safe(f) -> bool:
    return bool(_safe_value(f))


def _safe_value(f):
    try:
        return f()
    except Exception:
        return None


def _take_nodes(argv: list[str]) -> int | None:
    """Remove ``--nodes N`` (or ``--nodes=N``) from argv; N must be 1 or 2."""
    for i, arg in enumerate(argv):
        if arg == "--nodes" or arg.startswith("--nodes="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            del argv[i : i + (1 if "=" in arg else 2)]
            if value not in ("1", "2"):
                raise ClusterError(f"--nodes {value or '(missing)'}: the local cluster has 1 or 2 nodes")
            if this_node().index != 1:
                raise ClusterError("--nodes is for the host side (node 1), not inside node 2")
            return int(value)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv else "status"
    try:
        if cmd == "up":
            nodes = _take_nodes(argv)
            unknown = [a for a in argv if a not in by_name()]
            if unknown:
                raise ClusterError(f"unknown component(s) {unknown}; known: {', '.join(by_name())}")
            up(argv or None, nodes)
            return 0
        if cmd == "down":
            left = down(purge="--purge" in argv)
            if left:
                say("still on the machine after down: " + "; ".join(left))
                return 1
            say("down: nothing of the cluster is left running")
            return 0
        if cmd == "status":
            return status()
        if cmd == "node-venv":  # secondnode.py: the node venv alone, with the host's network
            say(f"node-install: {nodeinstall.ensure_venv(Paths.default())}")
            return 0
        usage = "usage: localcluster up [--nodes 1|2] [COMPONENT...] | down [--purge] | status"
        print(usage, file=sys.stderr)
        return 2
    except (ClusterError, TimeoutError, RuntimeError, FileNotFoundError) as e:
        say(f"error: {e}")
        return 1
