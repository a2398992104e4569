"""Configuration files of the local cluster's components, written from the paths and constants."""

from __future__ import annotations

import json
from pathlib import Path

from .paths import (
    MIRRORED_REGISTRIES,
    PAUSE_IMAGE,
    POD_BRIDGE,
    REGISTRY_ADDR,
    VM_CIDR,
    VM_GATEWAY,
    VM_MASTER,
    Paths,
    this_node,
)

# Where the kvm handler looks for CNI plugins: macvtap (deploy/cni/install-plugin) first, then
# Debian's reference plugins (host-local).
VM_CNI_BIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
# hostDisk files of kvm pods: <root>/<namespace>/... (the VirtualMachine CRD names this root)
VM_HOST_DISK_ROOT = "/var/lib/edgevirt/hostdisks"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def registry(paths: Paths) -> Path:
    """Debian's docker-registry (distribution 2.8), on 127.0.0.1 only, storage in the state dir."""
    return _write(
        paths.etc / "registry.yml",
        f"""version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: {paths.data / "registry"}
  delete:
    enabled: true
http:
  addr: {REGISTRY_ADDR}
  headers:
    X-Content-Type-Options: [nosniff]
""",
    )


def containerd(paths: Paths, cni_bin_dirs: list[str]) -> Path:
    """containerd 1.6 with its CRI plugin: runc and kata runtime handlers, CNI from our conf dir,
    and a hosts.toml per mirrored registry that sends pulls to the local registry."""
    certs = paths.etc / "containerd" / "certs.d"
    local = f"""server = "http://{REGISTRY_ADDR}"

[host."http://{REGISTRY_ADDR}"]
  capabilities = ["pull", "resolve", "push"]
  skip_verify = true
"""
    _write(certs / REGISTRY_ADDR / "hosts.toml", local)
    for upstream in MIRRORED_REGISTRIES:
        server = "https://registry-1.docker.io" if upstream == "docker.io" else f"https://{upstream}"
        _write(
            certs / upstream / "hosts.toml",
            f"""server = "{server}"

[host."http://{REGISTRY_ADDR}"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
""",
        )
    cni_bins = ", ".join(json.dumps(d) for d in cni_bin_dirs)
    # containerd 1.6 takes one bin_dir; the first existing dir wins (ours first, Debian's after).
    return _write(
        paths.etc / "containerd" / "config.toml",
        f"""version = 2
root = "{paths.data / "containerd"}"
state = "{paths.run / "containerd-state"}"
oom_score = -999

[grpc]
  address = "{paths.containerd_sock}"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # These machines drop CAP_SYS_RESOURCE even for root: a negative oom_score_adj (containerd's
  # default -998 for sandboxes, kubelet's -997 for Guaranteed pods) fails with EACCES inside runc.
  # Restrict adjustments to [current, 1000] instead.
  restrict_oom_score_adj = true
  # cni bin dirs considered: [{cni_bins}]
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
      runtime_type = "io.containerd.kata.v2"
      privileged_without_host_devices = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin_dirs[0]}"
    conf_dir = "{paths.cni_conf_dir}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
""",
    )


def pod_network(paths: Paths) -> Path:
    """The network of containerd pods: a bridge on the host with host-local IPAM, no masquerade
    (pods reach each other and the node, nothing beyond)."""
    conf = {
        "cniVersion": "1.0.0",
        "name": "edgevirt-pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": POD_BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(paths.cni_data_dir / "host-local"),
                    "ranges": [[{"subnet": this_node().pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
        ],
    }
    return _write(paths.cni_conf_dir / "10-edgevirt-pods.conflist", json.dumps(conf, indent=2) + "\n")


def vm_network(paths: Paths) -> Path:
    """The network of kvm pods (used by the kvm CRI handler, not by containerd): a macvtap in bridge
    mode on VM_MASTER, whose LAN is the veth peer in VM_LAN_NETNS (the gateway); host-local IPAM
    with its leases and the plugin's records under the state dir, so `down` removes them. The MAC
    comes from the pod (capability "mac"), so a VM keeps its address across restarts."""
    data = paths.vm_cni_data_dir
    start, end = this_node().vm_range  # the nodes share the LAN: each hands out its own addresses
    conf = {
        "cniVersion": "1.0.0",
        "name": "edgevirt-vm",
        "plugins": [
            {
                "type": "macvtap",
                "master": VM_MASTER,
                "mode": "bridge",
                "capabilities": {"mac": True},
                "daemonSocket": str(paths.macvtap_sock),
                "deviceDir": str(paths.macvtap_device_dir),
                "stateDir": str(data / "macvtap"),
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(data / "host-local"),
                    "ranges": [
                        [
                            {
                                "subnet": VM_CIDR,
                                "rangeStart": start,
                                "rangeEnd": end,
                                "gateway": VM_GATEWAY,
                            }
                        ]
                    ],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
        ],
    }
    return _write(paths.vm_cni_conflist, json.dumps(conf, indent=2) + "\n")


def kubelet(paths: Paths, node: str, runtime_endpoint: Path | None = None) -> Path:
    """kubelet: cgroupfs driver (no systemd here), cgroup v1 allowed, swap tolerated, served on
    127.0.0.1 only (the second node: on its own address, in its own netns), x509 + webhook
    authn/authz against the API server. Its CRI endpoint is `runtime_endpoint` (the cluster passes
    edgevirt-cri's socket), containerd's by default."""
    endpoint = runtime_endpoint or paths.containerd_sock
    node = this_node()
    return _write(
        paths.etc / "kubelet.yaml",
        f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {node.kubelet_address}
cgroupRoot: {node.cgroup_root}
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
readOnlyPort: 0
enableServer: true
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
memorySwap: {{}}
containerRuntimeEndpoint: unix://{endpoint}
staticPodPath: ""
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {paths.pki / "ca.crt"}}}
authorization:
  mode: Webhook
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
podPidsLimit: -1
maxPods: 110
syncFrequency: 10s
nodeStatusUpdateFrequency: 10s
fileCheckFrequency: 10s
shutdownGracePeriod: 0s
localStorageCapacityIsolation: true
rotateCertificates: false
serverTLSBootstrap: false
tlsCertFile: {paths.pki / "kubelet-serving.crt"}
tlsPrivateKeyFile: {paths.pki / "kubelet-serving.key"}
""",
    )
