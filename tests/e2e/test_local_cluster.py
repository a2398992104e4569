"""End to end on the real local cluster: the node is Ready; a busybox pod pulled from the local
registry runs under runc, its logs and exec work, and deleting it leaves no sandbox, netns or mount;
the VM network (evvm0 <-> edgevirt-vmnet) is up and a macvtap made from its conflist reaches the
LAN netns; up is idempotent; down after a crashed component still leaves the machine clean."""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from helpers.netns import sh
from helpers.waiting import wait_for
from localcluster.components import cri_enabled

pytestmark = pytest.mark.cluster

POD_YAML = """apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: e2e-busybox}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox:latest
    imagePullPolicy: Always
    command: ["sh", "-c", "echo started {token}; sleep 3600"]
"""


def test_node_is_ready(cluster):
    out = cluster.kubectl("get", "nodes", "--no-headers").stdout.split()
    assert out[0] == cluster.node and out[1] == "Ready", out
    node = cluster.kubectl_json("get", "node", cluster.node)
    # kubelet's CRI endpoint is edgevirt-cri (runtime_name "edgevirt") unless the cluster was brought
    # up with EDGEVIRT_LOCAL_CRI=containerd (straight to containerd). A reused cluster may have been
    # started under the other setting, so the kubelet config in effect decides.
    endpoint = cluster.kubelet_runtime_endpoint()
    via_cri = endpoint == f"unix://{cluster.paths.cri_sock}"
    if cluster.started_here:
        assert via_cri == cri_enabled(), endpoint
    runtime = node["status"]["nodeInfo"]["containerRuntimeVersion"]
    assert runtime.startswith("edgevirt://" if via_cri else "containerd://"), runtime


def _netns_of(cluster, pod_id: str) -> str:
    info = json.loads(cluster.crictl("inspectp", pod_id).stdout)["info"]
    for ns in info["runtimeSpec"]["linux"]["namespaces"]:
        if ns["type"] == "network":
            return ns["path"]
    raise AssertionError("sandbox has no network namespace")


def test_busybox_pod_runs_logs_execs_and_leaves_nothing(cluster):
    name = f"e2e-busybox-{uuid.uuid4().hex[:6]}"
    token = uuid.uuid4().hex
    # A real pull: drop any cached copy so containerd must fetch from the local registry.
    cluster.crictl("rmi", "docker.io/library/busybox:latest", check=False)
    reg_log = cluster.paths.logs / "registry.log"
    reg_before = reg_log.stat().st_size
    cluster.kubectl("apply", "-f", "-", input=POD_YAML.format(name=name, token=token))
    try:
        cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=180s", timeout=200)
        pod = cluster.kubectl_json("get", "pod", name)
        assert pod["status"]["phase"] == "Running"
        # The pull went to the local registry (containerd's mirror of docker.io).
        with open(reg_log) as f:
            f.seek(reg_before)
            assert "library/busybox/manifests/latest" in f.read()
        # Runs under runc.
        pods = json.loads(cluster.crictl("pods", "--name", name, "-o", "json").stdout)["items"]
        assert len(pods) == 1
        pod_id = pods[0]["id"]
        info = json.loads(cluster.crictl("inspectp", pod_id).stdout)["info"]
        assert info["runtimeType"] == "io.containerd.runc.v2", info.get("runtimeType")
        netns = _netns_of(cluster, pod_id)
        assert Path(netns).exists()
        # logs and exec.
        logs = wait_for("the pod's output", lambda: cluster.kubectl("logs", name, check=False).stdout, 60)
        assert f"started {token}" in logs
        out = cluster.kubectl("exec", name, "--", "sh", "-c", "echo exec-$((6*7)); cat /proc/1/cmdline")
        assert "exec-42" in out.stdout
        assert "sleep" in out.stdout
    finally:
        cluster.kubectl("delete", "pod", name, "--wait=true", "--timeout=120s", check=False, timeout=150)
    # kubelet's garbage collector removes the dead sandbox within its one-minute period.
    wait_for(
        "the sandbox to be removed",
        lambda: not json.loads(cluster.crictl("pods", "--name", name, "-o", "json").stdout)["items"],
        150,
        2,
    )
    assert not Path(netns).exists(), f"netns {netns} left behind"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert pod_id not in mounts, "a mount of the deleted sandbox is left"
    assert pod["metadata"]["uid"] not in mounts, "a volume mount of the deleted pod is left"


