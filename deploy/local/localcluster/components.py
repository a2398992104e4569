"""The components of the local cluster, in start order: how each is configured, started and known
to be ready. `up` walks this list and starts only what is not running; `down` walks it backwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import configs, health, nodeinstall, pki, svcroute, vmnet
from .paths import (
    APISERVER_PORT,
    ETCD_CLIENT,
    ETCD_PEER,
    REGISTRY_ADDR,
    REPO,
    SERVICE_CIDR,
    Paths,
    node_name,
    this_node,
)
from .procs import Process


@dataclass
class Component:
    """One process of the cluster. `external` components (e.g. a libvirtd somebody else already
    runs) are used but never started or stopped by us."""

    name: str
    argv: Callable[[Paths], list[str]]
    ready: Callable[[Paths], bool]
    prepare: Callable[[Paths], None] = lambda paths: None
    ports: tuple[int, ...] = ()
    timeout: float = 60.0
    may_be_external: bool = False
    env: dict[str, str] | Callable[[Paths], dict[str, str]] = field(default_factory=dict)
    #: True when the running process is out of date (``up`` restarts it), e.g. an older node install
    stale: Callable[[Paths, int], bool] = lambda paths, pid: False

    def environment(self, paths: Paths) -> dict[str, str]:
        return self.env(paths) if callable(self.env) else dict(self.env)

    def process(self, paths: Paths) -> Process:
        return Process(self.name, paths.pids / f"{self.name}.pid", paths.logs / f"{self.name}.log")


@dataclass
class Setup:
    """A part of the cluster that is not a process (links, namespaces): `ensure` makes it, idempotently,
    and says what it did; `describe` is its state for `status` (None: missing or incomplete);
    `remove` undoes it (`down`) and says what it removed; `leftovers` names what is still there."""

    name: str
    ensure: Callable[[Paths], str]
    describe: Callable[[Paths], str | None]
    remove: Callable[[Paths], list[str]]
    leftovers: Callable[[Paths], list[str]]


def _kubeconfig(paths: Paths, user: str) -> str:
    return str(paths.etc / f"{user}.kubeconfig")


# --- registry ---
def _registry_argv(p: Paths) -> list[str]:
    return [p.tool("docker-registry"), "serve", str(configs.registry(p))]


# --- etcd ---
def _etcd_argv(p: Paths) -> list[str]:
    return [
        p.tool("etcd"),
        "--name",
        "edgevirt-local",
        "--data-dir",
        str(p.data / "etcd"),
        "--listen-client-urls",
        ETCD_CLIENT,
        "--advertise-client-urls",
        ETCD_CLIENT,
        "--listen-peer-urls",
        ETCD_PEER,
        "--initial-advertise-peer-urls",
        ETCD_PEER,
        "--initial-cluster",
        f"edgevirt-local={ETCD_PEER}",
        "--listen-metrics-urls",
        "",
        "--quota-backend-bytes",
        str(2 * 1024**3),
        "--log-level",
        "warn",
    ]


# --- control plane ---
def _prepare_pki(p: Paths) -> None:
    pki.ensure(p)
    for user in ("admin", "controller-manager", "scheduler", "kubelet"):
        pki.kubeconfig(p, user, Path(_kubeconfig(p, user)))
    pki.kubeconfig(p, "admin", p.kubeconfig)


def _apiserver_argv(p: Paths) -> list[str]:
    k = p.pki
    return [
        p.tool("kube-apiserver"),
        "--bind-address=127.0.0.1",
        f"--secure-port={APISERVER_PORT}",
        "--advertise-address=127.0.0.1",
        "--endpoint-reconciler-type=none",
        f"--etcd-servers={ETCD_CLIENT}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--client-ca-file={k / 'ca.crt'}",
        f"--tls-cert-file={k / 'apiserver.crt'}",
        f"--tls-private-key-file={k / 'apiserver.key'}",
        f"--kubelet-client-certificate={k / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={k / 'apiserver-kubelet-client.key'}",
        "--kubelet-preferred-address-types=Hostname,InternalIP",
        f"--service-account-key-file={k / 'sa.pub'}",
        f"--service-account-signing-key-file={k / 'sa.key'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        "--allow-privileged=true",
        "--profiling=false",
        "--v=1",
    ]


def _kcm_argv(p: Paths) -> list[str]:
    k = p.pki
    kc = _kubeconfig(p, "controller-manager")
    return [
        p.tool("kube-controller-manager"),
        "--bind-address=127.0.0.1",
        f"--kubeconfig={kc}",
        f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        "--controllers=*,-bootstrapsigner,-tokencleaner,-cloud-node-lifecycle,-service-lb-controller,"
        "-node-route-controller",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={k / 'sa.key'}",
        f"--root-ca-file={k / 'ca.crt'}",
        f"--cluster-signing-cert-file={k / 'ca.crt'}",
        f"--cluster-signing-key-file={k / 'ca.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


def _scheduler_argv(p: Paths) -> list[str]:
    kc = _kubeconfig(p, "scheduler")
    return [
        p.tool("kube-scheduler"),
        "--bind-address=127.0.0.1",
        f"--kubeconfig={kc}",
        f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


# --- containerd ---
def cni_bin_dirs() -> list[str]:
    return [d for d in ("/opt/cni/bin", "/usr/lib/cni") if Path(d, "bridge").exists()] or ["/usr/lib/cni"]


def _containerd_prepare(p: Paths) -> None:
    configs.pod_network(p)
    (p.cni_data_dir).mkdir(parents=True, exist_ok=True)


def _containerd_argv(p: Paths) -> list[str]:
    return [p.tool("containerd"), "--config", str(configs.containerd(p, cni_bin_dirs()))]


# --- edgevirt-cri (kubelet's CRI endpoint, in front of containerd) ---
def cri_enabled() -> bool:
    """kubelet talks to edgevirt-cri unless EDGEVIRT_LOCAL_CRI=containerd (straight to containerd)."""
    return os.environ.get("EDGEVIRT_LOCAL_CRI", "edgevirt-cri") != "containerd"


def _cri_argv(p: Paths) -> list[str]:
    """The ExecStart line of the edgevirt-cri unit the node installer wrote (see nodeinstall)."""
    return nodeinstall.exec_start(p, nodeinstall.CRI_UNIT)


def _node_env(p: Paths) -> dict[str, str]:
    return {nodeinstall.WHEEL_ENV: nodeinstall.wheel_digest(p)}


def _older_install(p: Paths, pid: int) -> bool:
    """The process runs from a node install older than the one now in place."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    mine = f"{nodeinstall.WHEEL_ENV}={nodeinstall.wheel_digest(p)}".encode()
    return mine not in environ


