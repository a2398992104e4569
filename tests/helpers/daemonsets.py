"""The node DaemonSets (deploy/manifests/node-daemonset.yaml) on the local cluster, for the e2e test:
``kubectl kustomize deploy/`` through an overlay that pins the image this checkout built (kustomize
``images:``, by digest), adapted to the local cluster's paths; applied so that the cluster is left
as it was found (objects that existed are put back, the others deleted); the local cluster's own
macvtap daemon handed over to the DaemonSet's and back; and the memory of a container's processes.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from localcluster import clusterside
from localcluster.paths import Paths

from helpers import REPO
from helpers.waiting import wait_for

NAMESPACE = "edgevirt-system"
DAEMONSETS = ("edgevirt-node-labeller", "edgevirt-node")
# what `kubectl get -o json` adds to an object that `kubectl replace` must not get back
VOLATILE = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")


def build_and_push_image() -> str:
    """The edgevirt image of this checkout built and pushed to the local registry: its digest."""
    return clusterside.build_image(quiet=True).digest


def local_cluster_objects(kubectl: list[str], digest: str, paths: Paths) -> list[dict]:
    """deploy/ rendered through the local cluster's overlay (localcluster.clusterside: the image
    pinned by digest, the node DaemonSets moved to the cluster's paths), keeping the DaemonSet's own
    macvtap plugin copy and daemon."""
    with tempfile.TemporaryDirectory(prefix="edgevirt-overlay-", dir=REPO / ".local") as tmp:
        clusterside.write_overlay(clusterside.Image("test", digest), Path(tmp), paths, own_macvtap=True)
        out = subprocess.run(
            [*kubectl, "kustomize", tmp], capture_output=True, text=True, check=True, timeout=60
        )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


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
            else:  # put back as it was: replaced, or created again when a test deleted it
                body = json.dumps(_clean(old))
                r = subprocess.run([*kubectl, "replace", "-f", "-"], input=body, text=True,
                                   capture_output=True, timeout=60)  # fmt: skip
                if r.returncode != 0:
                    subprocess.run([*kubectl, "create", "-f", "-"], input=body, text=True,
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
