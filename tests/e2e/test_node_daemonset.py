"""End to end: the node DaemonSets of deploy/manifests/node-daemonset.yaml on the local cluster.

The edgevirt image is built from this checkout and pushed to the local registry; ``kubectl apply``
of deploy/ (through an overlay that pins that image by digest with kustomize's ``images:`` and
moves the local cluster's paths, tests/helpers/daemonsets.py); the local cluster's own macvtap
daemon hands its socket over to the DaemonSet's for the module. Then:

* both DaemonSets roll out; the static macvtap plugin is in /opt/cni/bin, marked ours, and the
  plugin that was there is kept;
* the Node carries the labeller's labels with the probe's verdict (TCG here: KVM guests hang), and
  the node account can change nothing else: not another label, not another Node;
* a kvm pod (RuntimeClass kvm: node selector and overhead) runs with its CNI calls served by the
  DaemonSet's macvtap daemon (the plugin on the host can do nothing else; its IPAM plugin is the
  node's, found under ``--host-root``), gets an IP and answers ping from the VM network's LAN;
* a kata pod stays Pending, the scheduler naming the node selector (no Kata here);
* the node-mode controller patches a VM of its node with its pod's token and is refused for a VM
  whose status names another node;
* deleting the DaemonSets and ``edgevirt-node uninstall`` (the kubelet's kubeconfig) leave no
  labels, and the CNI bin dir as it was.

The memory of each container is printed (``-s``): it sets the manifests' requests and limits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import REPO
from helpers import daemonsets as ds
from helpers.netns import wait_lossless_ping
from helpers.waiting import wait_for as wait
from kubernetes import client as kube
from kubernetes import config as kube_config

from runtimeclass.labels import LABEL_KVM_HANDLER, LABEL_PREFIX
from runtimeclass.probe import DEFAULT_CACHE, probe
from runtimeclass.result import LABEL_ACCEL, LABEL_KATA, LABEL_KVM

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

VM_LAN = "edgevirt-vmnet"
CNI_BIN = Path("/opt/cni/bin")
KVM_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "spec": {
        "runtimeClassName": "kvm",
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 30,
        "containers": [
            {
                "name": "vm",
                "resources": {
                    "limits": {"cpu": "1", "memory": "256Mi"},
                    "requests": {"cpu": "10m", "memory": "256Mi"},
                },
            }
        ],
    },
}


def cni_bin_snapshot() -> dict[str, bytes | str]:
    return {
        p.name: (f"link:{p.readlink()}" if p.is_symlink() else p.read_bytes())
        for p in sorted(CNI_BIN.iterdir())
    }


@pytest.fixture(scope="module")
def deployed(cluster):
    """The DaemonSets rolled out with this checkout's image; afterwards the cluster as it was."""
    kubectl = [cluster.paths.tool("kubectl"), f"--kubeconfig={cluster.paths.kubeconfig}"]
    digest = ds.build_and_push_image()
    docs = ds.local_cluster_objects(kubectl, digest, cluster.paths)
    before = cni_bin_snapshot()
    with ds.macvtap_daemon_handed_over(cluster.paths, cluster.up):
        try:
            with ds.applied(kubectl, docs):
                ds.wait_rolled_out(kubectl)
                yield {"kubectl": kubectl, "digest": digest, "cni_bin_before": before}
        finally:
            uninstall(cluster)  # the plugin copy and the labels, whatever the tests got to
            relabel(cluster, kubectl)
    assert cni_bin_snapshot() == before


