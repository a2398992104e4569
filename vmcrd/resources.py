"""What the controller modes read and write: VirtualMachines (both modes) and their VM pods
(cluster mode; node mode reads no pods).

How to list (and watch) them, the two informers over them that feed cluster mode's work queue with VM keys,
which VM a pod event is about, and the writes to a
VirtualMachine: merge patches guarded by its resourceVersion (so a write based on a stale view is
refused with 409 and retried), status patches of the fields a mode owns, the finalizer's removal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from kubernetes import client

from . import api, podspec
from .api import KubeObject
from .kube import Informer, WorkQueue

#: ``list_fn`` of an :class:`~vmcrd.kube.Informer`: called with the list/watch keyword arguments.
Lister = Callable[..., Any]


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
    """The VirtualMachine resource, through the custom objects API."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api_client)

    def lister(self, namespace: str | None) -> Lister:
        """List/watch the VMs of ``namespace`` (None: all namespaces)."""
        custom = self.custom

        def list_vms(**kw: Any) -> Any:
            if namespace:
                return custom.list_namespaced_custom_object(
                    api.GROUP, api.VERSION, namespace, api.PLURAL, **kw
                )
            return custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL, **kw)

        return list_vms

    def patch(self, vm: KubeObject, body: KubeObject) -> KubeObject:
        """Merge-patch ``vm`` as we saw it (its resourceVersion): 409 if it changed meanwhile."""
        m = vm["metadata"]
        body = {**body, "metadata": {**body.get("metadata", {}), "resourceVersion": m["resourceVersion"]}}
        patched = self.custom.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, m["namespace"], api.PLURAL, m["name"], body
        )
        return cast(KubeObject, patched)  # the custom objects API answers JSON as a dict

    def patch_status(self, vm: KubeObject, fields: KubeObject) -> None:
        """Merge-patch these status fields (each mode writes only the fields it owns, see status.py)."""
        m = vm["metadata"]
        self.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, m["namespace"], api.PLURAL, m["name"], {"status": fields}
        )

    def remove_finalizer(self, vm: KubeObject) -> None:
        """Drop :data:`api.FINALIZER` (node-local state is gone): the API server may delete the VM."""
        fins = [f for f in vm["metadata"].get("finalizers") or [] if f != api.FINALIZER]
        self.patch(vm, {"metadata": {"finalizers": fins}})


def vm_pod_lister(core: client.CoreV1Api, namespace: str | None) -> Lister:
    """List/watch the VM pods (label ``edgevirt.io/vm``) of ``namespace`` (cluster mode; node mode
    reads no pods)."""
    label = podspec.LABEL_VM

    def list_pods(**kw: Any) -> Any:
        if namespace:
            return core.list_namespaced_pod(namespace, label_selector=label, **kw)
        return core.list_pod_for_all_namespaces(label_selector=label, **kw)

    return list_pods


def vm_informers(queue: WorkQueue, vms: Lister, pods: Lister) -> tuple[Informer, Informer]:
    """Cluster mode's caches: the VMs (a change queues the VM's key) and the VM pods (a change queues
    the key of the pod's VM)."""

    def on_pod(key: str) -> None:
        vm = vm_key_of_pod(key, pod_informer.get(key))
        if vm:
            queue.add(vm)

    pod_informer = Informer("pods", pods, on_pod)
    return Informer("virtualmachines", vms, queue.add), pod_informer
