"""Tenant isolation on the real API server: the admission policies of
deploy/manifests/admission-policies.yaml and the RBAC of deploy/manifests/vmcrd-rbac.yaml.

The principals, as the API server sees them:

* the tenant: ServiceAccount ``tenant`` of namespace A with the standard ``edit`` ClusterRole bound
  in A only (kubectl impersonates it with ``--as``; ``kubectl vm`` uses its token);
* the controller: ``system:serviceaccount:edgevirt-system:edgevirt-controller`` (impersonated);
* the node account: real tokens of ``edgevirt-node`` bound to this cluster's Node (its name is in
  the user info's extra ``authentication.kubernetes.io/node-name``), and one bound to nothing;
* the cluster admin (the admin kubeconfig): subject to the pod contract policy too.

Requests that must be refused are sent for real or as server-side dry runs (which run admission);
nothing a refused request would make is left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.waiting import wait_for

from cri_shim.kvm import contract
from vmcrd import api, podspec

# the installed controllers stand aside: status and finalizers are written here as the controllers'
# accounts would (conftest installed_controllers_paused)
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("installed_controllers_paused"),
]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CONTROLLER = "system:serviceaccount:edgevirt-system:edgevirt-controller"
#: pods stored by these tests are pinned here: they never run (no VM boots, no disk is made)
NOWHERE = "edgevirt-policy-test-no-such-node"
RESERVED = [
    contract.ANN_VM_UID,
    contract.ANN_VM_NAME,
    contract.ANN_IMAGE,
    contract.ANN_MAC,
    contract.ANN_KERNEL_BOOT,
    contract.ANN_VOLUMES,
    podspec.ANN_SPEC_HASH,
    podspec.ANN_STATE_REQUEST,
    "edgevirt.io/anything-new",
]


def plain_pod(
    name: str = "plain", annotations: dict | None = None, runtime_class: str = "kvm", runs: bool = False
) -> dict:
    """A plain kvm pod as a tenant writes it (the container image is the VM's disk); unless it
    ``runs``, pinned to no node."""
    spec = {
        "runtimeClassName": runtime_class,
        "terminationGracePeriodSeconds": 5,
        "containers": [{"name": "compute", "image": "127.0.0.1:5000/vm/test-disk:1"}],
    }
    if not runs:
        spec["nodeSelector"] = {"kubernetes.io/hostname": NOWHERE}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": spec,
    }


class Tenancy:
    """Two tenant namespaces (A with the tenant's edit binding, B another tenant's) on the cluster."""

    def __init__(self, k, a: str, b: str, tmp: Path) -> None:
        self.k, self.a, self.b, self.tmp = k, a, b, tmp
        self.tenant = f"system:serviceaccount:{a}:tenant"

    def run(self, *args: str, user: str | None = None, input: str | None = None, dry: bool = False):
        """kubectl as ``user`` (impersonated; None: the cluster admin), never raising."""
        extra = ([f"--as={user}"] if user else []) + (["--dry-run=server"] if dry else [])
        return self.k.kubectl(*args, *extra, input=input, check=False)

    def create(self, obj: dict, ns: str, user: str | None = None, dry: bool = True):
        return self.run("create", "-n", ns, "-f", "-", user=user, input=json.dumps(obj), dry=dry)

    def vm(self, name: str, ns: str | None = None, **spec) -> dict:
        body = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": name, "finalizers": [api.FINALIZER]},
            "spec": {"image": "127.0.0.1:5000/vm/test-disk:1", **spec},
        }
        self.k.kubectl("apply", "-n", ns or self.a, "-f", "-", input=json.dumps(body))
        return self.k.kubectl_json("get", "vm", name, "-n", ns or self.a)

    def status(self, name: str, st: dict, ns: str | None = None) -> None:
        self.k.patch("vm", name, {"status": st}, namespace=ns or self.a, subresource="status")

    def node_kubectl(self, kubeconfig: Path, *args: str):
        return self.k.kubectl("--kubeconfig", str(kubeconfig), *args, check=False)


@pytest.fixture(scope="module")
def installed(cluster):
    """CRD, RBAC and admission policies (as `kubectl apply -k deploy/`), the RuntimeClasses."""
    cluster.install_vm_crd(rbac=True)
    cluster.kubectl("apply", "-f", str(REPO / "deploy/manifests/runtimeclasses.yaml"))
    return cluster


@pytest.fixture
def t(installed, tmp_path):
    k = installed
    with (
        k.namespace("tenant-a", drop_vm_finalizers=True) as a,
        k.namespace("tenant-b", drop_vm_finalizers=True) as b,
    ):
        k.kubectl("create", "serviceaccount", "tenant", "-n", a)
        k.kubectl(
            "create",
            "rolebinding",
            "tenant-edit",
            "-n",
            a,
            "--clusterrole=edit",
            f"--serviceaccount={a}:tenant",
        )
        tn = Tenancy(k, a, b, tmp_path)
        # the API server loads new policies asynchronously: wait until each one answers
        wait_for(
            "the pod contract policy",
            lambda: tn.create(plain_pod(annotations={contract.ANN_VM_UID: "x"}), a).returncode,
        )
        wait_for(
            "the controller policy",
            lambda: tn.create(plain_pod(runtime_class="runc"), a, CONTROLLER).returncode,
        )
        yield tn


# ------------------------------------------------------------------ the pod contract (policy 1)
@pytest.mark.parametrize("annotation", RESERVED)
@pytest.mark.parametrize("who", ["tenant", "admin"])
def test_nobody_but_the_controller_may_put_a_reserved_annotation_on_a_pod(t, annotation, who):
    user = t.tenant if who == "tenant" else None
    r = t.create(plain_pod(annotations={annotation: "x"}), t.a, user)
    assert r.returncode != 0
    assert f"metadata.annotations: {annotation} is reserved for edgevirt-controller" in r.stderr, r.stderr
    assert "create a VirtualMachine instead" in r.stderr


def test_a_plain_kvm_pod_may_carry_only_cloud_init_user_data(t):
    ok = t.create(
        plain_pod(annotations={contract.ANN_CLOUD_INIT_USER_DATA: "#cloud-config\n"}), t.a, t.tenant
    )
    assert ok.returncode == 0, ok.stderr
    both = {contract.ANN_CLOUD_INIT_USER_DATA: "#cloud-config\n", contract.ANN_IMAGE: "file:///etc/shadow"}
    r = t.create(plain_pod(annotations=both), t.a, t.tenant)
    assert r.returncode != 0 and f"{contract.ANN_IMAGE} is reserved" in r.stderr


def test_updates_keeping_the_contract_pass_and_changes_of_it_are_refused(t):
    """A VM pod as the controller makes it: kubelet's status writes, a label, the garbage collector's
    owner updates carry its annotations unchanged and pass; adding, changing or removing one is refused."""
    vm = t.vm("web")
    pod = podspec.build_pod(vm, NOWHERE)
    r = t.create(pod, t.a, CONTROLLER, dry=False)
    assert r.returncode == 0, r.stderr
    assert t.run("label", "pod", "web-vm", "-n", t.a, "team=a", user=t.tenant).returncode == 0
    cond = {"status": {"conditions": [{"type": "Example", "status": "True"}]}}
    st = t.k.patch("pod", "web-vm", cond, namespace=t.a, subresource="status", check=False)
    assert st.returncode == 0, st.stderr
    for patch in (
        {contract.ANN_IMAGE: "file:///etc/shadow"},  # changed
        {contract.ANN_VM_UID: None},  # removed
        {contract.ANN_MAC: "02:00:00:00:00:09"},  # added
    ):
        for user in (t.tenant, None):
            body = json.dumps({"metadata": {"annotations": patch}})
            r = t.run("patch", "pod", "web-vm", "-n", t.a, "--type", "merge", "-p", body, user=user)
            assert r.returncode != 0 and "reserved for edgevirt-controller" in r.stderr, (patch, r.stderr)
    sneaky = {"metadata": {"annotations": {contract.ANN_IMAGE: "x"}}}
    r = t.k.patch("pod", "web-vm", sneaky, namespace=t.a, subresource="status", check=False)
    assert r.returncode != 0 and f"{contract.ANN_IMAGE} is reserved" in r.stderr
    got = t.k.kubectl_json("get", "pod", "web-vm", "-n", t.a)["metadata"]["annotations"]
    assert got == pod["metadata"]["annotations"]


# ------------------------------------------------------------------ the controller (policy 2)
def controller_pod(t) -> dict:
    vm = t.vm("web", cloudInit={"userDataSecretRef": {"name": "web-init"}})
    return podspec.build_pod(vm, t.k.node)


def test_the_controller_may_create_the_vm_pods_it_builds(t):
    """... also where Pod Security Admission enforces the baseline profile (docs/security.md)."""
    pod = controller_pod(t)
    assert pod["spec"]["volumes"][0]["secret"]["secretName"] == "web-init"
    t.k.kubectl("label", "namespace", t.a, "pod-security.kubernetes.io/enforce=baseline")
    r = t.create(pod, t.a, CONTROLLER)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda p: p["spec"].update(runtimeClassName="runc"), "spec.runtimeClassName must be kvm"),
        (lambda p: p["spec"].pop("runtimeClassName"), "spec.runtimeClassName must be kvm"),
        (lambda p: p["metadata"].pop("ownerReferences"), "one controller reference"),
        (lambda p: p["metadata"]["ownerReferences"][0].update(kind="ReplicaSet"), "one controller reference"),
        (lambda p: p["metadata"]["labels"].pop(podspec.LABEL_VM), "label edgevirt.io/vm"),
        (lambda p: p["metadata"]["labels"].update({podspec.LABEL_VM: "other"}), "label edgevirt.io/vm"),
        (lambda p: p["spec"].update(hostNetwork=True), "host's namespaces"),
        (lambda p: p["spec"].update(hostPID=True), "host's namespaces"),
        (lambda p: p["spec"].update(hostIPC=True), "host's namespaces"),
        (lambda p: p["spec"]["containers"][0].update(securityContext={"privileged": True}), "privileged"),
        (
            lambda p: p["spec"]["containers"][0].update(
                securityContext={"capabilities": {"add": ["SYS_ADMIN"]}}
            ),
            "privileged",
        ),
        (
            lambda p: p["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
            "mount only Secrets",
        ),
        (lambda p: p["spec"].pop("automountServiceAccountToken"), "mount only Secrets"),  # a projected token
        (lambda p: p["spec"].update(automountServiceAccountToken=True), "mount only Secrets"),
    ],
)
def test_the_controller_may_create_nothing_but_vm_pods(t, change, needle):
    pod = controller_pod(t)
    change(pod)
    r = t.create(pod, t.a, CONTROLLER)
    assert r.returncode != 0 and needle in r.stderr, r.stderr


def test_the_controller_may_delete_only_vm_pods(t):
    vm_pod = podspec.build_pod(t.vm("web"), NOWHERE)
    assert t.create(vm_pod, t.a, CONTROLLER, dry=False).returncode == 0
    assert t.create(plain_pod(), t.a, dry=False).returncode == 0
    r = t.run("delete", "pod", "plain", "-n", t.a, user=CONTROLLER, dry=True)
    assert r.returncode != 0 and "may delete only VM pods" in r.stderr
    r = t.run("delete", "pod", "web-vm", "-n", t.a, user=CONTROLLER, dry=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ the node account (policy 3)
@pytest.fixture
def node_kc(t):
    """Kubeconfigs of edgevirt-node: bound to this cluster's Node, and bound to nothing."""
    bound = t.k.service_account_kubeconfig("edgevirt-node", t.tmp / "node.kubeconfig", "1h")
    token = t.k.kubectl("create", "token", "edgevirt-node", "-n", "edgevirt-system", "--duration=1h").stdout
    unbound = t.k.token_kubeconfig("edgevirt-node", token.strip(), t.tmp / "unbound.kubeconfig")
    return bound, unbound


def node_status_patch(t, kc: Path, name: str, status: dict):
    body = json.dumps({"status": status})
    return t.node_kubectl(
        kc, "patch", "vm", name, "-n", t.a, "--subresource=status", "--type=merge", "-p", body
    )


def test_the_node_account_writes_only_vms_on_its_own_node(t, node_kc):
    bound, _ = node_kc
    me = t.k.node
    t.vm("here")
    t.status("here", {"nodeName": me, "printableStatus": "Running"})
    t.vm("there")
    t.status("there", {"nodeName": "elsewhere", "printableStatus": "Running"})
    t.vm("pinned-here", nodeName=me)  # no status yet: the pin says where it will live
    t.vm("pinned-there", nodeName="elsewhere")
    t.vm("moved", nodeName=me)  # pinned here, but its status says it lives elsewhere: status wins
    t.status("moved", {"nodeName": "elsewhere"})
    t.vm("nowhere")
    facts = {"domainState": "Running", "accel": "tcg"}
    for name in ("here", "pinned-here"):
        r = node_status_patch(t, bound, name, facts)
        assert r.returncode == 0, (name, r.stderr)
    for name, where in (
        ("there", "on elsewhere"),
        ("pinned-there", "on elsewhere"),
        ("moved", "on elsewhere"),
    ):
        r = node_status_patch(t, bound, name, facts)
        assert r.returncode != 0 and f"edgevirt-node of node {me} may write only" in r.stderr, r.stderr
        assert f"this one is {where}" in r.stderr
    r = node_status_patch(t, bound, "nowhere", facts)
    assert r.returncode != 0 and "this one is on no node yet" in r.stderr
    assert t.k.kubectl_json("get", "vm", "there", "-n", t.a)["status"].get("domainState") is None


def test_a_node_account_token_bound_to_no_node_writes_nothing(t, node_kc):
    _, unbound = node_kc
    t.vm("here")
    t.status("here", {"nodeName": t.k.node})
    r = node_status_patch(t, unbound, "here", {"domainState": "Running"})
    assert r.returncode != 0 and "--bound-object-kind Node" in r.stderr


def test_the_node_account_may_write_node_state_and_drop_its_finalizer_only(t, node_kc):
    bound, _ = node_kc
    t.vm("here")
    t.status("here", {"nodeName": t.k.node, "printableStatus": "Running"})
    r = node_status_patch(t, bound, "here", {"printableStatus": "Stopped"})
    assert r.returncode != 0 and "cluster mode's" in r.stderr
    refused = [
        {"spec": {"paused": True}},
        {"metadata": {"labels": {"x": "y"}}},
        {"metadata": {"annotations": {api.STATE_REQUEST: "start"}}},
        {"metadata": {"finalizers": [api.FINALIZER, "example.com/other"]}},
    ]
    for body in refused:
        r = t.node_kubectl(bound, "patch", "vm", "here", "-n", t.a, "--type=merge", "-p", json.dumps(body))
        assert r.returncode != 0 and "edgevirt-node may" in r.stderr, (body, r.stderr)
    t.k.patch("vm", "here", {"metadata": {"finalizers": ["example.com/other", api.FINALIZER]}}, namespace=t.a)
    drop_other = json.dumps({"metadata": {"finalizers": [api.FINALIZER]}})
    r = t.node_kubectl(bound, "patch", "vm", "here", "-n", t.a, "--type=merge", "-p", drop_other)
    assert r.returncode != 0 and "may only remove the finalizer edgevirt.io/node-cleanup" in r.stderr
    drop_ours = json.dumps({"metadata": {"finalizers": ["example.com/other"]}})
    r = t.node_kubectl(bound, "patch", "vm", "here", "-n", t.a, "--type=merge", "-p", drop_ours)
    assert r.returncode == 0, r.stderr
    t.k.patch("vm", "here", {"metadata": {"finalizers": None}}, namespace=t.a)


# ------------------------------------------------------------------ a namespace user (RBAC)
@pytest.mark.parametrize(
    ("verb", "resource", "where", "allowed"),
    [
        ("create", "virtualmachines.edgevirt.io", "a", True),
        ("patch", "virtualmachines.edgevirt.io", "a", True),
        ("delete", "virtualmachines.edgevirt.io", "a", True),
        ("patch", "virtualmachines.edgevirt.io/status", "a", False),
        ("get", "virtualmachines.edgevirt.io/status", "a", True),
        ("create", "pods/attach", "a", True),
        ("get", "pods/log", "a", True),
        ("get", "virtualmachines.edgevirt.io", "b", False),
        ("create", "pods", "b", False),
        ("create", "pods/attach", "b", False),
        ("get", "secrets", "b", False),
    ],
)
def test_the_tenant_has_vms_through_the_standard_edit_role_in_its_namespace_only(
    t, verb, resource, where, allowed
):
    ns = t.a if where == "a" else t.b
    r = t.run("auth", "can-i", verb, *can_i_resource(resource), "-n", ns, user=t.tenant)
    assert r.stdout.strip() == ("yes" if allowed else "no"), (r.stdout, r.stderr)


def can_i_resource(resource: str) -> list[str]:
    """``kubectl auth can-i`` arguments for ``resource[/subresource]`` (it reads ``a/b`` as name b)."""
    res, _, sub = resource.partition("/")
    return [res, f"--subresource={sub}"] if sub else [res]


@pytest.mark.parametrize(
    ("role", "verb", "allowed"), [("view", "get", True), ("view", "patch", False), ("admin", "delete", True)]
)
def test_the_vm_roles_are_aggregated_into_view_and_admin(t, role, verb, allowed):
    t.k.kubectl("create", "rolebinding", f"u-{role}", "-n", t.a, f"--clusterrole={role}", f"--user=u-{role}")
    r = t.run("auth", "can-i", verb, "virtualmachines.edgevirt.io", "-n", t.a, user=f"u-{role}")
    assert r.stdout.strip() == ("yes" if allowed else "no"), (r.stdout, r.stderr)


def test_the_tenant_drives_its_vms_with_kubectl_vm_and_cannot_reach_another_namespace(t):
    token = t.k.kubectl("create", "token", "tenant", "-n", t.a, "--duration=1h").stdout.strip()
    kc = t.k.token_kubeconfig("tenant", token, t.tmp / "tenant.kubeconfig")
    env = {**t.k.env, "PATH": f"{VENV_BIN}:{t.k.env['PATH']}"}

    def vm_cmd(*args: str, ns: str = t.a):
        return subprocess.run(
            ["kubectl", "vm", *args, "-n", ns, "--kubeconfig", str(kc)],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    body = json.dumps({"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "web"},
                       "spec": {"image": "127.0.0.1:5000/vm/test-disk:1", "running": False}})  # fmt: skip
    assert t.run("apply", "-n", t.a, "-f", "-", input=body, user=t.tenant).returncode == 0
    for args, field, want in (
        (("start", "web"), "running", True),
        (("pause", "web"), "paused", True),
        (("stop", "web"), "running", False),
    ):
        r = vm_cmd(*args)
        assert r.returncode == 0, r.stderr
        assert t.k.kubectl_json("get", "vm", "web", "-n", t.a)["spec"][field] is want
    r = vm_cmd("mount", "web", "--volume-name", "d", "--empty-disk", "64Mi")
    assert r.returncode == 0, r.stderr
    t.vm("theirs", ns=t.b)
    r = vm_cmd("start", "theirs", ns=t.b)
    assert r.returncode == 1 and "forbidden" in r.stderr.lower()
    assert "running" not in t.k.kubectl_json("get", "vm", "theirs", "-n", t.b)["spec"]


def test_the_tenant_runs_a_plain_kvm_pod_and_reads_its_console(t, vm_image):
    r = t.create(plain_pod(runs=True), t.a, t.tenant, dry=False)
    assert r.returncode == 0, r.stderr
    t.run("wait", "--for=condition=Ready", "pod/plain", "-n", t.a, "--timeout=240s", user=t.tenant)
    wait_for(
        "the guest's console in kubectl logs (as the tenant)",
        lambda: "EDGEVIRT-GUEST" in t.run("logs", "plain", "-n", t.a, user=t.tenant).stdout,
        240,
        2,
    )
    t.run("delete", "pod", "plain", "-n", t.a, "--wait=true", "--timeout=120s", user=t.tenant)
