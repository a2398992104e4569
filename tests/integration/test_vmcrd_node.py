"""Node mode of edgevirt-controller with a real libvirt domain and the real API server.

Node mode reads no pods: it acts on what cluster mode reports in the VM's status (Running,
``nodeName``, ``podName``) and on the domain libvirt has. Neither cluster mode nor kubelet runs
here, so what they would do is done by hand, as they do it: the domain is created through the
libvirt layer (``cri_shim.vm.DomainManager``) with the VM's UID in its metadata (the kvm handler),
and the status fields are written as cluster mode writes them. Everything node mode does is real,
with the node account's Node-bound token under the RBAC and admission policies of deploy/: status
from the domain, suspend/resume from ``spec.paused``, live attach/detach of hotpluggable volumes
seen by the guest, and the finalizer's cleanup of domain and disks.
"""

from __future__ import annotations

import json
import threading

import pytest
from helpers.vm_env import console_size, wait_console
from helpers.waiting import wait_for

from cri_shim.vm import DiskManager, VMSpec
from vmcrd import api
from vmcrd.kube import api_client
from vmcrd.node import NodeController

# the installed controllers stand aside: node mode runs here in process, cluster mode's writes are
# made by hand (conftest installed_controllers_paused)
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.root,
    pytest.mark.timeout(400),
    pytest.mark.usefixtures("installed_controllers_paused"),
]


@pytest.fixture
def ns(cluster):
    cluster.install_vm_crd(rbac=True)
    with cluster.namespace("vmcrd-node", drop_vm_finalizers=True) as name:
        yield name


def vm(cluster, ns: str) -> dict:
    return cluster.kubectl_json("get", "vm", "web", "-n", ns)


def status_volume(cluster, ns: str, name: str) -> dict | None:
    return next((v for v in vm(cluster, ns).get("status", {}).get("volumes", []) if v["name"] == name), None)


def test_node_mode_pause_hotplug_status_and_cleanup(cluster, ns, vm_env, vm_disk, tmp_path):
    k = cluster
    mgr = vm_env.manager
    body = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "web", "namespace": ns, "finalizers": [api.FINALIZER]},
        "spec": {
            "running": True,
            "nodeName": k.node,
            "image": f"file://{vm_disk.qcow2}",
            "memory": "256Mi",
            "volumes": [{"name": "data", "hotpluggable": True, "emptyDisk": {"capacity": "64Mi"}}],
        },
    }
    k.kubectl("apply", "-f", "-", input=json.dumps(body))
    uid = vm(k, ns)["metadata"]["uid"]
    # what the kvm handler will do for the VM pod: a domain with the VM's UID, disks keyed by it
    console = tmp_path / "console.log"
    dom = vm_env.name("web")
    mgr.create(
        VMSpec(
            name=dom,
            uid=uid,
            namespace=ns,
            memory_mib=256,
            image=f"file://{vm_disk.qcow2}",
            console_log=console,
        )
    )
    wait_console(console, "EDGEVIRT-GUEST: blocks")
    mark = console_size(console)
    # what cluster mode reports once the VM pod runs on this node
    running = {"printableStatus": "Running", "nodeName": k.node, "podName": "web-vm"}
    k.patch("vm", "web", {"status": running}, namespace=ns, subresource="status")

    ctl = NodeController(
        api_client(str(k.service_account_kubeconfig("edgevirt-node", tmp_path / "node.kubeconfig", "1h"))),
        k.node,
        namespace=ns,
        state_dir=vm_env.state_dir,
        resync=5,
    )
    ctl._manager = mgr  # the test's manager: same state dir, image roots and QEMU wrapper path
    stop = threading.Event()
    t = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
    t.start()
    try:
        # mount: the hotpluggable volume is attached live; the guest sees the 64Mi disk
        v = wait_for(
            "data Mounted", lambda: (s := status_volume(k, ns, "data")) and s["phase"] == "Mounted" and s
        )
        assert v["target"] == "vdb"
        wait_console(console, "EDGEVIRT-GUEST: block+ vdb 131072", after=mark)
        st = vm(k, ns)["status"]
        assert st["accel"] in ("tcg", "kvm") and st["domainState"] == "Running"
        # pause / unpause through spec.paused
        k.patch("vm", "web", {"spec": {"paused": True}}, namespace=ns)
        wait_for("domainState Paused", lambda: vm(k, ns)["status"].get("domainState") == "Paused")
        assert mgr.state(dom).phase == "paused"
        k.patch("vm", "web", {"spec": {"paused": False}}, namespace=ns)
        wait_for("domainState Running", lambda: vm(k, ns)["status"].get("domainState") == "Running")
        assert mgr.state(dom).phase == "running"
        # unmount: removed from the spec -> detached from the guest
        mark = console_size(console)
        k.patch("vm", "web", [{"op": "remove", "path": "/spec/volumes/0"}], namespace=ns, type="json")
        wait_for("data gone from status", lambda: status_volume(k, ns, "data") is None)
        wait_console(console, "EDGEVIRT-GUEST: block- vdb", after=mark)
        assert "vdb" not in mgr.facts(dom)["disks"]
        # a second mount, on scsi
        mark = console_size(console)
        scratch = {"name": "scratch", "hotpluggable": True, "bus": "scsi", "emptyDisk": {"capacity": "32Mi"}}
        k.patch(
            "vm",
            "web",
            [{"op": "add", "path": "/spec/volumes/-", "value": scratch}],
            namespace=ns,
            type="json",
        )
        v = wait_for(
            "scratch Mounted",
            lambda: (s := status_volume(k, ns, "scratch")) and s["phase"] == "Mounted" and s,
        )
        assert v["target"] == "sda"
        wait_console(console, "EDGEVIRT-GUEST: block+ sda 65536", after=mark)
        reasons = {e["reason"] for e in k.kubectl_json("get", "events", "-n", ns)["items"]}
        assert {"VolumeMounted", "VolumeUnmounted", "Suspended", "Resumed"} <= reasons
        # deletion: the finalizer waits for the pod, then node mode removes domain and disks
        disk_dir = DiskManager(vm_env.state_dir).dir_for("vm", uid, namespace=ns)
        assert disk_dir.exists()
        k.kubectl("delete", "vm", "web", "-n", ns, "--wait=false")
        assert vm(k, ns)["metadata"]["finalizers"] == [api.FINALIZER]  # the pod still exists
        # cluster mode deletes the pod: kubelet has the kvm handler stop the VM, then cluster mode
        # reports the pod gone
        mgr.destroy(dom)
        gone = {"printableStatus": "Stopped", "podName": None}
        k.patch("vm", "web", {"status": gone}, namespace=ns, subresource="status")
        wait_for("the VM gone", lambda: k.kubectl("get", "vm", "web", "-n", ns, check=False).returncode != 0)
        assert not mgr.exists(dom)
        assert not disk_dir.exists()
    finally:
        stop.set()
        t.join(10)
