"""The node DaemonSets (deploy/manifests/node-daemonset.yaml) on the local cluster, for the e2e test:
``kubectl kustomize deploy/`` through an overlay that pins the image this checkout built (kustomize
``images:``, by digest), adapted to the local cluster's paths; applied so that the cluster is left
as it was found (objects that existed are put back, the others deleted); the local cluster's own
macvtap daemon handed over to the DaemonSet's and back; and the memory of a container's processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from localcluster.paths import APISERVER_PORT, Paths

from helpers import REPO
from helpers.waiting import wait_for

IMAGE_NAME = "127.0.0.1:5000/edgevirt/edgevirt"
NAMESPACE = "edgevirt-system"
DAEMONSETS = ("edgevirt-node-labeller", "edgevirt-node")
# what `kubectl get -o json` adds to an object that `kubectl replace` must not get back
VOLATILE = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")


def build_and_push_image() -> str:
    """deploy/images/build-edgevirt-image --push (this checkout; the local registry): its digest."""
    r = subprocess.run(
        [str(REPO / "deploy/images/build-edgevirt-image"), "--push", "--json"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)["pushed"]["digest"]


def _container(ds: dict, name: str) -> dict:
    spec = ds["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def _set_env(container: dict, name: str, value: str) -> None:
    env = [e for e in container.setdefault("env", []) if e["name"] != name]
    container["env"] = [*env, {"name": name, "value": value}]


def local_cluster_objects(kubectl: list[str], digest: str, paths: Paths) -> list[dict]:
    """deploy/ rendered through an overlay with the image digest, then moved to the local cluster's
    paths: its CRI socket (under /run/edgevirt-local), its VM network's CNI state dir (the conflist's
    stateDir and dataDir), and the API server on the node's loopback (no kube-proxy here, so the
    in-cluster Service address does not answer; hostNetwork pods reach 127.0.0.1)."""
    with tempfile.TemporaryDirectory(prefix="edgevirt-overlay-") as tmp:
        overlay = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(REPO / "deploy", tmp)],  # kustomize takes no absolute path
            "images": [{"name": IMAGE_NAME, "digest": digest}],
        }
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(overlay))
        out = subprocess.run(
            [*kubectl, "kustomize", tmp], capture_output=True, text=True, check=True, timeout=60
        )
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for ds in (d for d in docs if d["kind"] == "DaemonSet"):
        api_users = ["labeller"] if ds["metadata"]["name"] == "edgevirt-node-labeller" else ["controller"]
        for name in api_users:
            _set_env(_container(ds, name), "KUBERNETES_SERVICE_HOST", "127.0.0.1")
            _set_env(_container(ds, name), "KUBERNETES_SERVICE_PORT", str(APISERVER_PORT))
        if ds["metadata"]["name"] == "edgevirt-node-labeller":
            _set_env(_container(ds, "labeller"), "CRI_SOCKET", f"/host{paths.cri_sock}")
        else:
            vols = ds["spec"]["template"]["spec"]["volumes"]
            next(v for v in vols if v["name"] == "cni-state")["hostPath"]["path"] = str(paths.vm_cni_data_dir)
            mounts = _container(ds, "macvtap-daemon")["volumeMounts"]
            next(m for m in mounts if m["name"] == "cni-state")["mountPath"] = str(paths.vm_cni_data_dir)
    return docs


def _ref(obj: dict) -> list[str]:
    ns = obj["metadata"].get("namespace")
    return [f"{obj['kind']}/{obj['metadata']['name']}", *(["-n", ns] if ns else [])]


def _clean(obj: dict) -> dict:
    obj = json.loads(json.dumps(obj))
    obj.pop("status", None)
    for key in VOLATILE:
        obj["metadata"].pop(key, None)
    return obj


@contextmanager
def applied(kubectl: list[str], docs: list[dict]) -> Iterator[None]:
    """``kubectl apply`` of ``docs``; afterwards every object that existed before is put back as it
    was and every other one is deleted (the DaemonSets first, waiting for their pods to go)."""
    before: dict[str, dict | None] = {}
    for obj in docs:
        r = subprocess.run(
            [*kubectl, "get", *_ref(obj), "-o", "json"], capture_output=True, text=True, timeout=60
        )
        before[" ".join(_ref(obj))] = json.loads(r.stdout) if r.returncode == 0 else None
    try:
        subprocess.run(
            [*kubectl, "apply", "-f", "-"], input=yaml.safe_dump_all(docs), text=True, check=True,
            capture_output=True, timeout=120,
        )  # fmt: skip
        yield
    finally:
        ordered = sorted(docs, key=lambda o: o["kind"] != "DaemonSet")
        for obj in ordered:
            old = before[" ".join(_ref(obj))]
            if old is None:
                subprocess.run([*kubectl, "delete", *_ref(obj), "--ignore-not-found", "--wait=true",
                                "--timeout=180s"], capture_output=True, timeout=240)  # fmt: skip
            else:
                subprocess.run([*kubectl, "replace", "-f", "-"], input=json.dumps(_clean(old)), text=True,
                               capture_output=True, timeout=60)  # fmt: skip


def wait_rolled_out(kubectl: list[str], timeout: int = 600) -> None:
    for name in DAEMONSETS:
        r = subprocess.run(
            [*kubectl, "rollout", "status", f"daemonset/{name}", "-n", NAMESPACE, f"--timeout={timeout}s"],
            capture_output=True, text=True, timeout=timeout + 30,
        )  # fmt: skip
        if r.returncode != 0:
            pods = subprocess.run(
                [*kubectl, "describe", "pods", "-n", NAMESPACE], capture_output=True, text=True
            )
            raise AssertionError(f"{name} did not roll out: {r.stderr}\n{pods.stdout[-6000:]}")


def pod_of(kubectl: list[str], daemonset: str) -> str:
    out = subprocess.run(
        [*kubectl, "get", "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/name={daemonset}", "-o", "json"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    pods = [p for p in json.loads(out.stdout)["items"] if not p["metadata"].get("deletionTimestamp")]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]["metadata"]["name"]


@contextmanager
def macvtap_daemon_handed_over(paths: Paths, up) -> Iterator[None]:
    """The local cluster's own macvtap daemon stopped (the DaemonSet's takes its socket), started
    again afterwards (``up``: deploy/local/up of that one component) once the DaemonSet's is gone."""
    from localcluster.components import BY_NAME

    proc = BY_NAME["macvtap-daemon"].process(paths)
    was_running = proc.running()
    if was_running:
        proc.stop()
    assert not _answers(paths.macvtap_sock), (
        f"a macvtap daemon not started by the cluster serves {paths.macvtap_sock}"
    )
    try:
        yield
    finally:
        if was_running:
            wait_for(
                "the DaemonSet's macvtap daemon to be gone", lambda: not _answers(paths.macvtap_sock), 120, 1
            )
            res = up("macvtap-daemon")
            assert res.returncode == 0, res.stdout + res.stderr


def _answers(sock: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def container_memory(crictl, pod: str, container: str) -> dict[str, float]:
    """Rss and Pss (MiB) summed over a container's processes (its main process and descendants)."""
    ids = crictl(
        "ps", "--pod", crictl("pods", "--name", pod, "-q").stdout.split()[0], "--name", container, "-q"
    )
    info = json.loads(crictl("inspect", ids.stdout.split()[0]).stdout)["info"]
    todo, seen = [int(info["pid"])], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        children = Path(f"/proc/{pid}/task/{pid}/children")
        if children.exists():
            todo += [int(c) for c in children.read_text().split()]
    total = {"Rss": 0.0, "Pss": 0.0}
    for pid in seen:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key = line.split(":")[0]
            if key in total:
                total[key] += int(line.split()[1]) / 1024
    return {**total, "processes": float(len(seen))}