VM_MASTER, VM_LAN_NETNS, VM_LAN_BRIDGE, VM_GATEWAY = "evvm0", "edgevirt-vmnet", "lan0", "10.245.0.1"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return sh("ip", *args, check=False)


def _vm_network_present() -> dict[str, bool]:
    return {
        "link": _ip("link", "show", "dev", VM_MASTER).returncode == 0,
        "netns": Path("/run/netns", VM_LAN_NETNS).exists(),
    }


def _assert_vm_network_up(cluster) -> None:
    master = json.loads(_ip("-d", "-j", "link", "show", "dev", VM_MASTER).stdout)[0]
    assert master["linkinfo"]["info_kind"] == "veth" and "UP" in master["flags"], master
    assert not [a for a in master.get("addr_info", []) if a.get("family") == "inet"], "evvm0 has no IP"
    # The gateway sits on the LAN bridge, with node 1's side of the veth as one of its ports.
    addrs = _ip("netns", "exec", VM_LAN_NETNS, "ip", "-4", "addr", "show", "dev", VM_LAN_BRIDGE).stdout
    assert f"inet {VM_GATEWAY}/24" in addrs, addrs
    port = json.loads(_ip("-n", VM_LAN_NETNS, "-j", "link", "show", "dev", "eth0").stdout)[0]
    assert port.get("master") == VM_LAN_BRIDGE and "UP" in port["flags"], port
    lo = _ip("netns", "exec", VM_LAN_NETNS, "ip", "link", "show", "lo").stdout
    assert "UP" in lo, lo
    ping = _ip("netns", "exec", VM_LAN_NETNS, "busybox", "ping", "-c1", "-W2", VM_GATEWAY)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert cluster.paths.vm_cni_conflist.exists()
    assert cluster.paths.macvtap_sock.is_socket()


def test_vm_network_is_up_and_shown_by_status(cluster):
    _assert_vm_network_up(cluster)
    out = subprocess.run(
        [str(Path(__file__).resolve().parents[2] / "deploy/local/status")],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "set up (evvm0 <-> edgevirt-vmnet/eth0 in lan0 10.245.0.1/24)" in lines["vm-network"], out
    assert "running" in lines["macvtap-daemon"], out


def _arp_through_tap(node: str, mac: str, ip: str, target: str, timeout: float = 5.0) -> str | None:
    """Be the guest: write an ARP request for `target` into the macvtap's tap queue (what QEMU does
    with the fd) and read the reply; returns the MAC that answered, None on timeout."""
    mac_b, ip_b = bytes.fromhex(mac.replace(":", "")), socket.inet_aton(ip)
    frame = b"\xff" * 6 + mac_b + b"\x08\x06"
    frame += struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac_b + ip_b + b"\0" * 6 + socket.inet_aton(target)
    fd = os.open(node, os.O_RDWR | os.O_NONBLOCK)
    try:
        flags = struct.unpack("16sH", fcntl.ioctl(fd, 0x800454D2, b"\0" * 18))[1]  # TUNGETIFF
        hdr = 0
        if flags & 0x4000:  # IFF_VNET_HDR: every frame carries a virtio-net header first
            hdr = struct.unpack("i", fcntl.ioctl(fd, 0x800454D7, b"\0" * 4))[0]  # TUNGETVNETHDRSZ
        deadline = time.monotonic() + timeout
        os.write(fd, b"\0" * hdr + frame)
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 0.5)[0]:
                os.write(fd, b"\0" * hdr + frame)
                continue
            got = os.read(fd, 65536)[hdr:]
            is_reply = got[12:14] == b"\x08\x06" and got[20:22] == b"\0\x02"  # ARP, op 2
            if is_reply and got[28:32] == socket.inet_aton(target):
                return ":".join(f"{b:02x}" for b in got[22:28])
        return None
    finally:
        os.close(fd)


