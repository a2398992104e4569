"""edgevirt-controller on the real API server, run as subprocesses with service-account
kubeconfigs bound to deploy/manifests/vmcrd-rbac.yaml (so the RBAC is exercised too, and the
admission policies of deploy/manifests/admission-policies.yaml: the node account's token is bound
to this node).

What needs a VM that actually runs (Running, IP, hotplug into a live domain, pause) is not here:
the VMs' images are not in the local registry, so VM pods do not get far (Pending, image errors) and
the VMs stay Starting or ErrorImage. Everything the controller decides from that is real: pod
creation with the contract, ownership, deletion, recreation, status, conditions, events, leader
election, crash recovery, finalizer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from helpers.controller import ControllerProcess
from helpers.metrics import sample
from helpers.waiting import wait_for
from kubernetes import client as kube
from kubernetes import config as kube_config
from kubernetes import watch as kube_watch

# the installed controllers stand aside: these tests run their own (conftest installed_controllers_paused)
pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("installed_controllers_paused")]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def installed(cluster):
    """CRD + RBAC applied (as `kubectl apply -k deploy/` would), and the kvm RuntimeClass present."""
    cluster.install_vm_crd(rbac=True)
    created = False
    if cluster.kubectl("get", "runtimeclass", "kvm", check=False).returncode != 0:
        rcs = REPO / "deploy/manifests/runtimeclasses.yaml"
        if rcs.exists():  # the project's own RuntimeClasses, as deploy/local/up installs them: kept
            cluster.kubectl("apply", "-f", str(rcs))
        else:
            created = True
            cluster.kubectl(
                "apply",
                "-f",
                "-",
                input="apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {name: kvm}\nhandler: kvm\n",
            )
    yield cluster
    if created:
        cluster.kubectl("delete", "runtimeclass", "kvm", "--ignore-not-found", check=False)


@pytest.fixture
def ns(installed):
    # controllers are stopped by the end (fixture order): drop finalizers nothing would remove
    with installed.namespace("vmcrd", drop_vm_finalizers=True) as name:
        yield name
    installed.kubectl(
        "delete", "lease", f"vmcrd-{name}", "-n", "edgevirt-system", "--ignore-not-found", check=False
    )


@pytest.fixture
def controllers(installed, ns, tmp_path):
    """Factory: start an edgevirt-controller subprocess (cluster or node mode) for ``ns``."""
    procs: list[ControllerProcess] = []
    kc = {
        sa: installed.service_account_kubeconfig(sa, tmp_path / f"{sa}.kubeconfig")
        for sa in ("edgevirt-controller", "edgevirt-node")
    }

    def start(mode: str = "cluster", identity: str | None = None, *extra: str) -> ControllerProcess:
        identity = identity or f"{mode}-{uuid.uuid4().hex[:6]}"
        args = ["--mode", mode, "--namespace", ns, "-v"]
        if mode == "cluster":
            args += [
                "--kubeconfig",
                str(kc["edgevirt-controller"]),
                "--identity",
                identity,
                "--lease-namespace",
                "edgevirt-system",
                "--lease-name",
                f"vmcrd-{ns}",
                "--lease-duration",
                "6",
                "--renew",
                "1",
                "--resync",
                "30",
            ]
        else:
            args += ["--kubeconfig", str(kc["edgevirt-node"]), "--node", installed.node]
        p = ControllerProcess([*args, *extra], tmp_path / f"{identity}.log", identity)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()
    for p in procs:  # shown when a test failed
        print(f"--- {p.identity} ---\n{p.output()[-4000:]}")


# ------------------------------------------------------------------ helpers
VM_YAML = """apiVersion: edgevirt.io/v1alpha1
kind: VirtualMachine
metadata: {{name: {name}}}
spec:
  {run}
  cpu: 2
  memory: 300Mi
  image: 127.0.0.1:5000/vm/alpine-disk:3.20
  kernelBoot: {{kernel: /boot/vmlinuz, cmdline: console=ttyS0}}
  cloudInit: {{userData: "#cloud-config\\nhostname: {name}\\n"}}
  networks: [{{name: default, mac: "02:00:00:00:00:2a"}}]
  volumes:
  - {{name: data, hotpluggable: true, emptyDisk: {{capacity: 64Mi}}}}
  - {{name: cold, image: 127.0.0.1:5000/vm/data:1, bus: sata}}
