"""Cluster mode: every VirtualMachine that should run has exactly one VM pod, and a true status.

One reconcile per VM key, level-triggered and idempotent (safe to repeat after a crash at any
point): read the VM and its pod from the informers' caches, make sure the finalizer is there,
``strategy.decide`` what to do with the pod, do it, and write the status (only when it changed),
with an Event for each transition. The pod name is deterministic (``<vm>-vm``), so a controller
restarted after ``kill -9`` cannot make a second pod: the API server refuses the duplicate name,
also while the old pod is still terminating (and ``decide`` waits for that one anyway). A new pod
is pinned to ``spec.nodeName``, else to the node the VM lives on (``status.nodeName``).

The informers hold the VMs, the VM pods and the Nodes' facts (Ready condition and cordon only,
:mod:`vmcrd.placement`), which the status reads: a VM on an unreachable node is NodeUnreachable,
one waiting for its cordoned node WaitingForNode. The loop around it (informers, resync, workers,
retries, leader gating) is :mod:`vmcrd.runner`.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cri_shim.kube_rest import ApiClientKubeApi

from . import api, podspec, status
from .api import KubeObject
from .kube import EventRecorder, WorkQueue, api_message
from .placement import NodesByName
from .resources import (
    VirtualMachines,
    node_informer,
    nodes_list_watch,
    vm_informers,
    vm_key,
    vm_pods_list_watch,
)
from .runner import RetryDelays, Runner
from .strategy import Action, PodState, decide, pod_state

log = logging.getLogger(__name__)

#: Seconds between looks at a VM pod that kubelet cannot start (nothing else would wake us).
SANDBOX_RECHECK = 10.0
#: Seconds between looks at a VM whose pod name a foreign pod holds.
FOREIGN_POD_RECHECK = 10.0
#: Seconds before creating a VM pod the API server refused is tried again.
CREATE_RETRY = 5.0
#: Seconds between looks at a VM pod that is shutting down.
TERMINATING_RECHECK = 2.0
RETRY = RetryDelays(conflict=0.5, api_error=2.0, error=5.0)

_NO_TIME = dt.datetime.min.replace(tzinfo=dt.UTC)


class ClusterController:
    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str | None = None,
        resync: float = 300.0,
        identity: str = "edgevirt-controller",
        runtime_class: str = podspec.RUNTIME_CLASS,
    ) -> None:
        self.runtime_class = runtime_class
        rest = ApiClientKubeApi(api_client)  # VMs, pod list/watch, Events: plain JSON
        self.vm_api = VirtualMachines(rest)
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.queue = WorkQueue()
        self.events = EventRecorder(rest, "edgevirt-controller", identity)
        self.create_errors: dict[str, str] = {}
        self.sandbox_errors: dict[str, tuple[str, str]] = {}  # VM key -> (pod uid, last message)
        self.reconciles = 0
        self.vms, self.pods = vm_informers(
            self.queue, self.vm_api.list_watch(namespace), vm_pods_list_watch(rest, namespace)
        )
        self.nodes = node_informer(self.queue, self.vms, nodes_list_watch(rest))
        self.runner = Runner(
            "reconcile",
            self.queue,
            [self.vms, self.pods, self.nodes],
            self.reconcile,
            resync=resync,
            delays=RETRY,
        )

    def run(self, stop: threading.Event, leading: threading.Event | None = None, workers: int = 2) -> None:
        """Informers and resync start at once (a standby keeps warm caches); workers act only while
        ``leading`` is set."""
        self.runner.run(stop, leading, workers)

    # ---------------------------------------------------------------- reconcile
    def reconcile(self, key: str) -> float | None:
        """Bring one VM's pod and status in line. Returns seconds after which to look again, if any."""
        self.reconciles += 1
        vm = self.vms.get(key)
        if vm is None:
            self.create_errors.pop(key, None)
            self.sandbox_errors.pop(key, None)
            return None  # gone: its pod goes with it (owner reference, garbage collector)
        vm = self._ensure_finalizer(vm)
        ns, name = key.split("/", 1)
        pod = self.pods.get(f"{ns}/{api.pod_name(name)}")
        if pod is not None and not podspec.owned_by(pod, vm):
            msg = f"pod {api.pod_name(name)} exists and is not owned by this VirtualMachine: delete it"
            self._write_status(vm, None, msg)
            return FOREIGN_POD_RECHECK
        acted = self._apply_strategy(vm, pod)
        if acted is None:
            return CREATE_RETRY
        vm, pod = acted
        if _node_state_free(vm, pod):
            # never placed on a node: no node-local state exists (otherwise node mode cleans up)
            self.vm_api.remove_finalizer(vm)
            return None
        return self._report(key, vm, pod)

    def _ensure_finalizer(self, vm: KubeObject) -> KubeObject:
        meta = vm["metadata"]
        if meta.get("deletionTimestamp") or api.FINALIZER in (meta.get("finalizers") or []):
            return vm
        return self.vm_api.patch(
            vm, {"metadata": {"finalizers": [*(meta.get("finalizers") or []), api.FINALIZER]}}
        )

    def _apply_strategy(
        self, vm: KubeObject, pod: KubeObject | None
    ) -> tuple[KubeObject, KubeObject | None] | None:
        """Decide and do what the run strategy and the state request ask for the pod. Returns the
        VM and the pod as they are now (None: creating the pod failed, see ``create_errors``)."""
        meta = vm["metadata"]
        strategy = api.run_strategy(vm.get("spec") or {})
        request = (meta.get("annotations") or {}).get(api.STATE_REQUEST, "")
        pod_request = ((pod or {}).get("metadata", {}).get("annotations") or {}).get(
            podspec.ANN_STATE_REQUEST, ""
        )
        d = decide(strategy, pod_state(pod), request, pod_request, bool(meta.get("deletionTimestamp")))
        if d.ignored_request:
            self.events.emit(
                vm,
                "Warning",
                "RequestIgnored",
                f"{api.STATE_REQUEST}={request!r} means nothing for {strategy}",
            )
        if d.action is Action.CREATE:
            pod = self._create_pod(vm, request if request.startswith("restart") else "")
            if pod is None:
                return None
        elif d.action is Action.DELETE and pod is not None:
            self._delete_pod(vm, pod)
            # our view until the watch shows it: the pod is on its way out
            pod = {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": status.now()}}
        elif d.action is Action.HALT:
            self.vm_api.patch(vm, {"spec": {"runStrategy": "Halted"}})
            self.events.emit(
                vm, "Normal", "Halted", "runStrategy Once: the VM ran once; runStrategy is now Halted"
            )
        if d.clear_request and request:
            vm = self.vm_api.patch(vm, {"metadata": {"annotations": {api.STATE_REQUEST: None}}})
        return vm, pod

    def _report(self, key: str, vm: KubeObject, pod: KubeObject | None) -> float | None:
        """Write the status; say when to look again while the pod is in a state nobody tells us about."""
        sandbox_error = self._sandbox_error(vm, pod)
        self._write_status(vm, pod, self.create_errors.get(key, ""), sandbox_error)
        if pod is not None and pod_state(pod) is PodState.TERMINATING:
            return TERMINATING_RECHECK
        if sandbox_error or _stuck_pending(pod):
            return SANDBOX_RECHECK  # kubelet's retries do not change the pod: look again
        return None

    def _sandbox_error(self, vm: KubeObject, pod: KubeObject | None) -> str:
        """kubelet's latest FailedCreatePodSandBox message for a VM pod stuck in Pending (the kvm
        handler refused it, say), from the pod's Events; mirrored as a VM Event once per message."""
        if pod is None or not _stuck_pending(pod):
            return ""
        pm = pod["metadata"]
        evs = self.core.list_namespaced_event(
            pm["namespace"], field_selector=f"involvedObject.uid={pm['uid']},reason=FailedCreatePodSandBox"
        ).items
        if not evs:
            return ""
        last = max(
            evs,
            key=lambda e: (
                e.last_timestamp
                or e.event_time
                or (e.metadata.creation_timestamp if e.metadata else None)
                or _NO_TIME
            ),
        )
        msg = last.message or ""
        key = vm_key(vm)
        if self.sandbox_errors.get(key) != (pm["uid"], msg):
            self.sandbox_errors[key] = (pm["uid"], msg)
            self.events.emit(vm, "Warning", "FailedCreatePodSandBox", f"VM pod {pm['name']}: {msg}")
        return msg

    # ---------------------------------------------------------------- actions
    def _create_pod(self, vm: KubeObject, request: str) -> KubeObject | None:
        m = vm["metadata"]
        key = vm_key(vm)
        node = (vm.get("spec") or {}).get("nodeName") or (vm.get("status") or {}).get("nodeName")
        body = podspec.build_pod(vm, node, request, self.runtime_class)
        pod_name = body["metadata"]["name"]
        try:
            pod = self.core.create_namespaced_pod(m["namespace"], body)  # type: ignore[arg-type]  # dict as is
        except ApiException as e:
            if e.status == 409:  # already there (our cache is behind): use what the API has
                return self._as_dict(self.core.read_namespaced_pod(pod_name, m["namespace"]))
            msg = api_message(e)
            if self.create_errors.get(key) != msg:
                self.events.emit(vm, "Warning", "FailedCreate", f"creating pod {pod_name}: {msg}")
            self.create_errors[key] = msg
            self._write_status(vm, None, msg)
            return None
        self.create_errors.pop(key, None)
        pod_dict = self._as_dict(pod)
        where = f" on {node}" if node else ""
        self.events.emit(vm, "Normal", "SuccessfulCreate", f"created VM pod {pod_name}{where}")
        return pod_dict

    def _as_dict(self, obj: object) -> KubeObject:
        """A client model as the API serves it (camelCase dict), like the informers' objects."""
        as_dict: KubeObject = self.core.api_client.sanitize_for_serialization(obj)
        return as_dict

    def _delete_pod(self, vm: KubeObject, pod: KubeObject) -> None:
        pm = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(
                pm["name"],
                pm["namespace"],
                body=client.V1DeleteOptions(
                    preconditions=client.V1Preconditions(uid=pm["uid"]),
                    # the VM's current grace period, also when it changed since the pod was made
                    grace_period_seconds=podspec.grace_period(vm.get("spec") or {}),
                ),
            )
        except ApiException as e:
            if e.status in (404, 409):
                return
            raise
        self.events.emit(vm, "Normal", "SuccessfulDelete", f"deleted VM pod {pm['name']} (graceful shutdown)")

    def _write_status(
        self, vm: KubeObject, pod: KubeObject | None, create_error: str, sandbox_error: str = ""
    ) -> None:
        new = status.compute(vm, pod, create_error, sandbox_error, NodesByName(self.nodes))
        if not status.differs(vm, new):
            return
        self.vm_api.patch_status(vm, new)
        for etype, reason, message in status.transition_events(vm.get("status") or {}, new):
            self.events.emit(vm, etype, reason, message)


def _stuck_pending(pod: KubeObject | None) -> bool:
    """Scheduled, Pending, no container started yet."""
    if pod is None or pod_state(pod) is not PodState.ACTIVE:
        return False
    st = pod.get("status") or {}
    return bool((pod.get("spec") or {}).get("nodeName")) and st.get("phase") == "Pending"


def _node_state_free(vm: KubeObject, pod: KubeObject | None) -> bool:
    """A VM being deleted whose pod is gone and that was never placed on a node: nothing node-local
    to clean up, so cluster mode may remove the finalizer itself."""
    meta = vm["metadata"]
    return (
        bool(meta.get("deletionTimestamp"))
        and pod is None
        and api.FINALIZER in (meta.get("finalizers") or [])
        and not (vm.get("status") or {}).get("nodeName")
    )