def test_macvtap_from_the_vm_conflist_reaches_the_lan_netns(cluster):
    """What the kvm handler does for a VM pod, minus QEMU: CNI ADD of the cluster's VM network
    (macvtap plugin through its daemon, host-local IPAM) into a netns; a frame written to the tap
    node goes out on evvm0 and the LAN netns (edgevirt-vmnet) answers; DEL gives everything back."""
    conflist = json.loads(cluster.paths.vm_cni_conflist.read_text())
    plugin = conflist["plugins"][0]
    records = Path(plugin["stateDir"]) / conflist["name"]
    cnitool = cluster.paths.tool("cnitool")
    ns = f"evtest-{uuid.uuid4().hex[:8]}"
    mac = "02:00:0a:f5:00:99"
    assert _ip("netns", "add", ns).returncode == 0
    env = {
        **os.environ,
        "NETCONFPATH": str(cluster.paths.vm_cni_conf_dir),
        "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
        "CAP_ARGS": json.dumps({"mac": mac}),
    }
    netns = f"/run/netns/{ns}"
    before = set(records.glob("*/*.json"))
    try:
        add = subprocess.run(
            [cnitool, "add", conflist["name"], netns], env=env, capture_output=True, text=True, timeout=60
        )
        assert add.returncode == 0, add.stdout + add.stderr
        result = json.loads(add.stdout)
        ip = result["ips"][0]["address"].split("/")[0]
        assert ip.startswith("10.245.0."), result
        assert any(i.get("mac") == mac and i.get("sandbox") == netns for i in result["interfaces"]), result
        link = json.loads(_ip("-n", ns, "-d", "-j", "link", "show", "dev", "eth0").stdout)[0]
        assert link["linkinfo"]["info_kind"] == "macvtap" and link["address"] == mac, link
        [record] = set(records.glob("*/*.json")) - before
        node = json.loads(record.read_text())["devicePath"]
        assert node.startswith(str(cluster.paths.macvtap_device_dir) + "/")
        lan = json.loads(_ip("-n", VM_LAN_NETNS, "-j", "link", "show", "dev", "eth0").stdout)[0]
        lan_mac = lan["address"]
        assert _arp_through_tap(node, mac, ip, VM_GATEWAY) == lan_mac
        daemon_log = (cluster.paths.logs / "macvtap-daemon.log").read_text()
        assert "ADD " in daemon_log, "the ADD did not go through macvtap daemon"
    finally:
        dele = subprocess.run(
            [cnitool, "del", conflist["name"], netns], env=env, capture_output=True, text=True, timeout=60
        )
        _ip("netns", "delete", ns)
    assert dele.returncode == 0, dele.stdout + dele.stderr
    assert not Path(node).exists(), "the tap device node was left"
    assert not record.exists(), "the attachment record was left"
    assert not (Path(plugin["ipam"]["dataDir"]) / conflist["name"] / ip).exists(), "the lease was left"


def _pids(cluster) -> dict[str, int]:
    out = {}
    for pidfile in cluster.paths.pids.glob("*.pid"):
        out[pidfile.stem] = json.loads(pidfile.read_text())["pid"]
    return out


def test_up_is_idempotent(cluster):
    before = _pids(cluster)
    res = cluster.up()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "started (pid" not in res.stdout, res.stdout
    assert _pids(cluster) == before


def test_down_is_clean_after_a_component_was_killed_and_up_restores(cluster):
    """kill -9 a component, down must still leave nothing; up brings everything back."""
    pid = _pids(cluster)["kube-scheduler"]
    os.kill(pid, signal.SIGKILL)
    wait_for("the scheduler to die", lambda: not Path(f"/proc/{pid}").exists(), 10, 0.1)
    res = cluster.down()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "nothing of the cluster is left running" in res.stdout
    for name in ("kube-apiserver", "etcd", "kubelet", "containerd", "registry"):
        assert not (cluster.paths.pids / f"{name}.pid").exists(), name
    leftover = [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(cluster.paths.state) in line or str(cluster.paths.run) in line
    ]
    assert not leftover, leftover
    netns_dir = Path("/run/netns")
    pod_netns = [n for n in os.listdir(netns_dir) if n.startswith("cni-")] if netns_dir.exists() else []
    assert not pod_netns, pod_netns
    # The VM network is gone with its leases, and so is the macvtap daemon's socket.
    assert _vm_network_present() == {"link": False, "netns": False}
    assert not cluster.paths.vm_cni_data_dir.exists()
    assert not cluster.paths.macvtap_sock.exists()
    assert not (cluster.paths.pids / "macvtap-daemon.pid").exists()
    # A second down is harmless.
    res = cluster.down()
    assert res.returncode == 0, res.stdout + res.stderr
    # Bring it back for the tests that follow.
    res = cluster.up()
    assert res.returncode == 0, res.stdout + res.stderr
    out = cluster.kubectl("get", "nodes", "--no-headers").stdout.split()
    assert out[1] == "Ready"
    _assert_vm_network_up(cluster)
