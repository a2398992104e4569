"""The cluster side as deploy/ declares it, checked without a cluster: the controller's Deployment
(a command line edgevirt-controller accepts, probes on the ops port it serves, non-root, two
replicas spread, a disruption budget), the image entry of the kustomization (the release's
version), and the local cluster's generated overlay that pins a build by digest."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml
from localcluster import clusterside

from vmcrd import cli

REPO = Path(__file__).resolve().parents[2]


def manifests(path: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((REPO / path).read_text()) if d}


def test_the_deployment_runs_cluster_mode_with_probes_on_the_ops_port_it_serves():
    docs = manifests("deploy/manifests/controller.yaml")
    assert set(docs) == {"Deployment", "PodDisruptionBudget"}  # node mode is the DaemonSet's file
    dep = docs["Deployment"]
    assert dep["spec"]["replicas"] == 2 and dep["metadata"]["namespace"] == clusterside.NAMESPACE
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = cli.parse_args(c["command"][1:])
    assert c["command"][0] == "edgevirt-controller" and args.mode == "cluster"
    assert clusterside.runs_mode(c, "cluster") and not clusterside.runs_mode(c, "node")
    host, port = args.ops_address.rsplit(":", 1)
    assert host == "0.0.0.0"  # kubelet probes the pod's IP
    assert c["ports"] == [{"name": "ops", "containerPort": int(port), "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert args.log_format == "json"
    assert pod["serviceAccountName"] == "edgevirt-controller"
    assert pod["securityContext"]["runAsUser"] == 65532 and pod["securityContext"]["runAsNonRoot"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    spread = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    pdb = docs["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]


def test_the_kustomization_installs_the_controller_and_names_the_release_image():
    kustomization = yaml.safe_load((REPO / "deploy/kustomization.yaml").read_text())
    assert "manifests/controller.yaml" in kustomization["resources"]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert kustomization["images"] == [{"name": clusterside.IMAGE, "newTag": version}]
    image = manifests("deploy/manifests/controller.yaml")["Deployment"]["spec"]["template"]["spec"]
    assert image["containers"][0]["image"].rsplit(":", 1)[0] == clusterside.IMAGE


def test_the_local_overlay_pins_the_digest_just_built(tmp_path, monkeypatch):
    image = clusterside.Image(tag="0.1.0", digest="sha256:" + "ab" * 32)
    monkeypatch.setattr(clusterside, "REPO", tmp_path)
    overlay = clusterside.write_overlay(image, tmp_path / ".local" / "deploy")
    doc = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert doc["resources"] == ["../../deploy"]  # kustomize takes no absolute base
    assert doc["images"] == [{"name": clusterside.IMAGE, "digest": image.digest}]
    assert image.ref == f"{clusterside.IMAGE}@{image.digest}"
    assert not list(overlay.glob("*.tmp"))


def test_a_controller_container_is_told_apart_by_its_mode():
    assert clusterside.runs_mode({"command": ["edgevirt-controller", "--mode", "node"]}, "node")
    assert clusterside.runs_mode({"command": ["edgevirt-controller"], "args": ["--mode=node"]}, "node")
    assert not clusterside.runs_mode({"command": ["macvtap", "daemon"]}, "node")
    assert not clusterside.runs_mode({"command": ["edgevirt-controller", "--mode", "cluster"]}, "node")