def _cri_prepare(p: Paths) -> None:
    p.cri_sock.parent.mkdir(parents=True, exist_ok=True)
    p.cri_state.mkdir(parents=True, exist_ok=True)
    if this_node().index == 1:  # cluster-wide objects: the first node's up applies them
        _apply_runtimeclasses(p)


RUNTIMECLASSES = REPO / "deploy" / "manifests" / "runtimeclasses.yaml"


def _apply_runtimeclasses(p: Paths) -> None:
    """RuntimeClasses runc, kata, kvm (kubectl apply: idempotent). Needs the API server; skipped
    with a note when it is not running (e.g. `up edgevirt-cri` alone)."""
    try:
        if not health.https_ok(f"https://127.0.0.1:{APISERVER_PORT}/readyz", p, "admin"):
            return
    except OSError:
        print("[edgevirt-local] edgevirt-cri: API server not up; RuntimeClasses not applied", flush=True)
        return
    res = subprocess.run(
        [p.tool("kubectl"), f"--kubeconfig={p.kubeconfig}", "apply", "-f", str(RUNTIMECLASSES)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"kubectl apply -f {RUNTIMECLASSES} failed: {res.stderr.strip()}")


# --- the VM network: veth evvm0 <-> edgevirt-vmnet/eth0, the kvm handler's CNI conflist ---
def _vmnet_ensure(p: Paths) -> str:
    configs.vm_network(p)
    return f"{vmnet.ensure()}; conflist {p.vm_cni_conflist}"


def _vmnet_remove(p: Paths) -> list[str]:
    removed = vmnet.remove()
    if p.vm_cni_data_dir.exists():
        shutil.rmtree(p.vm_cni_data_dir, ignore_errors=True)
        removed.append(f"{p.vm_cni_data_dir} (host-local leases, macvtap records)")
    return removed


def _vmnet_leftovers(p: Paths) -> list[str]:
    return vmnet.leftovers() + ([str(p.vm_cni_data_dir)] if p.vm_cni_data_dir.exists() else [])


#: the host daemons' /healthz /readyz /metrics (edgevirt-node install's defaults)
CRI_OPS_PORT = 9641
MACVTAP_OPS_PORT = 9642


# --- macvtap daemon: the resident half of the macvtap CNI plugin (netlink kept warm) ---
def _macvtap_argv(p: Paths) -> list[str]:
    """The ExecStart line of the macvtap daemon's unit the node installer wrote."""
    return nodeinstall.exec_start(p, nodeinstall.MACVTAP_UNIT)


def _macvtap_prepare(p: Paths) -> None:
    p.macvtap_sock.parent.mkdir(parents=True, exist_ok=True)


# --- libvirt ---
LIBVIRT_SOCK = Path("/var/run/libvirt/libvirt-sock")
VIRTLOGD_SOCK = Path("/var/run/libvirt/virtlogd-sock")


def _libvirt_prepare(p: Paths) -> None:
    for d in ("/var/log/libvirt", "/var/run/libvirt", "/var/lib/libvirt/qemu"):
        Path(d).mkdir(parents=True, exist_ok=True)


def _virtlogd_argv(p: Paths) -> list[str]:
    return [p.tool("virtlogd")]


REAPER = Path(__file__).with_name("reaper.py")


def _libvirtd_argv(p: Paths) -> list[str]:
    """libvirtd under a prompt reaper of the QEMUs it daemonizes (reaper.py: this machine's PID 1
    reaps orphans 1-2 s late, and libvirt sees a VM end only once its QEMU is reaped)."""
    return [sys.executable, str(REAPER), "--", p.tool("libvirtd")]


def _not_under_reaper(p: Paths, pid: int) -> bool:
    try:
        return str(REAPER).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# --- kubelet ---
def _kubelet_argv(p: Paths) -> list[str]:
    """kubelet's own config names containerd; with edgevirt-cri the node installer's drop-in in
    ``--config-dir`` points it at edgevirt-cri instead, as on a real node."""
    node = node_name()
    dropins = [f"--config-dir={p.etc / 'kubelet.conf.d'}"] if cri_enabled() else []
    return [
        p.tool("kubelet"),
        f"--config={configs.kubelet(p, node, p.containerd_sock)}",
        *dropins,
        f"--kubeconfig={_kubeconfig(p, 'kubelet')}",
        f"--root-dir={p.kubelet_dir}",
        f"--hostname-override={node}",
        *([f"--node-ip={this_node().node_ip}"] if this_node().node_ip else []),
        "--v=1",
    ]


def _kubelet_prepare(p: Paths) -> None:
    p.kubelet_dir.mkdir(parents=True, exist_ok=True)


# Start order. libvirtd, the VM network and the macvtap daemon come before edgevirt-cri: its kvm
# backend is registered only if it reports itself available when edgevirt-cri starts.
COMPONENTS: list[Component | Setup] = [
    Component(
        "registry", _registry_argv, lambda p: health.http_ok(f"http://{REGISTRY_ADDR}/v2/"), ports=(5000,)
    ),
    Component("etcd", _etcd_argv, lambda p: health.http_ok(f"{ETCD_CLIENT}/health"), ports=(2379, 2380)),
    Component(
        "kube-apiserver",
        _apiserver_argv,
        lambda p: health.https_ok(f"https://127.0.0.1:{APISERVER_PORT}/readyz", p, "admin"),
        prepare=_prepare_pki,
        ports=(APISERVER_PORT,),
        timeout=120,
    ),
    Component(
        "kube-controller-manager",
        _kcm_argv,
        lambda p: health.https_ok("https://127.0.0.1:10257/healthz"),
        ports=(10257,),
    ),
    Component(
        "kube-scheduler",
        _scheduler_argv,
        lambda p: health.https_ok("https://127.0.0.1:10259/healthz"),
        ports=(10259,),
    ),
    Component(
        "containerd",
        _containerd_argv,
        lambda p: health.unix_ok(p.containerd_sock),
        prepare=_containerd_prepare,
    ),
    # pods (edgevirt-controller's) reach the API server at the kubernetes Service: no kube-proxy here
    Setup("service-route", svcroute.ensure, svcroute.describe, svcroute.remove, svcroute.leftovers),
    Setup("vm-network", _vmnet_ensure, lambda p: vmnet.describe(), _vmnet_remove, _vmnet_leftovers),
    # the node side as a real node gets it (the wheel + edgevirt-node install), before libvirtd reads
    # the qemu.conf settings it writes; needs containerd's socket and the VM network's conflist
    Setup(
        "node-install",
        nodeinstall.install,
        nodeinstall.describe,
        nodeinstall.uninstall,
        nodeinstall.leftovers,
    ),
    Component(
        "virtlogd",
        _virtlogd_argv,
        lambda p: health.unix_ok(VIRTLOGD_SOCK),
        prepare=_libvirt_prepare,
        may_be_external=True,
    ),
    Component(
        "libvirtd",
        _libvirtd_argv,
        lambda p: health.unix_ok(LIBVIRT_SOCK),
        prepare=_libvirt_prepare,
        may_be_external=True,
        stale=_not_under_reaper,
    ),
    Component(
        "macvtap-daemon",
        _macvtap_argv,
        lambda p: health.unix_listening(p.macvtap_sock),
        prepare=_macvtap_prepare,
        ports=(MACVTAP_OPS_PORT,),
        may_be_external=True,
        env=_node_env,
        stale=_older_install,
    ),
    Component(
        "edgevirt-cri",
        _cri_argv,
        lambda p: health.unix_ok(p.cri_sock) and health.http_ok(f"http://127.0.0.1:{CRI_OPS_PORT}/readyz"),
        prepare=_cri_prepare,
        ports=(CRI_OPS_PORT,),
        env=_node_env,
        stale=_older_install,
    ),
    Component(
        "kubelet",
        _kubelet_argv,
        lambda p: health.http_ok("http://127.0.0.1:10248/healthz"),
        prepare=_kubelet_prepare,
        ports=(10248, 10250),
        timeout=120,
    ),
]

BY_NAME = {c.name: c for c in COMPONENTS}
PROCESSES: list[Component] = [c for c in COMPONENTS if isinstance(c, Component)]


# --- the second node (secondnode.py runs these inside its namespaces) ---
def _node2_vmnet_ensure(p: Paths) -> str:
    """Node 2's VM network: its master (the veth to the LAN netns) is made by the host side
    (secondnode.py, which reaches both namespaces); here only its conflist, with node 2's range."""
    if not vmnet.master_exists():
        raise vmnet.VMNetError(
            f"link {vmnet.VM_MASTER} is missing in node 2's network namespace: run deploy/local/up --nodes 2"
        )
    configs.vm_network(p)
    return f"master {vmnet.VM_MASTER} (made by the host side); conflist {p.vm_cni_conflist}"


def _node2_vmnet_describe(p: Paths) -> str | None:
    ok = vmnet.master_exists() and p.vm_cni_conflist.exists()
    return f"{vmnet.VM_MASTER}; conflist {p.vm_cni_conflist}" if ok else None


def _node2_vmnet_remove(p: Paths) -> list[str]:
    if p.vm_cni_data_dir.exists():
        shutil.rmtree(p.vm_cni_data_dir, ignore_errors=True)
        return [f"{p.vm_cni_data_dir} (host-local leases, macvtap records)"]
    return []


#: What a node runs (the rest is the control plane, on node 1). Node 2's own network plumbing (its
#: route to the API server and the registry, its VM network master) is made from the host side.
NODE_COMPONENTS = (
    "containerd",
    "vm-network",
    "node-install",
    "virtlogd",
    "libvirtd",
    "macvtap-daemon",
    "edgevirt-cri",
    "kubelet",
)
NODE2_VMNET = Setup(
    "vm-network",
    _node2_vmnet_ensure,
    _node2_vmnet_describe,
    _node2_vmnet_remove,
    lambda p: [str(p.vm_cni_data_dir)] if p.vm_cni_data_dir.exists() else [],
)


def components() -> list[Component | Setup]:
    """The components of the node this process serves, in start order (node 1: the whole cluster)."""
    if this_node().index == 1:
        return COMPONENTS
    return [NODE2_VMNET if n == NODE2_VMNET.name else BY_NAME[n] for n in NODE_COMPONENTS]


def by_name() -> dict[str, Component | Setup]:
    return {c.name: c for c in components()}


def processes() -> list[Component]:
    return [c for c in components() if isinstance(c, Component)]


def which_missing() -> list[str]:
    """Executables the cluster needs that are not installed."""
    p = Paths.default()
    missing = []
    for tool in (
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kubectl",
        "crictl",
        "containerd",
        "runc",
        "docker-registry",
        "libvirtd",
        "virtlogd",
        "skopeo",
        "umoci",
        "openssl",
        "ip",
    ):
        try:
            p.tool(tool)
        except FileNotFoundError:
            missing.append(tool)
    return missing


def is_root() -> bool:
    return os.geteuid() == 0


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
