"""End to end on two nodes: ``deploy/local/up --nodes 2`` adds a second Kubernetes node on this
machine (its own namespaces, containerd, libvirtd, edgevirt-cri from the node installer, kubelet),
the installed DaemonSets come to it by themselves, and VirtualMachines behave across the nodes:
placement and pinning, VM-to-VM traffic over the shared VM LAN, the whole VM life on node 2
(console, logs, exec, pause, hot-plug), one node's agent refused on the other node's VM, node
loss and return with the same QEMU, drain with the VM waiting for its node.

The module's fixture removes the second node at the end (``up --nodes 1``) and checks that nothing
of it is left on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import REPO
from helpers.attaching import attach_and_type
from helpers.waiting import wait_for
from localcluster import secondnode
from localcluster.paths import NODE2_ADDR, NODE2_NAME, VM_LAN_NETNS, Paths

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]

VENV_BIN = Path(sys.executable).parent
UP = REPO / "deploy" / "local" / "up"


def _up(*args: str, timeout: float = 1200) -> None:
    r = subprocess.run([str(UP), *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (
        f"deploy/local/up {' '.join(args)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    )


@pytest.fixture(scope="module")
def two(cluster, edgevirt_installed, vm_image):
    """The cluster with its second node Ready and edgevirt's node agent running there."""
    k = cluster
    for mode in ("cluster", "node"):
        edgevirt_installed.require(mode)
    try:
        _up("--nodes", "2")
        wait_for(
            f"edgevirt.io/kvm-handler=true on {NODE2_NAME} (the labeller's probe)",
            lambda: (
                k.kubectl_json("get", "node", NODE2_NAME)["metadata"]["labels"].get("edgevirt.io/kvm-handler")
                == "true"
            ),
            240,
            2,
        )
        wait_for(
            f"edgevirt-node Ready on {NODE2_NAME}", lambda: _agent_pod(k, NODE2_NAME, ready=True), 240, 2
        )
        with k.namespace("two-nodes") as ns:
            try:
                yield k, ns
            finally:
                k.kubectl("uncordon", NODE2_NAME, check=False)
                if not secondnode.process("kubelet").running():
                    _up("--nodes", "2")  # a failed node-loss test: bring it back so its VMs can go
                k.kubectl("delete", "vm", "--all", "-n", ns, "--wait=false", check=False)
                wait_for(
                    "VMs deleted (finalizers run)",
                    lambda: not k.kubectl_json("get", "vm", "-n", ns)["items"],
                    240,
                )
    finally:
        _up("--nodes", "1")
        assert secondnode.leftovers() == []
        assert k.kubectl("get", "node", NODE2_NAME, check=False).returncode != 0


def _agent_pod(k, node: str, ready: bool = False) -> dict | None:
    pods = k.kubectl_json(
        "get", "pods", "-n", "edgevirt-system", "-l", "app.kubernetes.io/name=edgevirt-node",
        "--field-selector", f"spec.nodeName={node}",
    )["items"]  # fmt: skip
    for p in pods:
        conds = {c["type"]: c["status"] for c in p["status"].get("conditions", [])}
        if not ready or conds.get("Ready") == "True":
            return p
    return None


def _apply_vm(k, ns: str, name: str, mac: str, image: str, **spec) -> None:
    vm = {
        "apiVersion": "edgevirt.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {
            "running": True,
            "memory": "256Mi",
            "image": image,
            "networks": [{"name": "default", "mac": mac}],
            **spec,
        },
    }
    k.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(vm))


def _vm(k, ns: str, name: str) -> dict:
    return k.kubectl_json("get", "vm", name, "-n", ns)


def _status(k, ns: str, name: str) -> str:
    return _vm(k, ns, name).get("status", {}).get("printableStatus", "")


def _running(k, ns: str, *names: str) -> bool:
    return all(_status(k, ns, n) == "Running" and _vm(k, ns, n)["status"].get("ipAddresses") for n in names)


def _lan_ping(ip: str) -> bool:
    r = subprocess.run(
        ["ip", "netns", "exec", VM_LAN_NETNS, "ping", "-c", "1", "-W", "2", ip],
        capture_output=True,
        timeout=30,
    )
    return r.returncode == 0


