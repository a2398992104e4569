"""The cluster side of edgevirt as an operator installs, upgrades and removes it (docs/install.md), on
the local cluster: `kubectl apply -k deploy/` of this checkout's image (conftest ``edgevirt_installed``).

* installed: the Deployment's two replicas ready, non-root, one leader on the Lease, the other a
  ready standby; /readyz, /healthz and /metrics of each through the API server; JSON logs; the
  PodDisruptionBudget.
* upgrade: with a VM running, a new image (another version tag, so another digest) applied with
  `kubectl apply -k` rolls the controllers, and the VM keeps its QEMU process; the new controllers
  act on it. Restarting edgevirt-cri through its unit's ExecStart keeps the QEMU process too.
* removal: with the VMs deleted, `kubectl delete -k deploy/` removes every object of the cluster
  side; installing again brings it back.

Each test leaves the session's install as it found it (re-applied on the way out).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers.metrics import sample
from helpers.vm_env import qemu_pid, vm_domains
from helpers.waiting import wait_for
from localcluster import clusterside
from localcluster.components import BY_NAME

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
NS = clusterside.NAMESPACE


def pod_images(k, selector: str) -> set[str]:
    pods = k.kubectl_json("get", "pods", "-n", NS, "-l", selector)["items"]
    return {
        c["image"]
        for p in pods
        if not p["metadata"].get("deletionTimestamp")
        for c in p["spec"]["containers"]
    }


def test_the_controllers_run_as_installed_one_leads_and_both_are_ready(edgevirt_installed):
    inst = edgevirt_installed
    k = inst.k
    inst.require("cluster")
    deployment = k.kubectl_json("get", "deployment", clusterside.DEPLOYMENT, "-n", NS)
    assert deployment["status"].get("readyReplicas") == 2 == deployment["spec"]["replicas"]
    pods = wait_for("both replicas ready", lambda: len(p := inst.pods("cluster")) == 2 and p, 120, 1)
    assert {c["image"] for p in pods for c in p["spec"]["containers"]} == {inst.image.ref}
    leader = wait_for("a leader", inst.leader, 60, 1)
    assert leader in {p["metadata"]["name"] for p in pods}
    rss = {}
    for pod in pods:
        name = pod["metadata"]["name"]
        assert pod["spec"]["securityContext"]["runAsUser"] == 65532
        assert inst.ops(name, "/readyz") == "ok\n" and inst.ops(name, "/healthz") == "ok\n"
        metrics = inst.ops(name, "/metrics")
        assert sample(metrics, "edgevirt_controller_leader", mode="cluster") == float(name == leader)
        assert sample(metrics, "edgevirt_controller_informer_synced", mode="cluster", resource="pods") == 1
        assert (
            sample(metrics, "edgevirt_controller_reconciles_total", mode="cluster", result="ok") is not None
        )
        rss[name] = sample(metrics, "process_resident_memory_bytes")
        logs = k.kubectl("logs", name, "-n", NS, "--tail=20").stdout.splitlines()
        assert logs and all(json.loads(line)["level"] for line in logs)  # JSON lines
    print(f"controller RSS (MiB): { {n: round(v / 2**20, 1) for n, v in rss.items()} }")
    pdb = k.kubectl_json("get", "pdb", clusterside.DEPLOYMENT, "-n", NS)
    assert pdb["spec"]["maxUnavailable"] == 1


def _running_vm(k, ns: str, name: str, image: str) -> tuple[str, str, int]:
    """A VM started and Ready; (uid, domain, QEMU pid)."""
    body = {
        "apiVersion": "edgevirt.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"running": True, "memory": "256Mi", "image": image},
    }
    k.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(body))
    k.kubectl("wait", "--for=condition=Ready", f"vm/{name}", "-n", ns, "--timeout=300s", timeout=320)
    uid = k.kubectl_json("get", "vm", name, "-n", ns)["metadata"]["uid"]
    [(domain, active)] = vm_domains(uid)
    pid = qemu_pid(domain)
    assert active and pid
    return uid, domain, pid


def test_an_upgrade_rolls_the_controllers_and_leaves_the_vm_running(cluster, edgevirt_installed, vm_image):
    inst = edgevirt_installed
    k = cluster
    for mode in ("cluster", "node"):
        inst.require(mode)
    with k.namespace("upgrade") as ns:
        try:
            uid, domain, pid = _running_vm(k, ns, "keep", vm_image)
            suffix = "upgrade-test"  # the same checkout makes the same image: no new tag per run
            new = clusterside.install(k.paths, version_suffix=suffix, quiet=True)
            assert new.tag.endswith(suffix) and new.digest != inst.image.digest
            # every controller runs the new image, and only those: the rollouts are done
            assert pod_images(k, clusterside.PART_OF) == {new.ref}
            for mode in ("cluster", "node"):
                inst.require(mode)
            assert qemu_pid(domain) == pid and vm_domains(uid) == [(domain, True)]
            # the new controllers act on the VM: pause and resume it
            k.patch("vm", "keep", {"spec": {"paused": True}}, namespace=ns)
            wait_for("Paused", lambda: _status(k, ns, "keep") == "Paused", 120, 1)
            k.patch("vm", "keep", {"spec": {"paused": False}}, namespace=ns)
            wait_for("Running", lambda: _status(k, ns, "keep") == "Running", 120, 1)
            assert qemu_pid(domain) == pid
            _restart_edgevirt_cri(k)
            assert qemu_pid(domain) == pid and vm_domains(uid) == [(domain, True)]
            k.kubectl("wait", "--for=condition=Ready", "vm/keep", "-n", ns, "--timeout=120s", timeout=150)
        finally:
            k.kubectl("delete", "vm", "--all", "-n", ns, "--wait=false", check=False)
            wait_for("the VM gone", lambda: not k.kubectl_json("get", "vm", "-n", ns)["items"], 180, 2)
            clusterside.write_overlay(inst.image, paths=k.paths)
            inst.restore()  # the session's image again: a downgrade rolls just as well
    assert pod_images(k, clusterside.PART_OF) == {inst.image.ref}


def _status(k, ns: str, name: str) -> str | None:
    return k.kubectl_json("get", "vm", name, "-n", ns).get("status", {}).get("printableStatus")


def _restart_edgevirt_cri(k) -> None:
    """Stop edgevirt-cri and start it again from its unit's ExecStart (deploy/local/up edgevirt-cri)."""
    proc = BY_NAME["edgevirt-cri"].process(k.paths)
    old = proc.pid()
    assert old and proc.stop(grace=30)
    res = k.up("edgevirt-cri")
    assert res.returncode == 0, res.stdout + res.stderr
    assert proc.pid() not in (None, old)