def relabel(cluster, kubectl: list[str]) -> None:
    """The session's labeller writes the labels again at once (a new pod's first pass) rather than
    in 10 minutes, and the session's edgevirt-node lands again: later tests schedule kvm pods."""
    from localcluster import clusterside

    subprocess.run(
        [*kubectl, "delete", "pods", "-n", ds.NAMESPACE, "--wait=false",
         "-l", "app.kubernetes.io/name=edgevirt-node-labeller"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    if clusterside.workloads(cluster.paths):
        clusterside.wait_labelled(cluster.paths, 300)
        clusterside.wait_rollout(cluster.paths, 300)


def uninstall(cluster) -> dict:
    """``edgevirt-node uninstall`` of this checkout with the kubelet's kubeconfig (no install record:
    the local cluster's own node install is not this test's to remove)."""
    argv = [
        *(sys.executable, "-m", "cri_shim.node.cli", "uninstall", "--json"),
        "--record=/nonexistent/record.json",
        f"--kubeconfig={cluster.paths.etc / 'kubelet.kubeconfig'}",
        f"--cni-bin-dir={CNI_BIN}",
    ]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def node_labels(cluster) -> dict[str, str]:
    return cluster.kubectl_json("get", "node", cluster.node)["metadata"]["labels"]


def test_the_daemonsets_roll_out_and_the_plugin_is_on_the_host_marked_as_ours(deployed, cluster) -> None:
    marker = json.loads((CNI_BIN / ".macvtap.edgevirt").read_text())
    import hashlib

    plugin = (CNI_BIN / "macvtap").read_bytes()
    assert hashlib.sha256(plugin).hexdigest() == marker["ours"][0]
    assert plugin[:4] == b"\x7fELF" and b"python" not in plugin.lower()  # the static daemon-only build
    before = deployed["cni_bin_before"].get("macvtap")
    if before is not None:  # the local cluster's own plugin is kept, to be put back by uninstall
        assert marker["backup"] is not None
        assert (CNI_BIN / ".macvtap.edgevirt-backup").read_bytes() == before
    for name, containers in (
        ("edgevirt-node-labeller", ["labeller"]),
        ("edgevirt-node", ["macvtap-daemon", "controller"]),
    ):
        pod = ds.pod_of(deployed["kubectl"], name)
        for c in containers:
            print(f"memory of {name}/{c}: {ds.container_memory(cluster.crictl, pod, c)}")


def test_the_node_has_the_probes_labels_and_the_node_account_nothing_else(
    deployed, cluster, tmp_path
) -> None:
    verdict = probe(cache_file=DEFAULT_CACHE)  # the host's own probe, as edgevirt-cri runs it
    want = {
        LABEL_KVM: "true" if verdict.kvm.ok else "false",
        LABEL_ACCEL: verdict.accel,
        LABEL_KATA: "false",  # no Kata on these machines
        LABEL_KVM_HANDLER: "true",  # the local cluster's edgevirt-cri serves kvm
    }
    labelled = lambda: all(node_labels(cluster).get(k) == v for k, v in want.items())  # noqa: E731
    wait("the labeller to label the node", labelled, 300, 2)
    labeller = ds.pod_of(deployed["kubectl"], "edgevirt-node-labeller")

    # the labels may be an earlier labeller's: this pod says its own verdict once its first pass ends
    def said() -> bool:
        text = cluster.kubectl("logs", "-n", ds.NAMESPACE, labeller).stdout
        return verdict.kvm.reason.split(" (")[0] in text and "edgevirt-cri serves" in text

    wait("the labeller's pass to say the probe's verdict", said, 180, 2)
    # the node account, with a token bound to this node: its edgevirt.io/ labels only, its Node only
    # (PATCH requests as the labeller sends them: the account may not read Nodes, so neither
    # `kubectl label` nor `kubectl patch`, which both read the object first)
    kc = cluster.service_account_kubeconfig("edgevirt-node", tmp_path / "node.kubeconfig")
    api = kube.CoreV1Api(kube_config.new_client_from_config(str(kc)))

    def as_node(node: str, patch: dict) -> subprocess.CompletedProcess:
        """The PATCH's outcome, shaped as kubectl's (returncode, stderr)."""
        try:
            api.patch_node(node, patch, _request_timeout=30)
        except kube.ApiException as e:
            return subprocess.CompletedProcess([], 1, "", f"{e.status} {e.reason}: {e.body}")
        return subprocess.CompletedProcess([], 0, "", "")

    def labels_patch(labels: dict) -> dict:
        return {"metadata": {"labels": labels}}

    ok = as_node(cluster.node, labels_patch({f"{LABEL_PREFIX}e2e": "yes"}))
    assert ok.returncode == 0, ok.stderr
    assert as_node(cluster.node, labels_patch({f"{LABEL_PREFIX}e2e": None})).returncode == 0
    foreign = as_node(cluster.node, labels_patch({"e2e.example/x": "1"}))
    assert (
        foreign.returncode != 0
        and "only edgevirt.io/ labels" in foreign.stderr
        and "e2e.example/x" in foreign.stderr
    )
    taint = as_node(
        cluster.node, {"spec": {"taints": [{"key": "e2e", "value": "x", "effect": "NoSchedule"}]}}
    )
    assert taint.returncode != 0 and "may not change a Node's spec" in taint.stderr
    ghost = f"e2e-ghost-{uuid.uuid4().hex[:6]}"  # a Node object only (Windows: no DaemonSet goes there)
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": ghost}}
    node["metadata"]["labels"] = {"kubernetes.io/os": "windows"}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(node))
    try:
        other = as_node(ghost, labels_patch({LABEL_KVM: "true"}))
        assert other.returncode != 0 and f"may label only its own Node, not {ghost}" in other.stderr
        reads = cluster.kubectl("--kubeconfig", str(kc), "get", "node", cluster.node, check=False)
        assert reads.returncode != 0 and "forbidden" in reads.stderr  # patch only: no read granted
    finally:
        cluster.kubectl("delete", "node", ghost, "--wait=false", check=False)


def test_a_kvm_pod_runs_with_the_daemonsets_macvtap_daemon(deployed, cluster, vm_image) -> None:
    name = f"e2e-ds-kvm-{uuid.uuid4().hex[:6]}"
    pod = json.loads(json.dumps(KVM_POD))
    pod["metadata"] = {"name": name}
    pod["spec"]["containers"][0]["image"] = vm_image
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    try:
        cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=300s", timeout=320)
        got = cluster.kubectl_json("get", "pod", name)
        rc = cluster.kubectl_json("get", "runtimeclass", "kvm")
        assert got["spec"]["overhead"] == rc["overhead"]["podFixed"]  # the RuntimeClass's, on the pod
        ip = got["status"]["podIP"]
        assert ip.startswith("10.245.0."), got["status"]
        sandbox = cluster.cri(via_shim=True).json("pods", "--name", name, "-o", "json")["items"][0]["id"]
        daemon_log = cluster.kubectl(
            "logs",
            "-n",
            ds.NAMESPACE,
            ds.pod_of(deployed["kubectl"], "edgevirt-node"),
            "-c",
            "macvtap-daemon",
        ).stdout
        records = [json.loads(line) for line in daemon_log.splitlines() if sandbox in line]
        calls = [r for r in records if "command" in r]  # one line per call; exit_code when it failed
        outcome = [(c["command"], c.get("exit_code", 0), c["message"].endswith(" ms")) for c in calls]
        assert outcome == [("ADD", 0, True)], daemon_log[-2000:]
        booted = lambda: "EDGEVIRT-GUEST: up" in cluster.kubectl("logs", name).stdout  # noqa: E731
        wait("kubectl logs to show the boot", booted, 300, 2)
        wait_lossless_ping(VM_LAN, ip, 60)  # from the VM network's LAN
    finally:
        cluster.kubectl("delete", "pod", name, "--wait=true", "--timeout=120s", check=False, timeout=150)


def test_a_kata_pod_stays_pending_naming_the_node_selector(deployed, cluster) -> None:
    name = f"e2e-ds-kata-{uuid.uuid4().hex[:6]}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"runtimeClassName": "kata", "containers": [{"name": "c", "image": "busybox:latest"}]},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    try:

        def unschedulable() -> dict | None:
            conds = cluster.kubectl_json("get", "pod", name)["status"].get("conditions") or []
            return next((c for c in conds if c["type"] == "PodScheduled" and c["status"] == "False"), None)

        cond = wait("the scheduler to give its reason", unschedulable, 120, 1)
        assert cond["reason"] == "Unschedulable"
        assert "didn't match Pod's node affinity/selector" in cond["message"], cond
        assert cluster.kubectl_json("get", "pod", name)["status"]["phase"] == "Pending"
    finally:
        cluster.kubectl("delete", "pod", name, "--wait=false", check=False)


EXEC_PATCH = """
import sys
from kubernetes import client, config
config.load_incluster_config()
try:
    api = client.CustomObjectsApi()
    patch = {"metadata": {"finalizers": None}}
    ns, name = sys.argv[1:3]
    api.patch_namespaced_custom_object("edgevirt.io", "v1alpha1", ns, "virtualmachines", name, patch)
    print("PATCHED")
except client.ApiException as e:
    print(e.status, e.body)
"""


def test_the_node_mode_controller_writes_only_its_own_nodes_vms(deployed, cluster) -> None:
    with cluster.namespace("e2e-ds-node", drop_vm_finalizers=True) as ns:
        for name, status_node in (("mine", None), ("theirs", "another-node")):
            vm = {
                "apiVersion": "edgevirt.io/v1alpha1",
                "kind": "VirtualMachine",
                "metadata": {"name": name, "finalizers": ["edgevirt.io/node-cleanup"]},
                "spec": {
                    "runStrategy": "Halted",
                    "nodeName": cluster.node,
                    "image": "127.0.0.1:5000/vm/test-disk:1",
                },
            }
            cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(vm))
            if status_node:
                cluster.patch(
                    "vm", name, {"status": {"nodeName": status_node}}, namespace=ns, subresource="status"
                )
        # its own node's VM: deleting it, node mode cleans up and removes the finalizer (a patch)
        cluster.kubectl("delete", "vm", "mine", "-n", ns, "--wait=false")
        gone = lambda: cluster.kubectl("get", "vm", "mine", "-n", ns, check=False).returncode != 0  # noqa: E731
        wait("node mode to release the VM of its node", gone, 120, 1)
        # another node's VM: the same patch with the pod's own token is refused
        pod = ds.pod_of(deployed["kubectl"], "edgevirt-node")
        exec_ = ["exec", "-n", ds.NAMESPACE, pod, "-c", "controller", "--"]
        r = cluster.kubectl(*exec_, "python3", "-c", EXEC_PATCH, ns, "theirs", check=False)
        assert r.stdout.startswith("403"), r.stdout + r.stderr
        assert (
            f"edgevirt-node of node {cluster.node} may write only VirtualMachines on its own node" in r.stdout
        )
        assert "this one is on another-node" in r.stdout
        assert cluster.kubectl_json("get", "vm", "theirs", "-n", ns)["metadata"]["finalizers"]