"""


def make_vm(k, ns: str, name: str = "web", run: str = "running: true") -> dict:
    k.kubectl("apply", "-n", ns, "-f", "-", input=VM_YAML.format(name=name, run=run))
    return k.kubectl_json("get", "vm", name, "-n", ns)


def get(k, ns: str, kind: str, name: str) -> dict | None:
    r = k.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def vm_pods(k, ns: str) -> list[dict]:
    return k.kubectl_json("get", "pods", "-n", ns, "-l", "edgevirt.io/vm")["items"]


def live_pod(k, ns: str, name: str = "web-vm") -> dict | None:
    p = get(k, ns, "pod", name)
    return p if p and not p["metadata"].get("deletionTimestamp") else None


def cond(vm: dict, t: str) -> dict:
    return next(c for c in vm.get("status", {}).get("conditions", []) if c["type"] == t)


def events(k, ns: str, name: str = "web") -> list[dict]:
    return [
        e
        for e in k.kubectl_json("get", "events", "-n", ns)["items"]
        if e["involvedObject"].get("kind") == "VirtualMachine" and e["involvedObject"]["name"] == name
    ]


def reasons(k, ns: str, name: str = "web") -> set[str]:
    return {e["reason"] for e in events(k, ns, name)}


def status_settled(k, ns: str, name: str = "web"):
    """The VM once the controller has computed status for its current generation."""
    vm = get(k, ns, "vm", name)
    if vm and vm.get("status", {}).get("observedGeneration") == vm["metadata"]["generation"]:
        return vm
    return None


# ------------------------------------------------------------------ tests
def test_running_true_makes_one_owned_vm_pod_with_the_contract(installed, ns, controllers):
    k = installed
    controllers("cluster")
    vm = make_vm(k, ns)
    pod = wait_for("the VM pod", lambda: live_pod(k, ns))
    m, spec = pod["metadata"], pod["spec"]
    (ref,) = m["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
        "VirtualMachine",
        "web",
        vm["metadata"]["uid"],
        True,
    )
    assert (
        spec["runtimeClassName"] == "kvm" and spec["restartPolicy"] == "Always"
    )  # running: true is runStrategy Always
    (c,) = spec["containers"]
    assert c["image"] == "127.0.0.1:5000/vm/alpine-disk:3.20"
    assert c["resources"]["limits"] == {"cpu": "2", "memory": "300Mi"}
    assert c["resources"]["requests"] == {"cpu": "200m", "memory": "300Mi"}  # cpuAllocationRatio 10
    ann = m["annotations"]
    assert ann["edgevirt.io/vm-uid"] == vm["metadata"]["uid"]
    assert ann["edgevirt.io/mac"] == "02:00:00:00:00:2a"
    assert ann["edgevirt.io/cloud-init-user-data"] == "#cloud-config\nhostname: web\n"
    assert json.loads(ann["edgevirt.io/kernel-boot"]) == {
        "kernel": "/boot/vmlinuz",
        "cmdline": "console=ttyS0",
    }
    vols = json.loads(ann["edgevirt.io/volumes"])
    assert [v["name"] for v in vols] == ["data", "cold"] and vols[0]["emptyDisk"] == {"capacity": "64Mi"}
    assert ann["edgevirt.io/image"] == "127.0.0.1:5000/vm/alpine-disk:3.20"
    # scheduled to this node; the VM remembers its node; status and conditions are there
    vm = wait_for(
        "status.nodeName",
        lambda: (v := get(k, ns, "vm", "web")) and v.get("status", {}).get("nodeName") and v,
    )
    st = vm["status"]
    assert st["nodeName"] == k.node and st["podName"] == "web-vm"
    # Starting until kubelet has tried; this test's image is not in the local registry, so kubelet's
    # pull fails and the VM reports ErrorImage as soon as the pod (200m CPU requested) is scheduled
    assert st["printableStatus"] in ("Starting", "Running", "ErrorImage")
    assert st["observedGeneration"] == vm["metadata"]["generation"]
    assert {c["type"] for c in st["conditions"]} == {"Ready", "Paused", "RestartRequired", "Failure"}
    for c_ in st["conditions"]:
        assert c_["lastTransitionTime"] and c_["observedGeneration"] == vm["metadata"]["generation"]
    assert cond(vm, "Ready")["status"] == ("True" if st["printableStatus"] == "Running" else "False")
    assert vm["metadata"]["finalizers"] == ["edgevirt.io/node-cleanup"]
    wait_for(
        "events SuccessfulCreate and Starting", lambda: {"SuccessfulCreate", "Starting"} <= reasons(k, ns)
    )
    assert len(vm_pods(k, ns)) == 1
    row = k.kubectl("get", "vm", "web", "-n", ns, "--no-headers").stdout.split()
    assert row[0] == "web" and row[1] in ("Starting", "Running", "ErrorImage") and row[2] == k.node


def test_stop_deletes_pod_and_always_recreates_a_deleted_pod(installed, ns, controllers):
    k = installed
    controllers("cluster")
    make_vm(k, ns)
    first = wait_for("the VM pod", lambda: live_pod(k, ns))
    wait_for(
        "placed on the node", lambda: get(k, ns, "vm", "web").get("status", {}).get("nodeName") == k.node
    )
    k.kubectl("delete", "pod", "web-vm", "-n", ns, "--wait=false")
    second = wait_for(
        "a new VM pod",
        lambda: (p := live_pod(k, ns)) and p["metadata"]["uid"] != first["metadata"]["uid"] and p,
    )
    # the VM was placed on a node by now: the new pod is pinned there
    terms = second["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchFields"][0]["values"] == [k.node]
    # the stop deletes the pod with the VM's grace period as it is now (no restart needed for it)
    core = kube.CoreV1Api(kube_config.new_client_from_config(str(k.paths.kubeconfig)))
    since = core.list_namespaced_pod(ns).metadata.resource_version
    k.patch("vm", "web", {"spec": {"running": False, "terminationGracePeriodSeconds": 7}}, namespace=ns)
    deleting = None
    for ev in kube_watch.Watch().stream(
        core.list_namespaced_pod,
        ns,
        field_selector="metadata.name=web-vm",
        resource_version=since,
        timeout_seconds=60,
    ):
        if ev["object"].metadata.deletion_timestamp is not None:
            deleting = ev["object"].metadata
            break
    assert deleting is not None, "no deletion of web-vm seen within 60 s"
    assert deleting.deletion_grace_period_seconds == 7
    wait_for("the VM pod gone", lambda: get(k, ns, "pod", "web-vm") is None)
    vm = wait_for(
        "status Stopped",
        lambda: (v := status_settled(k, ns)) and v["status"]["printableStatus"] == "Stopped" and v,
    )
    assert "podName" not in vm["status"] and vm["status"]["ipAddresses"] == []
    assert vm["status"]["nodeName"] == k.node  # stays: its disks are there
    wait_for("events", lambda: {"SuccessfulDelete", "Stopped"} <= reasons(k, ns))
    assert vm_pods(k, ns) == []


def test_kill9_and_restart_makes_no_duplicate_and_catches_up(installed, ns, controllers):
    k = installed
    c1 = controllers("cluster")
    make_vm(k, ns)
    pod = wait_for("the VM pod", lambda: live_pod(k, ns))
    c1.kill9()
    # while no controller runs: a boot field changes and the pod is deleted
    k.patch("vm", "web", {"spec": {"cpu": 1}}, namespace=ns)
    controllers("cluster")  # takes over once the killed one's Lease expires
    vm = wait_for("status for generation 2", lambda: status_settled(k, ns))
    assert vm["metadata"]["generation"] == 2
    assert cond(vm, "RestartRequired")["status"] == "True"
    assert cond(vm, "RestartRequired")["reason"] == "BootSpecChanged"
    pods = vm_pods(k, ns)
    assert [p["metadata"]["uid"] for p in pods] == [pod["metadata"]["uid"]]  # same pod, not a second
    wait_for("RestartRequired event", lambda: "RestartRequired" in reasons(k, ns))
    # restart through the annotation (what `kubectl vm restart` writes): a new pod with the new spec
    k.kubectl("annotate", "vm", "web", "-n", ns, "edgevirt.io/state-request=restart:t1")
    new = wait_for(
        "the restarted pod",
        lambda: (p := live_pod(k, ns)) and p["metadata"]["uid"] != pod["metadata"]["uid"] and p,
    )
    assert new["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "1"
    assert new["metadata"]["annotations"]["edgevirt.io/state-request"] == "restart:t1"
    vm = wait_for(
        "request consumed",
        lambda: (
            (v := get(k, ns, "vm", "web"))
            and "edgevirt.io/state-request" not in v["metadata"].get("annotations", {})
            and v
        ),
    )
    wait_for(
        "RestartRequired False", lambda: cond(get(k, ns, "vm", "web"), "RestartRequired")["status"] == "False"
    )
    assert len(vm_pods(k, ns)) == 1


def test_two_controllers_one_acts_and_the_other_takes_over(installed, ns, controllers):
    k = installed
    a = controllers("cluster", "ctl-a")
    b = controllers("cluster", "ctl-b")
    lease = wait_for(
        "a lease holder",
        lambda: (
            (l_ := get(k, "edgevirt-system", "lease", f"vmcrd-{ns}"))
            and l_["spec"].get("holderIdentity")
            and l_
        ),
    )
    leader = lease["spec"]["holderIdentity"]
    standby = {"ctl-a": b, "ctl-b": a}[leader]
    make_vm(k, ns)
    wait_for("the VM pod", lambda: live_pod(k, ns))
    wait_for("Starting event", lambda: "Starting" in reasons(k, ns))
    assert {e["source"]["host"] for e in events(k, ns)} == {leader}
    (a if leader == "ctl-a" else b).kill9()
    wait_for(
        "the standby to lead",
        lambda: (
            get(k, "edgevirt-system", "lease", f"vmcrd-{ns}")["spec"].get("holderIdentity")
            == standby.identity
        ),
    )
    k.kubectl("delete", "pod", "web-vm", "-n", ns, "--wait=false")
    wait_for(
        "a new VM pod by the new leader",
        lambda: (
            "SuccessfulCreate"
            in {e["reason"] for e in events(k, ns) if e["source"]["host"] == standby.identity}
        ),
    )
    assert len(vm_pods(k, ns)) <= 1


def test_manual_strategy_acts_only_on_requests(installed, ns, controllers):
    k = installed
    controllers("cluster")
    make_vm(k, ns, run="runStrategy: Manual")
    vm = wait_for("status", lambda: status_settled(k, ns))
    assert vm["status"]["printableStatus"] == "Stopped" and vm_pods(k, ns) == []
    k.kubectl("annotate", "vm", "web", "-n", ns, "edgevirt.io/state-request=start")
    wait_for("the VM pod", lambda: live_pod(k, ns))
    wait_for(
        "start consumed",
        lambda: "edgevirt.io/state-request" not in get(k, ns, "vm", "web")["metadata"].get("annotations", {}),
    )
    k.kubectl("delete", "pod", "web-vm", "-n", ns, "--wait=false")
    wait_for("the pod gone", lambda: get(k, ns, "pod", "web-vm") is None)
    vm = wait_for(
        "Stopped", lambda: (v := get(k, ns, "vm", "web"))["status"]["printableStatus"] == "Stopped" and v
    )
    assert vm_pods(k, ns) == []  # Manual: not recreated
    k.kubectl("annotate", "vm", "web", "-n", ns, "edgevirt.io/state-request=start")
    wait_for("the VM pod again", lambda: live_pod(k, ns))
    k.kubectl("annotate", "--overwrite", "vm", "web", "-n", ns, "edgevirt.io/state-request=stop")
    wait_for("the pod gone after stop", lambda: get(k, ns, "pod", "web-vm") is None)
    assert get(k, ns, "vm", "web")["metadata"]["annotations"]["edgevirt.io/state-request"] == "stop"


def test_unschedulable_vm_reports_failure_and_is_deleted_without_node_state(installed, ns, controllers):
    k = installed
    controllers("cluster")
    k.kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=VM_YAML.format(name="ghost", run="running: true\n  nodeName: no-such-node"),
    )
    vm = wait_for(
        "Unschedulable",
        lambda: (
            (v := get(k, ns, "vm", "ghost"))
            and v.get("status", {}).get("printableStatus") == "Unschedulable"
            and v
        ),
    )
    f = cond(vm, "Failure")
    assert f["status"] == "True" and f["reason"] == "Unschedulable" and f["message"]
    assert "nodeName" not in vm["status"]
    wait_for("Unschedulable event", lambda: "Unschedulable" in reasons(k, ns, "ghost"))
    # never placed on a node: no node-local state; the finalizer goes after the pod
    k.kubectl("delete", "vm", "ghost", "-n", ns, "--wait=false")
    wait_for("the VM gone", lambda: get(k, ns, "vm", "ghost") is None)
    wait_for("its pod gone", lambda: get(k, ns, "pod", "ghost-vm") is None)


def test_pod_name_taken_by_a_foreign_pod_is_reported_not_adopted(installed, ns, controllers):
    k = installed
    k.kubectl(
        "run",
        "web-vm",
        "-n",
        ns,
        "--image=busybox:latest",
        "--restart=Never",
        "--labels=edgevirt.io/vm=web",
        "--command",
        "--",
        "sleep",
        "3600",
    )
    controllers("cluster")
    make_vm(k, ns)
    vm = wait_for(
        "Failure",
        lambda: (
            (v := get(k, ns, "vm", "web"))
            and v.get("status")
            and cond(v, "Failure")["status"] == "True"
            and v
        ),
    )
    assert "not owned by this VirtualMachine" in cond(vm, "Failure")["message"]
    assert "ownerReferences" not in get(k, ns, "pod", "web-vm")["metadata"]


def test_finalizer_waits_for_node_mode_to_remove_node_local_state(installed, ns, controllers, tmp_path):
    k = installed
    from cri_shim.vm import DiskManager

    controllers("cluster")
    vm = make_vm(k, ns)
    uid = vm["metadata"]["uid"]
    wait_for(
        "placed on the node", lambda: get(k, ns, "vm", "web").get("status", {}).get("nodeName") == k.node
    )
    state = tmp_path / "vmstate"
    disk_dir = DiskManager(state).dir_for("vm", uid)  # what the kvm handler keeps for this VM
    disk_dir.mkdir(parents=True)
    (disk_dir / "root.qcow2").write_bytes(b"overlay")
    k.kubectl("delete", "vm", "web", "-n", ns, "--wait=false")
    wait_for("the pod gone", lambda: get(k, ns, "pod", "web-vm") is None)
    vm = wait_for(
        "status Stopped while deleting",
        lambda: (v := get(k, ns, "vm", "web")) and v["status"]["printableStatus"] == "Stopped" and v,
    )
    assert vm["metadata"]["finalizers"] == ["edgevirt.io/node-cleanup"] and disk_dir.exists()
    controllers("node", "node-1", "--state-dir", str(state))
    wait_for("the VM gone", lambda: get(k, ns, "vm", "web") is None)
    assert not disk_dir.exists()
    ev = [e for e in k.kubectl_json("get", "events", "-n", ns)["items"] if e["reason"] == "NodeStateRemoved"]
    assert ev and ev[0]["involvedObject"]["uid"] == uid


def test_plugin_commands_write_what_kubectl_patch_would(installed, ns, controllers):
    k = installed
    env = {**k.env, "PATH": f"{VENV_BIN}:{k.env['PATH']}"}

    def vm_cmd(*args: str, check: bool = True):
        r = subprocess.run(
            [str(k.paths.tool("kubectl")), "vm", *args, "-n", ns],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check:
            assert r.returncode == 0, r.stderr
        return r

    make_vm(k, ns, run="running: false")
    vm_cmd("start", "web")
    assert get(k, ns, "vm", "web")["spec"]["running"] is True
    assert "kubectl patch vm web" in vm_cmd("stop", "web").stderr
    assert get(k, ns, "vm", "web")["spec"]["running"] is False
    r = vm_cmd("stop", "web", check=False)
    assert r.returncode == 1 and "already set to stop" in r.stderr
    vm_cmd("pause", "web")
    assert get(k, ns, "vm", "web")["spec"]["paused"] is True
    vm_cmd("unpause", "web")
    assert get(k, ns, "vm", "web")["spec"]["paused"] is False
    vm_cmd("mount", "web", "--volume-name", "scratch", "--empty-disk", "128Mi", "--bus", "scsi")
    vols = get(k, ns, "vm", "web")["spec"]["volumes"]
    assert vols[-1] == {
        "name": "scratch",
        "hotpluggable": True,
        "bus": "scsi",
        "emptyDisk": {"capacity": "128Mi"},
        "readOnly": False,
        "cdrom": False,
    }
    r = vm_cmd("mount", "web", "--volume-name", "bad", "--host-disk", "/etc/passwd", check=False)
    assert r.returncode == 1 and "hostDisk.path" in r.stderr
    r = vm_cmd("unmount", "web", "--volume-name", "cold", check=False)
    assert r.returncode == 1 and "not hotpluggable" in r.stderr
    vm_cmd("unmount", "web", "--volume-name", "scratch")
    assert [v["name"] for v in get(k, ns, "vm", "web")["spec"]["volumes"]] == ["data", "cold"]
    r = vm_cmd("restart", "web", check=False)
    assert r.returncode == 1 and "not running" in r.stderr
    r = vm_cmd("console", "web", check=False)
    assert r.returncode == 1 and "no console" in r.stderr
    # strategies: Halted <-> Always; Manual uses the request annotation
    halted = [
        {"op": "remove", "path": "/spec/running"},
        {"op": "add", "path": "/spec/runStrategy", "value": "Halted"},
    ]
    k.patch("vm", "web", halted, namespace=ns, type="json")
    vm_cmd("start", "web")
    assert get(k, ns, "vm", "web")["spec"]["runStrategy"] == "Always"
    vm_cmd("stop", "web")
    assert get(k, ns, "vm", "web")["spec"]["runStrategy"] == "Halted"
    k.patch("vm", "web", {"spec": {"runStrategy": "Manual"}}, namespace=ns)
    vm_cmd("start", "web")
    assert get(k, ns, "vm", "web")["metadata"]["annotations"]["edgevirt.io/state-request"] == "start"
    r = vm_cmd("start", "nope", check=False)
    assert r.returncode == 1 and 'virtualmachine "nope" not found' in r.stderr
    # restart on a VM the controller runs: annotation restart:<id>, then a new pod
    controllers("cluster")
    pod = wait_for("the VM pod", lambda: live_pod(k, ns))
    # this test's image is not in the registry: once kubelet tried the pull the VM says ErrorImage
    wait_for(
        "Starting, Running or ErrorImage",
        lambda: (
            get(k, ns, "vm", "web").get("status", {}).get("printableStatus")
            in ("Starting", "Running", "ErrorImage")
        ),
    )
    vm_cmd("restart", "web")
    wait_for(
        "a new pod after restart",
        lambda: (p := live_pod(k, ns)) and p["metadata"]["uid"] != pod["metadata"]["uid"],
    )


@pytest.mark.parametrize(
    ("strategy", "phase", "outcome"),
    [
        ("Always", "Failed", "recreated"),
        ("Always", "Succeeded", "recreated"),
        ("RerunOnFailure", "Failed", "recreated"),
        ("RerunOnFailure", "Succeeded", "stays-stopped"),
        ("Manual", "Failed", "stays-failed"),
        ("Once", "Succeeded", "halted"),
        ("Once", "Failed", "halted"),
    ],
)
def test_pod_endings_follow_the_run_strategy(installed, ns, controllers, strategy, phase, outcome):
    """The VM pod ends (its phase is set as kubelet would when the guest powers off or crashes; the pod
    is pinned to a node that does not exist, so no kubelet overwrites that phase)."""
    k = installed
    controllers("cluster")
    run = f"runStrategy: {strategy}\n  nodeName: no-such-node"
    make_vm(k, ns, run=run)
    if strategy == "Manual":
        k.kubectl("annotate", "vm", "web", "-n", ns, "edgevirt.io/state-request=start")
    first = wait_for("the VM pod", lambda: live_pod(k, ns))
    ended = {"status": {"phase": phase, "message": f"guest ended ({phase})"}}
    k.patch("pod", "web-vm", ended, namespace=ns, subresource="status")
    if outcome == "recreated":
        wait_for(
            "a new pod", lambda: (p := live_pod(k, ns)) and p["metadata"]["uid"] != first["metadata"]["uid"]
        )
        wait_for("SuccessfulDelete", lambda: "SuccessfulDelete" in reasons(k, ns))
    elif outcome == "halted":
        vm = wait_for(
            "runStrategy Halted",
            lambda: (v := get(k, ns, "vm", "web"))["spec"].get("runStrategy") == "Halted" and v,
        )
        wait_for("the pod gone", lambda: get(k, ns, "pod", "web-vm") is None)
        vm = wait_for(
            "Stopped",
            lambda: (v := status_settled(k, ns)) and v["status"]["printableStatus"] == "Stopped" and v,
        )
        assert "Halted" in reasons(k, ns)
    else:
        want = "Stopped" if outcome == "stays-stopped" else "Failed"
        vm = wait_for(
            want,
            lambda: (
                (v := get(k, ns, "vm", "web")) and v.get("status", {}).get("printableStatus") == want and v
            ),
        )
        pod = get(k, ns, "pod", "web-vm")
        assert pod["metadata"]["uid"] == first["metadata"]["uid"] and pod["status"]["phase"] == phase
        if want == "Failed":
            f = cond(vm, "Failure")
            assert f["status"] == "True" and f["message"] == "guest ended (Failed)"


@pytest.mark.parametrize(
    ("sa", "verb", "resource", "namespace", "allowed"),
    [
        ("edgevirt-controller", "create", "pods", "default", True),
        ("edgevirt-controller", "delete", "pods", "default", True),
        ("edgevirt-controller", "update", "pods", "default", False),
        ("edgevirt-controller", "patch", "virtualmachines.edgevirt.io", "default", True),
        ("edgevirt-controller", "update", "virtualmachines.edgevirt.io", "default", False),
        ("edgevirt-controller", "patch", "virtualmachines.edgevirt.io/status", "default", True),
        ("edgevirt-controller", "update", "virtualmachines.edgevirt.io/finalizers", "default", True),
        ("edgevirt-controller", "list", "events", "default", True),
        ("edgevirt-controller", "patch", "events", "default", False),
        ("edgevirt-controller", "update", "leases.coordination.k8s.io", "edgevirt-system", True),
        ("edgevirt-controller", "update", "leases.coordination.k8s.io", "default", False),
        ("edgevirt-controller", "get", "secrets", "default", False),
        ("edgevirt-controller", "delete", "virtualmachines.edgevirt.io", "default", False),
        ("edgevirt-node", "patch", "virtualmachines.edgevirt.io/status", "default", True),
        ("edgevirt-node", "patch", "virtualmachines.edgevirt.io", "default", True),
        ("edgevirt-node", "create", "events", "default", True),
        ("edgevirt-node", "get", "pods", "default", False),
        ("edgevirt-node", "watch", "pods", "default", False),
        ("edgevirt-node", "create", "pods", "default", False),
        ("edgevirt-node", "delete", "pods", "default", False),
        ("edgevirt-node", "get", "secrets", "default", False),
        ("edgevirt-node", "delete", "virtualmachines.edgevirt.io", "default", False),
        ("edgevirt-node", "update", "virtualmachines.edgevirt.io/status", "default", False),
        ("edgevirt-controller", "update", "virtualmachines.edgevirt.io/status", "default", False),
    ],
)
def test_rbac_grants_each_mode_what_it_needs_and_no_more(installed, sa, verb, resource, namespace, allowed):
    res, _, sub = resource.partition("/")  # can-i reads "a/b" as resource a named b
    r = installed.kubectl(
        "auth",
        "can-i",
        verb,
        res,
        *([f"--subresource={sub}"] if sub else []),
        "-n",
        namespace,
        f"--as=system:serviceaccount:edgevirt-system:{sa}",
        check=False,
    )
    assert r.stdout.strip() == ("yes" if allowed else "no"), (r.stdout, r.stderr)


def test_kubelet_sandbox_failure_is_reported_on_the_vm(installed, ns, controllers):
    """The kvm handler refuses the sandbox of a VM whose MAC is a multicast address (the CRD checks
    only its form); kubelet keeps retrying and reports FailedCreatePodSandBox."""
    k = installed
    controllers("cluster")
    body = VM_YAML.format(name="web", run="running: true").replace("02:00:00:00:00:2a", "03:00:00:00:00:2a")
    k.kubectl("apply", "-n", ns, "-f", "-", input=body)
    vm = wait_for(
        "Failure FailedCreatePodSandBox",
        lambda: (
            (v := get(k, ns, "vm", "web"))
            and v.get("status")
            and cond(v, "Failure")["reason"] == "FailedCreatePodSandBox"
            and v
        ),
    )
    f = cond(vm, "Failure")
    assert f["status"] == "True" and "multicast" in f["message"] and "edgevirt.io/mac" in f["message"]
    assert vm["status"]["printableStatus"] == "Starting"  # kubelet keeps retrying
    assert "FailedCreatePodSandBox" in cond(vm, "Ready")["message"]
    ev = [e for e in events(k, ns) if e["reason"] == "FailedCreatePodSandBox"]
    assert ev and ev[0]["type"] == "Warning" and "multicast" in ev[0]["message"]
    assert get(k, ns, "pod", "web-vm")["spec"]["runtimeClassName"] == "kvm"


def lease_holder(k, ns: str) -> str | None:
    lease = get(k, "edgevirt-system", "lease", f"vmcrd-{ns}")
    return (lease or {}).get("spec", {}).get("holderIdentity")


def test_leader_that_loses_its_lease_exits_and_sigterm_hands_over(installed, ns, controllers):
    k = installed
    a = controllers("cluster", "ctl-a")
    wait_for("ctl-a leads", lambda: lease_holder(k, ns) == "ctl-a")

    # somebody else holds the Lease now (and keeps renewing it): ctl-a must stop acting and exit 1
    def steal() -> None:
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        intruder = {"spec": {"holderIdentity": "intruder", "renewTime": now}}
        k.patch("lease", f"vmcrd-{ns}", intruder, namespace="edgevirt-system")

    def stolen_and_exited():
        steal()
        return a.p.poll() is not None

    wait_for("ctl-a to step down", stolen_and_exited, 60, interval=1.0)
    assert a.p.returncode == 1
    assert "lost leadership" in a.output()
    # a clean stop releases the Lease so a standby takes it without waiting for it to expire
    released = {"spec": {"holderIdentity": None, "renewTime": None}}
    k.patch("lease", f"vmcrd-{ns}", released, namespace="edgevirt-system")
    b = controllers("cluster", "ctl-b")
    wait_for("ctl-b leads", lambda: lease_holder(k, ns) == "ctl-b")
    c = controllers("cluster", "ctl-c")
    wait_for("ctl-c running as standby", lambda: "cluster mode: identity ctl-c" in c.output())
    b.p.terminate()
    assert b.p.wait(30) == 0
    assert "ctl-b" not in (lease_holder(k, ns) or "")  # released on the way out
    wait_for("ctl-c leads", lambda: lease_holder(k, ns) == "ctl-c")


class CuttableProxy:
    """A TCP proxy to the API server whose link can be cut (every connection dropped, new ones
    refused) and restored: the edge's flaky link to the control plane, on loopback."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.cut_now = threading.Event()
        self.conns: list = []
        self.lock = threading.Lock()
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            if self.cut_now.is_set():
                c.close()
                continue
            try:
                u = socket.create_connection(self.upstream)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        self.cut_now.set()
        with self.lock:
            for s in self.conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self.conns.clear()

    def restore(self) -> None:
        self.cut_now.clear()

    def close(self) -> None:
        self.cut()
        self.srv.close()


