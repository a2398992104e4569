"""The installed edgevirt controllers (``kubectl apply -k deploy/`` through
``deploy/local/install-edgevirt``, :mod:`localcluster.clusterside`): their pods by mode, the leader,
killing one at a random point as a crash would, their ops endpoints through the API server, and
pausing them for test modules that run controllers of their own.

Killing is ``kill -9`` of the controller container's process (found through CRI), so it dies
without releasing anything, followed by a forced delete of its pod: the Deployment or DaemonSet
makes a fresh pod at once, where a container restarted in place would wait out kubelet's crash-loop
back-off (10 s, 20 s, 40 s, ...).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

from localcluster import clusterside
from localcluster.clusterside import NAMESPACE, Image

from helpers.cluster import Cluster
from helpers.waiting import wait_for

MODES = ("cluster", "node")
LEASE = "edgevirt-controller"
#: a node label no node has: a DaemonSet selecting it runs nowhere (how node mode is paused)
PAUSE_LABEL = "edgevirt.io/paused-by-tests"


@dataclass
class Installed:
    """The cluster side installed for the test session."""

    k: Cluster
    image: Image

    def pods(self, mode: str, ready: bool = True) -> list[dict]:
        """Pods of edgevirt running ``mode`` (node mode: on this node); only ready ones by default."""
        node = self.k.node if mode == "node" else None
        if ready:
            return clusterside.controller_pods(self.k.paths, mode, node)
        where = [f"--field-selector=spec.nodeName={node}"] if node else []
        pods = self.k.kubectl_json("get", "pods", "-n", NAMESPACE, "-l", clusterside.PART_OF, *where)["items"]
        return [
            p
            for p in pods
            if not p["metadata"].get("deletionTimestamp")
            and any(clusterside.runs_mode(c, mode) for c in p["spec"]["containers"])
        ]

    def leader(self) -> str | None:
        """The pod holding the Lease (its identity is ``<pod name>_<pid>``), None when none does."""
        r = self.k.kubectl("get", "lease", LEASE, "-n", NAMESPACE, "-o", "json", check=False)
        holder = json.loads(r.stdout).get("spec", {}).get("holderIdentity") if r.returncode == 0 else None
        return holder.rsplit("_", 1)[0] if holder else None

    def require(self, mode: str) -> None:
        """Fail (naming the manifest) unless a controller of ``mode`` is ready on this cluster."""
        where = (
            "deploy/manifests/controller.yaml"
            if mode == "cluster"
            else "deploy/manifests/node-daemonset.yaml"
        )
        wait_for(f"a ready {mode}-mode controller installed by {where}", lambda: self.pods(mode), 120, 1)

    def kill(self, mode: str) -> str | None:
        """kill -9 of one controller of ``mode`` (cluster mode: the leader, if any), then a forced
        delete of its pod; the pod's name (None when no pod of that mode exists right now)."""
        pods = self.pods(mode, ready=False)
        if mode == "cluster":
            leader = self.leader()
            pods = [p for p in pods if p["metadata"]["name"] == leader] or pods
        if not pods:
            return None
        pod = pods[0]
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            container = next(c for c in pod["spec"]["containers"] if c["name"] == status["name"])
            if clusterside.runs_mode(container, mode) and status.get("containerID"):
                self._kill9(status["containerID"].split("://", 1)[1])
        name = pod["metadata"]["name"]
        self.k.kubectl("delete", "pod", name, "-n", NAMESPACE, "--force", "--grace-period=0", check=False)
        return name

    def _kill9(self, container_id: str) -> None:
        r = self.k.crictl("inspect", container_id, check=False, via_shim=True)
        pid = json.loads(r.stdout).get("info", {}).get("pid") if r.returncode == 0 else None
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def ops(self, pod: str, path: str, port: int = 9643) -> str:
        """GET ``path`` of a pod's ops endpoint through the API server's pod proxy."""
        return self.k.kubectl(
            "get", "--raw", f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}:{port}/proxy{path}"
        ).stdout

    def restore(self) -> None:
        """Apply the session's install again (after a test changed or removed it) and wait for it."""
        clusterside.apply(self.k.paths, clusterside.OVERLAY)


def node_mode_daemonsets(k: Cluster) -> list[dict]:
    """The DaemonSets of edgevirt whose pods run node mode."""
    sets = k.kubectl_json("get", "daemonsets", "-n", NAMESPACE, "-l", clusterside.PART_OF)["items"]
    return [
        d
        for d in sets
        if any(clusterside.runs_mode(c, "node") for c in d["spec"]["template"]["spec"]["containers"])
    ]


@contextlib.contextmanager
def paused(k: Cluster) -> Iterator[None]:
    """No installed controller acts while inside: the Deployment scaled to 0 and every node-mode
    DaemonSet restricted to a node label no node has, each waited for until its pods are gone;
    restored afterwards (also after a failure), waiting for the rollouts. Nothing installed: nothing
    to do."""
    deployment = k.kubectl(
        "get", "deployment", clusterside.DEPLOYMENT, "-n", NAMESPACE, "-o", "json", check=False
    )
    replicas = json.loads(deployment.stdout)["spec"]["replicas"] if deployment.returncode == 0 else None
    daemonsets = [d["metadata"]["name"] for d in node_mode_daemonsets(k)]
    try:
        if replicas is not None:
            k.kubectl("scale", "deployment", clusterside.DEPLOYMENT, "-n", NAMESPACE, "--replicas=0")
        for name in daemonsets:
            selector = {"spec": {"template": {"spec": {"nodeSelector": {PAUSE_LABEL: "true"}}}}}
            k.patch("daemonset", name, selector, namespace=NAMESPACE)
        for mode in MODES:
            wait_for(
                f"the installed {mode}-mode controllers gone",
                lambda mode=mode: not _all_pods(k, mode),
                180,
                1,
            )
        yield
    finally:
        for name in daemonsets:
            unpause = {"spec": {"template": {"spec": {"nodeSelector": {PAUSE_LABEL: None}}}}}
            k.patch("daemonset", name, unpause, namespace=NAMESPACE, check=False)
        if replicas is not None:
            k.kubectl(
                "scale", "deployment", clusterside.DEPLOYMENT, "-n", NAMESPACE, f"--replicas={replicas}"
            )
        if replicas is not None or daemonsets:
            clusterside.wait_rollout(k.paths)


def _all_pods(k: Cluster, mode: str) -> list[str]:
    """Every pod of ``mode``, terminating ones included (a dying controller may still act)."""
    pods = k.kubectl_json("get", "pods", "-n", NAMESPACE, "-l", clusterside.PART_OF)["items"]
    return [
        p["metadata"]["name"]
        for p in pods
        if any(clusterside.runs_mode(c, mode) for c in p["spec"]["containers"])
    ]