def test_deleting_the_daemonsets_and_uninstall_leave_no_labels_and_the_cni_dir_as_it_was(
    deployed, cluster
) -> None:
    kubectl = deployed["kubectl"]
    for name in ds.DAEMONSETS:
        cluster.kubectl(
            "delete", "daemonset", name, "-n", ds.NAMESPACE, "--wait=true", "--timeout=180s", timeout=240
        )
    # the DaemonSets' pods only (the controller Deployment's are part of edgevirt too, and stay)
    selector = ["-n", ds.NAMESPACE, "-l", f"app.kubernetes.io/name in ({','.join(ds.DAEMONSETS)})"]
    pods_gone = lambda: not cluster.kubectl_json("get", "pods", *selector)["items"]  # noqa: E731
    wait("the DaemonSets' pods to be gone", pods_gone, 180, 2)
    out = uninstall(cluster)
    assert out["ok"], out
    actions = {(c["kind"], c["action"]) for c in out["changes"]}
    assert ("label", "removed") in actions  # the kubelet's own credentials may (NodeRestriction)
    assert not [k for k in node_labels(cluster) if k.startswith(LABEL_PREFIX)]
    assert cni_bin_snapshot() == deployed["cni_bin_before"]  # ours gone, the one it replaced back
    again = uninstall(cluster)
    assert again["ok"] and again["changes"] == []
    assert kubectl  # the module fixture puts back the rest