def test_controller_catches_up_after_the_link_to_the_api_server_drops(installed, ns, controllers, tmp_path):
    k = installed
    proxy = CuttableProxy(("127.0.0.1", 6443))
    try:
        kc_path = tmp_path / "edgevirt-controller.kubeconfig"  # written by the controllers fixture
        cfg = yaml.safe_load(kc_path.read_text())
        cfg["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
        via_proxy = tmp_path / "via-proxy.kubeconfig"
        via_proxy.write_text(yaml.safe_dump(cfg))
        # the later --kubeconfig wins; a long lease so a short outage does not cost leadership
        c = controllers("cluster", "flaky", "--kubeconfig", str(via_proxy), "--lease-duration", "60")
        make_vm(k, ns)
        pod = wait_for("the VM pod", lambda: live_pod(k, ns))
        proxy.cut()
        # while the controller cannot reach the API server: the VM is stopped, a second VM appears
        k.patch("vm", "web", {"spec": {"running": False}}, namespace=ns)
        make_vm(k, ns, name="db")
        wait_for("the controller to notice the outage", lambda: "relisting in" in c.output(), 60)
        assert (
            get(k, ns, "pod", "web-vm")["metadata"]["uid"] == pod["metadata"]["uid"]
        )  # nothing was torn down
        proxy.restore()
        wait_for("web's pod deleted after the link returned", lambda: get(k, ns, "pod", "web-vm") is None)
        wait_for("db's pod created after the link returned", lambda: live_pod(k, ns, "db-vm"))
        vm = wait_for(
            "web Stopped",
            lambda: (v := status_settled(k, ns)) and v["status"]["printableStatus"] == "Stopped" and v,
        )
        assert vm["status"]["observedGeneration"] == vm["metadata"]["generation"]
        assert c.p.poll() is None  # still running, still the leader
    finally:
        proxy.close()


def _ops_url(output: str) -> str | None:
    """The ops URL the controller logged (JSON lines)."""
    for line in output.splitlines():
        message = json.loads(line)["message"]
        if message.startswith("ops endpoints (/healthz /readyz /metrics) on "):
            return message.rsplit(" ", 1)[1]
    return None


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_controller_process_serves_health_readiness_metrics_and_json_logs(installed, ns, controllers):
    k = installed
    c = controllers("cluster", "ctl-ops", "--ops-address", "127.0.0.1:0", "--log-format", "json")
    url = wait_for("the ops URL in the log", lambda: _ops_url(c.output()))
    wait_for("ready (informers synced)", lambda: _get(url + "/readyz") == (200, "ok\n"))
    assert _get(url + "/healthz") == (200, "ok\n")
    make_vm(k, ns)
    wait_for("the VM pod", lambda: live_pod(k, ns))

    def reconciled() -> str | None:
        text = _get(url + "/metrics")[1]
        ok = sample(text, "edgevirt_controller_reconciles_total", mode="cluster", result="ok") or 0
        unreported = sample(text, "edgevirt_controller_vms", mode="cluster", status="None")
        return text if ok >= 1 and unreported is None else None

    text = wait_for("a reconcile counted and the VM's status in the gauge", reconciled)
    assert sample(text, "edgevirt_controller_leader", mode="cluster") == 1
    vms = [line for line in text.splitlines() if line.startswith("edgevirt_controller_vms{")]
    assert len(vms) == 1 and vms[0].endswith(" 1.0"), vms  # the one VM, under the status it has
    assert sample(text, "edgevirt_controller_reconcile_duration_seconds_count", mode="cluster") >= 1
    assert all(json.loads(line)["logger"] for line in c.output().splitlines())  # every line is JSON
    c.stop()
    assert c.p.returncode == 0
