"""Edge autonomy through kubelet: kvm pods whose VMs come back, and boot, with the control plane and
the registry out of reach. kubelet -> the cluster's edgevirt-cri -> the kvm handler -> libvirt, no
controller. (The same handler logic at the CRI level, on a private shim of the checkout:
test_cri_kvm_offline.py. These pass once the cluster's node side runs this code.)

* restartPolicy Always: QEMU killed (kill -9) while the API server and the registry are stopped:
  kubelet alone creates a new container in the same sandbox; the same VM comes back (the guest reads
  what its earlier boot wrote to its data disk), with the same IP, answering ping from the VM network;
  once the API server is back the pod shows restartCount 1 and the exit code of the kill.
* restartPolicy OnFailure and a guest power-off (exit 0, Completed): the pod Succeeded, no restart;
  restartPolicy Always and a power-off: the VM comes back on the pod's same root disk.
* a pod whose image only containerd's store holds (a name no registry has) starts with the registry
  stopped (the disk is taken out of containerd's content store);
* an image missing everywhere fails with an event naming the registry; an image name that resolves
  only through containerd's hosts.toml mirror config boots.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.vm_env import qemu_pid, vm_domains
from helpers.waiting import wait_for as wait
from localcluster.components import BY_NAME
from test_kvm_isolation import create_pod, disk_sources, pod_manifest, vm_state, wait_event

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

VM_LAN = "edgevirt-vmnet"
TOKEN = re.compile(r"EDGEVIRT-GUEST: data vdb had (\S+) now (boot-[0-9a-f]+)")
MIRRORED = "quay.io/vm/test-disk:1"  # containerd's hosts.toml for quay.io mirrors it to the local registry


@pytest.fixture
def ns(cluster) -> Iterator[str]:
    """A fresh namespace; its pods deleted and its VM disks removed at the end."""
    from cri_shim.vm.disks import DiskManager

    with cluster.namespace("e2e-edge", drop_vm_finalizers=True) as name:
        try:
            yield name
        finally:
            cluster.kubectl("delete", "pods", "--all", "-n", name, "--wait=true", "--timeout=120s",
                            check=False, timeout=150)  # fmt: skip
            disks = DiskManager(vm_state(cluster))
            for owner_ns, uid in disks.vm_disk_owners():
                if owner_ns == name:
                    disks.remove_vm_disks(owner_ns, uid)


@contextlib.contextmanager
def outage(cluster, *components: str) -> Iterator[None]:
    """Stop the cluster's ``components`` (e.g. kube-apiserver, registry); start them again after."""
    for name in components:
        assert BY_NAME[name].process(cluster.paths).stop(), f"{name} was not running"
    try:
        yield
    finally:
        for name in components:
            res = cluster.up(name)
            assert res.returncode == 0, res.stdout + res.stderr
        wait(
            "the API server",
            lambda: cluster.kubectl("get", "--raw", "/readyz", check=False).returncode == 0,
            120,
        )


def pings(ip: str) -> bool:
    r = subprocess.run(
        ["ip", "netns", "exec", VM_LAN, "ping", "-c", "2", "-W", "2", ip], capture_output=True, timeout=60
    )
    return r.returncode == 0


def shim(cluster):
    """crictl on kubelet's endpoint (works with the API server away)."""
    return cluster.cri(via_shim=True)


def logs(cluster, cid: str) -> str:
    r = shim(cluster)("logs", cid, check=False)
    return r.stdout if r.returncode == 0 else ""


def running_container(cluster, sid: str, other_than: str) -> str | None:
    """The ID of the running container of sandbox ``sid`` other than ``other_than``, if any."""
    out = shim(cluster).json("ps", "--pod", sid, "--state", "Running", "-o", "json")["containers"]
    return next((c["id"] for c in out if c["id"] != other_than), None)


def first_boot(cluster, ns: str, name: str) -> tuple[dict, str, str]:
    """(pod, sandbox ID, container ID) once the pod is Ready and its guest is up."""
    cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "-n", ns, "--timeout=300s", timeout=320)
    pod = cluster.kubectl_json("get", "pod", name, "-n", ns)
    cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    sid = shim(cluster).json("pods", "--namespace", ns, "--name", name, "-o", "json")["items"][0]["id"]
    wait("the guest to come up", lambda: "EDGEVIRT-GUEST: up" in logs(cluster, cid), 300, 2)
    return pod, sid, cid


def test_always_brings_a_killed_vm_back_with_the_api_server_and_the_registry_stopped(cluster, vm_image, ns):
    vm_uid = str(uuid.uuid4())
    ann = {
        "edgevirt.io/vm-uid": vm_uid,
        "edgevirt.io/vm-name": "edge",
        "edgevirt.io/image": vm_image,
        "edgevirt.io/volumes": json.dumps([{"name": "data", "emptyDisk": {"capacity": "16Mi"}}]),
    }
    create_pod(cluster, ns, pod_manifest("edge", vm_image, ann, restartPolicy="Always"))
    pod, sid, cid0 = first_boot(cluster, ns, "edge")
    ip = pod["status"]["podIP"]
    (_, token0) = TOKEN.search(logs(cluster, cid0)).groups()
    dom0 = f"edgevirt-{cid0[:20]}"
    pid0 = qemu_pid(dom0)
    assert pid0
    with outage(cluster, "kube-apiserver", "registry"):
        os.kill(pid0, signal.SIGKILL)
        # kubelet alone (crash-loop back-off: 10 s first): a new container in the same sandbox
        cid1 = wait("kubelet to start the VM again", lambda: running_container(cluster, sid, cid0), 240, 2)
        boot = wait(
            "the same VM to boot again",
            lambda: (t := logs(cluster, cid1)) and "EDGEVIRT-GUEST: up" in t and TOKEN.search(t),
            300,
            2,
        )
        assert boot.group(1) == token0  # what the first boot wrote to the VM's data disk
        assert f"EDGEVIRT-GUEST: ip eth0 {ip}/24" in logs(cluster, cid1) and pings(ip)
        dom1 = f"edgevirt-{cid1[:20]}"
        assert qemu_pid(dom1) not in (None, pid0)
        assert {d for d, active in vm_domains(vm_uid) if active} == {dom1}
        ended = shim(cluster).json("inspect", cid0)["status"]
        assert (ended["state"], ended["exitCode"]) == ("CONTAINER_EXITED", 139), ended

    # the API server is back: the pod's status catches up
    def restarted() -> dict | None:
        cs = cluster.kubectl_json("get", "pod", "edge", "-n", ns)["status"]["containerStatuses"][0]
        return cs if cs["restartCount"] == 1 and "running" in cs["state"] else None

    cs = wait("restartCount 1 in the pod's status", restarted, 120, 2)
    assert cs["lastState"]["terminated"]["exitCode"] == 139 and cs["containerID"].endswith(cid1)


