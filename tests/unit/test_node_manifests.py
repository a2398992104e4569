"""The node manifests agree with the code they run: the image tag of kustomize's images: entry is the
wheel's version (what build-edgevirt-image tags), the RuntimeClasses and DaemonSets select by the
labels the labeller writes, the init container copies the file the image build puts in the image,
the daemon serves the socket the plugin calls by default, and the node account may only patch
Nodes (no read, no other verb)."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from cni_macvtap import defaults
from runtimeclass.labels import LABEL_KVM_HANDLER
from runtimeclass.result import LABEL_KATA

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy/images"))
import macvtap_static  # noqa: E402

pytestmark = pytest.mark.timeout(30)
IMAGE = "127.0.0.1:5000/edgevirt/edgevirt"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((REPO / "deploy/manifests" / name).read_text()) if d]


def by_name(objs: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def containers(ds: dict) -> dict[str, dict]:
    spec = ds["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def test_the_kustomization_lists_the_node_manifests_and_sets_the_image_tag_to_the_version() -> None:
    kust = yaml.safe_load((REPO / "deploy/kustomization.yaml").read_text())
    assert {"manifests/node-daemonset.yaml", "manifests/runtimeclasses.yaml"} <= set(kust["resources"])
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert {"name": IMAGE, "newTag": version} in kust["images"]
    for ds in docs("node-daemonset.yaml"):
        for c in containers(ds).values():
            assert c["image"].rsplit(":", 1)[0] == IMAGE, c["name"]


def test_runtimeclasses_select_nodes_by_the_labellers_labels() -> None:
    rcs = docs("runtimeclasses.yaml")
    kvm, kata = by_name(rcs, "RuntimeClass", "kvm"), by_name(rcs, "RuntimeClass", "kata")
    assert kvm["scheduling"]["nodeSelector"] == {LABEL_KVM_HANDLER: "true"}
    assert kata["scheduling"]["nodeSelector"] == {LABEL_KATA: "true"}
    assert kata["overhead"]["podFixed"] == {"memory": "160Mi", "cpu": "250m"}  # Kata's published figure
    assert set(kvm["overhead"]["podFixed"]) == {"memory", "cpu"}
    assert "scheduling" not in by_name(rcs, "RuntimeClass", "runc")


def test_the_daemonsets_run_what_the_image_and_the_plugin_expect() -> None:
    objs = docs("node-daemonset.yaml")
    node = by_name(objs, "DaemonSet", "edgevirt-node")
    labeller = by_name(objs, "DaemonSet", "edgevirt-node-labeller")
    assert node["spec"]["template"]["spec"]["nodeSelector"][LABEL_KVM_HANDLER] == "true"
    assert LABEL_KVM_HANDLER not in labeller["spec"]["template"]["spec"]["nodeSelector"]  # it writes it
    c = containers(node)
    install = c["install-cni-plugin"]["command"]
    assert install[install.index("--source") + 1] == "/" + macvtap_static.IMAGE_PATH
    daemon = c["macvtap-daemon"]["command"]
    assert (
        daemon[:2] == ["macvtap", "daemon"]
        and daemon[daemon.index("--socket") + 1] == defaults.DEFAULT_SOCKET
    )
    # the IPAM plugins it runs are the node's (CNI_PATH and its symlinks), looked up under its root
    host_root = daemon[daemon.index("--host-root") + 1]
    mount = next(m for m in c["macvtap-daemon"]["volumeMounts"] if m["mountPath"] == host_root)
    volume = next(v for v in node["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["path"] == "/" and mount["readOnly"] is True
    assert (
        "mountPropagation" not in mount
    )  # HostToContainer needs a shared root mount, not every node has one
    ops = daemon[daemon.index("--ops-address") + 1]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = c["macvtap-daemon"][probe]["httpGet"]
        assert f"{get['host']}:{get['port']}" == ops  # the loopback the daemon binds (hostNetwork)
    assert node["spec"]["template"]["spec"]["hostNetwork"] is True
    for ds in (node, labeller):
        spec = ds["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == "edgevirt-node"
        assert spec["priorityClassName"] == "system-node-critical"
        assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
        for cont in containers(ds).values():
            assert cont["resources"]["requests"] and cont["resources"]["limits"]["memory"], cont["name"]


def test_the_node_account_may_patch_nodes_and_nothing_else_of_them() -> None:
    role = by_name(docs("vmcrd-rbac.yaml"), "ClusterRole", "edgevirt-node")
    node_rules = [r for r in role["rules"] if "nodes" in r["resources"]]
    assert node_rules == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}]
    policies = docs("admission-policies.yaml")
    policy = by_name(policies, "ValidatingAdmissionPolicy", "edgevirt-node-own-node-labels-only")
    assert policy["spec"]["matchConditions"][0]["expression"].endswith(
        "'system:serviceaccount:edgevirt-system:edgevirt-node'"
    )
    binding = by_name(policies, "ValidatingAdmissionPolicyBinding", "edgevirt-node-own-node-labels-only")
    assert binding["spec"]["validationActions"] == ["Deny"]
