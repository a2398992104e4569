"""Where the local cluster keeps everything: one state directory, runtime sockets, tool binaries."""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (REPO / "deploy" / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


VERSIONS = _versions()


def node_name() -> str:
    """The Node's name of the node this process serves (:func:`this_node`)."""
    return this_node().name


def first_node_name() -> str:
    """The first Node's name: the host name when it resolves to loopback (so the API server reaches
    the kubelet on 127.0.0.1 by name), else "localhost"."""
    name = socket.gethostname().lower()
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        addrs = set()
    if addrs and all(a.startswith("127.") or a == "::1" for a in addrs):
        return name
    return "localhost"


@dataclass(frozen=True)
class Paths:
    """Every path the cluster uses. There is one local cluster per machine (it owns fixed loopback
    ports), so its state lives outside any checkout: `state` holds pid files, logs, certificates and
    data; `run` (short, under /run) holds unix sockets. Every checkout that runs `up` gets the admin
    kubeconfig in its own `.local/kubeconfig`, so a second clone finds and reuses a running cluster."""

    state: Path
    run: Path

    @classmethod
    def default(cls) -> Paths:
        state = Path(os.environ.get("EDGEVIRT_LOCAL_STATE", "/var/lib/edgevirt/local-cluster"))
        run = Path(os.environ.get("EDGEVIRT_LOCAL_RUN", "/run/edgevirt-local"))
        return cls(state=state, run=run)

    # --- layout ---
    @property
    def pids(self) -> Path:
        return self.state / "pids"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def etc(self) -> Path:
        return self.state / "etc"

    @property
    def data(self) -> Path:
        return self.state / "data"

    @property
    def kubeconfig(self) -> Path:
        return REPO / ".local" / "kubeconfig"

    @property
    def containerd_sock(self) -> Path:
        return self.run / "containerd" / "containerd.sock"

    @property
    def cri_sock(self) -> Path:
        """edgevirt-cri's socket: kubelet's runtime and image endpoint."""
        return self.run / "edgevirt-cri" / "cri.sock"

    @property
    def cri_state(self) -> Path:
        """edgevirt-cri's ID -> backend records (kept across restarts of the shim)."""
        return self.data / "edgevirt-cri"

    @property
    def kubelet_dir(self) -> Path:
        return self.data / "kubelet"

    @property
    def cni_conf_dir(self) -> Path:
        return self.etc / "cni" / "net.d"

    @property
    def cni_data_dir(self) -> Path:
        return self.data / "cni"

    # --- the VM network (kvm pods: a macvtap NIC on VM_MASTER) ---
    @property
    def vm_cni_conf_dir(self) -> Path:
        """The VM network's CNI config dir (the kvm handler's, not containerd's)."""
        return self.etc / "cni-vm"

    @property
    def vm_cni_conflist(self) -> Path:
        return self.vm_cni_conf_dir / "10-edgevirt-vm.conflist"

    @property
    def vm_cni_data_dir(self) -> Path:
        """host-local leases and the macvtap plugin's attachment records of the VM network; `down`
        removes it (every attachment is gone with the pods' netns)."""
        return self.data / "cni-vm"

    @property
    def macvtap_sock(self) -> Path:
        """The socket of `macvtap daemon` (the plugin's default, so a conflist without daemonSocket
        reaches it too)."""
        return Path("/run/edgevirt/macvtap.sock")

    @property
    def macvtap_device_dir(self) -> Path:
        """Where the macvtap plugin makes the tap queues' char device nodes (its default deviceDir)."""
        return Path("/run/edgevirt/macvtap")

    @property
    def kvm_state(self) -> Path:
        """The kvm CRI handler's own records (sandboxes, containers)."""
        return self.data / "edgevirt-cri-kvm"

    @property
    def vm_state(self) -> Path:
        """VM disks and domains, shared with edgevirt-controller's node mode (EDGEVIRT_VM_STATE_DIR
        overrides)."""
        return Path(os.environ.get("EDGEVIRT_VM_STATE_DIR", "/var/lib/edgevirt/vm"))

    @property
    def bin(self) -> Path:
        return REPO / ".local" / "bin"

    def tool(self, name: str) -> str:
        """Absolute path of a tool: the project's pinned build first, then the system's PATH."""
        own = self.bin / name
        if own.exists():
            return str(own)
        found = shutil.which(name)
        if not found:
            raise FileNotFoundError(
                f"{name} not found in {self.bin} or on PATH: run deploy/install/install first"
            )
        return found


REGISTRY_ADDR = "127.0.0.1:5000"
APISERVER_PORT = 6443
ETCD_CLIENT = "http://127.0.0.1:2379"
ETCD_PEER = "http://127.0.0.1:2380"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/24"
POD_BRIDGE = "edgevirt0"
# The VM network: kvm pods get a macvtap on VM_MASTER, one end of a veth pair whose other end is
# VM_LAN_IF inside the netns VM_LAN_NETNS, which stands in for the node's LAN (tests ping VMs from it).
VM_MASTER = "evvm0"
VM_LAN_NETNS = "edgevirt-vmnet"
VM_LAN_IF = "eth0"
VM_CIDR = "10.245.0.0/24"
VM_GATEWAY = "10.245.0.1"
VM_RANGE = ("10.245.0.10", "10.245.0.129")  # node 1's share; node 2 hands out .130-.249
VM_IMAGE_ROOTS = ("/var/lib/edgevirt/images",)
# Upstream registries whose names the local registry stands in for (containerd mirrors them).
MIRRORED_REGISTRIES = ("docker.io", "registry.k8s.io", "quay.io", "ghcr.io", "gcr.io")
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"


# --- the second node (deploy/local/up --nodes 2, secondnode.py) ---
#: which node a process of the local cluster serves: unset or 1 the first, 2 the second (set by
#: secondnode.py for everything it runs inside the second node's namespaces)
NODE_ENV = "EDGEVIRT_LOCAL_NODE"
#: node 2's link to the host: veth NODE2_HOST_IF (host, NODE2_HOST_ADDR) <-> eth0 in netns NODE2_NETNS
NODE2_NETNS = "edgevirt-node2"
NODE2_HOST_IF = "evnode2"
NODE2_HOST_ADDR = "10.243.0.1"
NODE2_ADDR = "10.243.0.2"
NODE2_LINK_PREFIX = 30
NODE2_NAME = "edgevirt-local-2"


@dataclass(frozen=True)
class NodeIdentity:
    """What differs between the local cluster's nodes. Everything else (paths, ports, sockets) is the
    same string on both: the second node runs in its own network and mount namespaces, where the
    same paths are its own directories."""

    index: int
    name: str
    pod_cidr: str
    vm_range: tuple[str, str]
    #: where kubelet serves (the API server reaches it there, by name: /etc/hosts for node 2)
    kubelet_address: str
    #: kubelet's cgroupRoot: the nodes share the machine's cgroup hierarchies, not their pods' cgroups
    cgroup_root: str
    #: kubelet's --node-ip (None: kubelet's own choice)
    node_ip: str | None


def this_node() -> NodeIdentity:
    """The identity of the node this process serves (:data:`NODE_ENV`)."""
    if os.environ.get(NODE_ENV, "1") == "2":
        return NodeIdentity(
            index=2,
            name=NODE2_NAME,
            pod_cidr="10.244.1.0/24",
            vm_range=("10.245.0.130", "10.245.0.249"),
            kubelet_address=NODE2_ADDR,
            cgroup_root="/edgevirt-node2",
            node_ip=NODE2_ADDR,
        )
    return NodeIdentity(
        index=1,
        name=first_node_name(),
        pod_cidr=POD_CIDR,
        vm_range=VM_RANGE,
        kubelet_address="127.0.0.1",
        cgroup_root="/",
        node_ip=None,
    )