def test_on_failure_leaves_a_powered_off_guest_off_and_always_brings_it_back(cluster, vm_image, ns):
    # user data from a Secret mounted at /run/edgevirt/cloud-init (a plain kvm pod may do that):
    # the test guest powers off N s after it is up
    for name, seconds in (("off", 3), ("again", 20)):
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"ud-{name}"},
                  "stringData": {"userdata": f"#cloud-config\n# edgevirt.poweroff: {seconds}\n"}}  # fmt: skip
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(secret))
    for name, policy in (("off", "OnFailure"), ("again", "Always")):
        mount = {"name": "ud", "mountPath": "/run/edgevirt/cloud-init", "readOnly": True}
        manifest = pod_manifest(
            name, vm_image, None, restartPolicy=policy, container={"volumeMounts": [mount]}
        )
        manifest["spec"]["volumes"] = [{"name": "ud", "secret": {"secretName": f"ud-{name}"}}]
        create_pod(cluster, ns, manifest)

    def phase(name: str) -> str:
        return cluster.kubectl_json("get", "pod", name, "-n", ns)["status"].get("phase", "")

    wait("the OnFailure pod to succeed (the guest powered off)", lambda: phase("off") == "Succeeded", 300, 2)
    cs = cluster.kubectl_json("get", "pod", "off", "-n", ns)["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 0 and cs["state"]["terminated"]["exitCode"] == 0, cs
    assert cs["state"]["terminated"]["reason"] == "Completed"

    def came_back() -> dict | None:
        cs = cluster.kubectl_json("get", "pod", "again", "-n", ns)["status"]["containerStatuses"][0]
        return cs if cs["restartCount"] >= 1 and "running" in cs["state"] else None

    cs = wait("the Always pod's VM to come back after its power-off", came_back, 300, 2)
    assert cs["lastState"]["terminated"]["exitCode"] == 0
    cid = cs["containerID"].split("://", 1)[1]
    pod = cluster.kubectl_json("get", "pod", "again", "-n", ns)
    wait("the guest's second boot", lambda: "EDGEVIRT-GUEST: up" in logs(cluster, cid), 300, 1)
    assert f"EDGEVIRT-GUEST: ip eth0 {pod['status']['podIP']}/24" in logs(cluster, cid)
    # the pod's root disk is the same file across its containers (pod-scoped disks)
    root = Path(vm_state(cluster)) / "disks" / "ns" / ns / "pod" / pod["metadata"]["uid"] / "root.qcow2"
    assert str(root) in disk_sources(f"edgevirt-{cid[:20]}")


def ctr(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ctr", "--address", str(cluster.paths.containerd_sock), "-n", "k8s.io", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_pod_whose_image_only_containerd_holds_starts_with_the_registry_stopped(cluster, vm_image, ns):
    shim(cluster)("pull", vm_image)
    local = f"edge.invalid/e2e/local-only:{uuid.uuid4().hex[:8]}"  # no registry has this name
    r = ctr(cluster, "images", "tag", vm_image, local)
    assert r.returncode == 0, r.stderr
    try:
        with outage(cluster, "registry"):
            manifest = pod_manifest("local", local, None, container={"imagePullPolicy": "IfNotPresent"})
            create_pod(cluster, ns, manifest)
            first_boot(cluster, ns, "local")
    finally:
        cluster.kubectl("delete", "pod", "local", "-n", ns, "--wait=true", "--timeout=120s", check=False,
                        timeout=150)  # fmt: skip
        ctr(cluster, "images", "rm", local)


def test_a_missing_image_names_the_registry_and_a_mirrored_name_boots(cluster, vm_image, ns):
    create_pod(cluster, ns, pod_manifest("none", vm_image, {"edgevirt.io/image": "127.0.0.1:5000/vm/none:1"}))
    text = wait_event(cluster, ns, "none", "could not pull it from registry 127.0.0.1:5000")
    assert "the registry has no such image" in text, text
    # the kvm handler has containerd pull a name only its hosts.toml resolves (a mirror)
    had = ctr(cluster, "images", "ls", "-q").stdout.split()
    create_pod(cluster, ns, pod_manifest("mirrored", vm_image, {"edgevirt.io/image": MIRRORED}))
    try:
        first_boot(cluster, ns, "mirrored")
    finally:
        cluster.kubectl("delete", "pod", "mirrored", "-n", ns, "--wait=true", "--timeout=120s", check=False,
                        timeout=150)  # fmt: skip
        for ref in set(ctr(cluster, "images", "ls", "-q").stdout.split()) - set(had):
            ctr(cluster, "images", "rm", ref)  # what the handler had containerd pull
