"""What the controller modes read and write: VirtualMachines (both modes), their VM pods and the
Nodes (cluster mode; node mode reads no pods and no Nodes).

How to list (and watch) them, the informers over them that feed cluster mode's work queue with VM
keys (a Node's change queues the VMs that live or are pinned there), which VM a pod event is
about, and the writes to a VirtualMachine: merge patches guarded by its resourceVersion (so a write
based on a stale view is refused with 409 and retried), status patches of the fields a mode owns,
the finalizer's removal.
All of it is plain JSON through a :class:`~cri_shim.kube_rest.KubeApi`: node mode's thin client
(:mod:`cri_shim.kube_http`) or cluster mode's kubernetes ``ApiClient`` behind the same protocol.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from cri_shim.kube_rest import MERGE_PATCH, KubeApi, kube_api

from . import api, placement, podspec
from .api import KubeObject
from .kube import Informer, ListWatch, RestListWatch, WorkQueue


def collection_path(prefix: str, plural: str, namespace: str | None) -> str:
    """The path of a collection under an API ``prefix`` (``/api/v1``, ``/apis/GROUP/VERSION``): of
    ``namespace``, or of all namespaces."""
    if namespace:
        return f"{prefix}/namespaces/{quote(namespace, safe='')}/{plural}"
    return f"{prefix}/{plural}"


def vm_key(vm: KubeObject) -> str:
    """``<namespace>/<name>`` of a VirtualMachine (the work queue's key)."""
    m = vm["metadata"]
    return f"{m['namespace']}/{m['name']}"


def vm_key_of_pod(pod_key: str, pod: KubeObject | None) -> str | None:
    """The VM a VM pod belongs to: its ``edgevirt.io/vm`` label, else (a deleted pod, no longer
    cached) its name without the ``-vm`` suffix; None for a pod that is no VM pod."""
    ns, name = pod_key.split("/", 1)
    vm = (pod or {}).get("metadata", {}).get("labels", {}).get(podspec.LABEL_VM)
    if vm:
        return f"{ns}/{vm}"
    if name.endswith("-vm"):
        return f"{ns}/{name[:-3]}"
    return None


class VirtualMachines:
    """The VirtualMachine resource, as plain JSON through a :class:`~cri_shim.kube_rest.KubeApi` (a
    kubernetes ``ApiClient`` is wrapped in one)."""

    PREFIX = f"/apis/{api.GROUP}/{api.VERSION}"

    def __init__(self, kube: KubeApi | Any) -> None:
        self.api = kube_api(kube)

    def list_watch(self, namespace: str | None) -> ListWatch:
        """List/watch the VMs of ``namespace`` (None: all namespaces)."""
        return RestListWatch(self.api, collection_path(self.PREFIX, api.PLURAL, namespace))

    def path(self, vm: KubeObject) -> str:
        m = vm["metadata"]
        return f"{collection_path(self.PREFIX, api.PLURAL, m['namespace'])}/{quote(m['name'], safe='')}"

    def patch(self, vm: KubeObject, body: KubeObject) -> KubeObject:
        """Merge-patch ``vm`` as we saw it (its resourceVersion): 409 if it changed meanwhile."""
        m = vm["metadata"]
        body = {**body, "metadata": {**body.get("metadata", {}), "resourceVersion": m["resourceVersion"]}}
        patched: KubeObject = self.api.request("PATCH", self.path(vm), body, content_type=MERGE_PATCH)
        return patched

    def patch_status(self, vm: KubeObject, fields: KubeObject) -> None:
        """Merge-patch these status fields (each mode writes only the fields it owns, see status.py)."""
        self.api.request("PATCH", self.path(vm) + "/status", {"status": fields}, content_type=MERGE_PATCH)

    def remove_finalizer(self, vm: KubeObject) -> None:
        """Drop :data:`api.FINALIZER` (node-local state is gone): the API server may delete the VM."""
        fins = [f for f in vm["metadata"].get("finalizers") or [] if f != api.FINALIZER]
        self.patch(vm, {"metadata": {"finalizers": fins}})


def vm_pods_list_watch(kube: KubeApi, namespace: str | None) -> ListWatch:
    """List/watch the VM pods (label ``edgevirt.io/vm``) of ``namespace`` (cluster mode; node mode
    reads no pods)."""
    return RestListWatch(
        kube, collection_path("/api/v1", "pods", namespace), {"labelSelector": podspec.LABEL_VM}
    )


def vm_informers(queue: WorkQueue, vms: ListWatch, pods: ListWatch) -> tuple[Informer, Informer]:
    """Cluster mode's caches: the VMs (a change queues the VM's key) and the VM pods (a change queues
    the key of the pod's VM)."""

    def on_pod(key: str) -> None:
        vm = vm_key_of_pod(key, pod_informer.get(key))
        if vm:
            queue.add(vm)

    pod_informer = Informer("pods", pods, on_pod)
    return Informer("virtualmachines", vms, queue.add), pod_informer


def nodes_list_watch(kube: KubeApi) -> ListWatch:
    """List/watch the Nodes (cluster mode: their Ready condition and cordon, :mod:`vmcrd.placement`)."""
    return RestListWatch(kube, "/api/v1/nodes")


def node_informer(queue: WorkQueue, vms: Informer, nodes: ListWatch) -> Informer:
    """Cluster mode's Node facts (:func:`vmcrd.placement.node_facts`, not whole Nodes); a change of
    them queues the VMs that live on that node or are pinned to it."""

    def on_node(key: str) -> None:
        name = key.split("/", 1)[1]
        for vm in vms.values():
            if name in placement.vm_nodes(vm):
                queue.add(vm_key(vm))

    return Informer("nodes", nodes, on_node, transform=placement.node_facts)