def kustomized_objects(k) -> list[tuple[str, str, str | None]]:
    """(kind, name, namespace) of every object `kubectl apply -k deploy/` makes."""
    out = k.kubectl("kustomize", str(REPO / "deploy")).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    return [(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs]


def test_removal_takes_every_object_of_the_cluster_side_and_an_install_brings_it_back(
    cluster, edgevirt_installed
):
    inst = edgevirt_installed
    k = cluster
    objects = kustomized_objects(k)
    assert ("Deployment", clusterside.DEPLOYMENT, NS) in objects
    wait_for(
        "no VirtualMachines left",
        lambda: not clusterside.virtual_machines(k.paths),
        180,
        2,
        explain=lambda: cluster.describe_vms(),
    )
    try:
        k.kubectl("delete", "-k", str(REPO / "deploy"), "--wait=true", "--timeout=300s", timeout=330)
        wait_for(
            "namespace edgevirt-system gone",
            lambda: k.kubectl("get", "ns", NS, check=False).returncode,
            300,
            2,
        )
        for kind, name, namespace in objects:
            where = ["-n", namespace] if namespace else []
            r = k.kubectl("get", kind, name, *where, "--ignore-not-found", "-o", "name", check=False)
            assert r.stdout.strip() == "", f"{kind} {name} is still there"
        assert not k.kubectl_json("get", "pods", "-A", "-l", clusterside.PART_OF)["items"]
    finally:
        inst.restore()
    inst.require("cluster")