def _qemu_of(mac: str) -> int | None:
    """The pid of the QEMU whose NIC has this MAC (any node's: the nodes share the pid namespace)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline.split(b"\0")[0] and mac.encode() in cmdline:
                return int(proc.name)
    return None


MAC_A, MAC_B = "02:00:00:02:00:0a", "02:00:00:02:00:0b"


def test_the_second_node_joins_as_a_real_node(two):
    k, _ = two
    node = k.kubectl_json("get", "node", NODE2_NAME)
    addrs = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addrs["InternalIP"] == NODE2_ADDR and addrs["Hostname"] == NODE2_NAME
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("edgevirt://")
    assert node["spec"].get("podCIDR") is None or node["spec"]["podCIDR"] != "10.244.0.0/24"
    agent = _agent_pod(k, NODE2_NAME, ready=True)
    assert agent is not None and agent["status"]["hostIP"] == NODE2_ADDR
    # the API server reaches its kubelet (logs go through it)
    r = k.kubectl("logs", "-n", "edgevirt-system", agent["metadata"]["name"], "-c", "controller", "--tail=5")
    assert r.returncode == 0


def test_vms_on_two_nodes(two, vm_image, tmp_path):
    k, ns = two
    one = k.node
    _apply_vm(k, ns, "a", MAC_A, vm_image, nodeName=one)
    _apply_vm(k, ns, "b", MAC_B, vm_image, nodeName=NODE2_NAME)
    _apply_vm(k, ns, "c", "02:00:00:02:00:0c", vm_image, running=False)  # placed by the scheduler
    wait_for("a and b Running", lambda: _running(k, ns, "a", "b"), 300, 2)
    a, b = _vm(k, ns, "a")["status"], _vm(k, ns, "b")["status"]
    assert (a["nodeName"], b["nodeName"]) == (one, NODE2_NAME)
    ip_a, ip_b = a["ipAddresses"][0], b["ipAddresses"][0]
    wait_for(
        "both guests up", lambda: all("EDGEVIRT-GUEST: up" in _console(k, ns, v) for v in ("a", "b")), 180, 2
    )

    # --- the VM LAN spans the nodes: the LAN reaches both, and each VM the other
    assert wait_for(f"LAN -> {ip_a}", lambda: _lan_ping(ip_a), 60, 1)
    assert wait_for(f"LAN -> {ip_b}", lambda: _lan_ping(ip_b), 60, 1)
    for pod, target in (("b-vm", ip_a), ("a-vm", ip_b)):
        r = k.kubectl(
            "exec", pod, "-n", ns, "--", "ping", "-c", "3", "-W", "2", target, check=False, timeout=90
        )
        assert r.returncode == 0 and "0% packet loss" in r.stdout, (pod, target, r.stdout, r.stderr)

    # --- the whole VM life on node 2: console (attach), pause, hot-plug, stop/start on the same node
    vm_env = {**k.env, "PATH": f"{VENV_BIN}:{k.env['PATH']}"}

    def vm_cmd(*args: str) -> None:
        r = subprocess.run(
            ["kubectl", "vm", *args, "-n", ns], env=vm_env, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr

    out = attach_and_type(["kubectl", "vm", "console", "b", "-n", ns], "on-node-2", env=vm_env)
    assert "EDGEVIRT-GUEST: echo on-node-2" in out, out
    vm_cmd("pause", "b")
    wait_for("b Paused", lambda: _status(k, ns, "b") == "Paused", 120)
    vm_cmd("unpause", "b")
    wait_for("b Running again", lambda: _status(k, ns, "b") == "Running", 120)
    vm_cmd("mount", "b", "--volume-name", "data", "--empty-disk", "16Mi")
    wait_for(
        "data Mounted on b",
        lambda: any(
            v["name"] == "data" and v["phase"] == "Mounted"
            for v in _vm(k, ns, "b")["status"].get("volumes", [])
        ),
        180,
    )
    target = next(v["target"] for v in _vm(k, ns, "b")["status"]["volumes"] if v["name"] == "data")
    wait_for(
        f"b's guest sees {target}", lambda: f"EDGEVIRT-GUEST: block+ {target}" in _console(k, ns, "b"), 120
    )
    vm_cmd("unmount", "b", "--volume-name", "data")
    wait_for(
        "data detached",
        lambda: not any(v["name"] == "data" for v in _vm(k, ns, "b")["status"].get("volumes", [])),
        180,
    )

    # --- placement: c goes where the scheduler puts it, and stays there across stop/start
    vm_cmd("start", "c")
    wait_for("c Running", lambda: _running(k, ns, "c"), 300, 2)
    placed = _vm(k, ns, "c")["status"]["nodeName"]
    assert placed in (one, NODE2_NAME)
    vm_cmd("stop", "c")
    wait_for("c Stopped", lambda: _status(k, ns, "c") == "Stopped", 180)
    vm_cmd("start", "c")
    wait_for("c Running again", lambda: _running(k, ns, "c"), 300, 2)
    assert _vm(k, ns, "c")["status"]["nodeName"] == placed
    pod_c = k.kubectl_json("get", "pod", "c-vm", "-n", ns)
    assert pod_c["spec"]["nodeName"] == placed
    vm_cmd("stop", "c")

    # --- one node's agent, one node's VMs: node 2's own agent token may not write a's status
    agent = _agent_pod(k, NODE2_NAME, ready=True)
    assert agent is not None
    kc = k.token_kubeconfig("edgevirt-node", _agent_token(agent), tmp_path / "node2-agent.kubeconfig")
    body = json.dumps({"status": {"accel": "tcg"}})
    for vm, allowed in (("b", True), ("a", False)):
        r = subprocess.run(
            [str(k.paths.tool("kubectl")), "--kubeconfig", str(kc), "patch", "vm", vm, "-n", ns,
             "--subresource=status", "--type=merge", "-p", body],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if allowed:
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode != 0 and f"edgevirt-node of node {NODE2_NAME} may write only" in r.stderr, (
                r.stderr
            )


def _agent_token(pod: dict) -> str:
    """The service account token kubelet mounted into node 2's edgevirt-node pod (its real
    credential), read in node 2's mount namespace (the token's tmpfs is mounted there only)."""
    inside = Paths.default().kubelet_dir / "pods" / pod["metadata"]["uid"] / "volumes"
    r = subprocess.run(
        ["nsenter", f"--mount={secondnode.MNTNS}", "--",
         "sh", "-c", f"cat {inside}/kubernetes.io~projected/*/token"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip(), f"no projected token under {inside} on node 2: {r.stderr}"
    return r.stdout.strip()


def _console(k, ns: str, vm: str) -> str:
    return k.kubectl("logs", f"{vm}-vm", "-n", ns, check=False).stdout


def test_node_loss_and_return_keep_the_same_qemu(two):
    k, ns = two
    wait_for("b Running", lambda: _running(k, ns, "b"), 300, 2)
    pod_uid = k.kubectl_json("get", "pod", "b-vm", "-n", ns)["metadata"]["uid"]
    ip = _vm(k, ns, "b")["status"]["ipAddresses"][0]
    qemu = _qemu_of(MAC_B)
    assert qemu is not None
    assert secondnode.process("kubelet").stop()
    # the node lifecycle controller declares the node unreachable after its grace period
    wait_for("b NodeUnreachable", lambda: _status(k, ns, "b") == "NodeUnreachable", 180, 2)
    ready = next(c for c in _vm(k, ns, "b")["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NodeUnreachable" and f"node {NODE2_NAME} is unreachable" in ready["message"]
    assert "not started elsewhere" in ready["message"]
    assert [
        p["metadata"]["uid"]
        for p in k.kubectl_json("get", "pods", "-n", ns, "-l", "edgevirt.io/vm=b")["items"]
    ] == [pod_uid]
    # the guest runs on: same QEMU, still answering on the LAN
    assert _qemu_of(MAC_B) == qemu and _lan_ping(ip)
    _up("--nodes", "2")  # kubelet back
    wait_for("b Running again", lambda: _running(k, ns, "b"), 180, 2)
    assert k.kubectl_json("get", "pod", "b-vm", "-n", ns)["metadata"]["uid"] == pod_uid
    assert _qemu_of(MAC_B) == qemu


def test_drain_stops_the_vm_and_it_waits_for_its_node(two):
    k, ns = two
    wait_for("b Running", lambda: _running(k, ns, "b"), 300, 2)
    seen: set[str] = set()
    most = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            pods = k.kubectl_json("get", "pods", "-n", ns, "-l", "edgevirt.io/vm=b")["items"]
            most[0] = max(most[0], len(pods))
            seen.add(_status(k, ns, "b"))
            stop.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        r = k.kubectl("drain", NODE2_NAME, "--ignore-daemonsets", "--timeout=180s", check=False, timeout=240)
        assert r.returncode == 0, r.stderr
        wait_for("b WaitingForNode", lambda: _status(k, ns, "b") == "WaitingForNode", 180, 1)
        ready = next(c for c in _vm(k, ns, "b")["status"]["conditions"] if c["type"] == "Ready")
        assert f"node {NODE2_NAME} is cordoned" in ready["message"] and "kubectl uncordon" in ready["message"]
        assert _vm(k, ns, "b")["status"]["nodeName"] == NODE2_NAME
        k.kubectl("uncordon", NODE2_NAME)
        wait_for("b Running on node 2 again", lambda: _running(k, ns, "b"), 300, 2)
    finally:
        stop.set()
        watcher.join(10)
    assert _vm(k, ns, "b")["status"]["nodeName"] == NODE2_NAME
    assert most[0] == 1, "two pods of one VM existed at once"
    assert "Unschedulable" not in seen and "Failed" not in seen, seen
    events = k.kubectl_json("get", "events", "-n", ns, "--field-selector", "involvedObject.name=b")["items"]
    assert "Stopping" in [e["reason"] for e in events]
    assert not [e["message"] for e in events if e["reason"] == "Unschedulable"]


def test_a_node_without_the_kvm_handler_gets_no_vm_pod(two, vm_image):
    """Node 2 labelled as the labeller labels a node whose edgevirt-cri serves no kvm handler
    (edgevirt.io/kvm-handler=false; its next pass, minutes away, would write the truth again): the
    scheduler places a VM on node 1 only, and a VM pinned to node 2 waits, saying why."""
    k, ns = two
    label = "edgevirt.io/kvm-handler"
    k.kubectl("label", "node", NODE2_NAME, f"{label}=false", "--overwrite")
    try:
        _apply_vm(k, ns, "free", "02:00:00:02:00:0d", vm_image)
        _apply_vm(k, ns, "pinned", "02:00:00:02:00:0e", vm_image, nodeName=NODE2_NAME)
        wait_for("free Running", lambda: _running(k, ns, "free"), 300, 2)
        assert _vm(k, ns, "free")["status"]["nodeName"] == k.node
        wait_for("pinned Unschedulable", lambda: _status(k, ns, "pinned") == "Unschedulable", 120, 1)
        ready = next(c for c in _vm(k, ns, "pinned")["status"]["conditions"] if c["type"] == "Ready")
        assert f"pinned to node {NODE2_NAME}" in ready["message"], ready
        assert "node affinity/selector" in ready["message"] or "NodeAffinity" in ready["message"], ready
        assert k.kubectl_json("get", "pod", "pinned-vm", "-n", ns)["spec"].get("nodeName") is None
    finally:
        k.kubectl("label", "node", NODE2_NAME, f"{label}=true", "--overwrite")
        k.kubectl("delete", "vm", "free", "pinned", "-n", ns, "--wait=false", check=False)
    # the label is back (the labeller would write it too); both VMs go
    wait_for(
        "free and pinned gone",
        lambda: (
            not any(
                v["metadata"]["name"] in ("free", "pinned")
                for v in k.kubectl_json("get", "vm", "-n", ns)["items"]
            )
        ),
        180,
    )
