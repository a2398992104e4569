"""Cluster mode: every VirtualMachine that should run has exactly one VM pod, and a true status.

One reconcile per VM key, level-triggered and idempotent (safe to repeat after a crash at any
point): read the VM and its pod from the informers' caches, make sure the finalizer is there,
``strategy.decide`` what to do with the pod, do it, and write the status (only when it changed),
with an Event for each transition. The pod name is deterministic (``<vm>-vm``), so a controller
restarted after ``kill -9`` cannot make a second pod: the API server refuses the duplicate name.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from . import api, podspec, status
from .kube import EventRecorder, Informer, WorkQueue
from .strategy import Action, PodState, decide, pod_state

log = logging.getLogger(__name__)

#: Seconds between looks at a VM pod that kubelet cannot start (nothing else would wake us).
SANDBOX_RECHECK = 10.0

PRINTABLE_EVENTS = {
    api.STOPPED: ("Normal", "Stopped"),
    api.STARTING: ("Normal", "Starting"),
    api.RUNNING: ("Normal", "Started"),
    api.STOPPING: ("Normal", "Stopping"),
    api.PAUSED: ("Normal", "Paused"),
    api.FAILED: ("Warning", "Failed"),
    api.ERROR_IMAGE: ("Warning", "ErrorImage"),
    api.UNSCHEDULABLE: ("Warning", "Unschedulable"),
    api.CRASH_LOOP: ("Warning", "CrashLoop"),
}


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
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.resync = resync
        self.queue = WorkQueue()
        self.events = EventRecorder(self.core, "edgevirt-controller", identity)
        self.create_errors: dict[str, str] = {}
        self.sandbox_errors: dict[str, tuple[str, str]] = {}  # VM key -> (pod uid, last message)
        self.reconciles = 0
        self.vms = Informer("virtualmachines", self._list_vms, self.queue.add)
        self.pods = Informer("pods", self._list_pods, self._on_pod)

    # ---------------------------------------------------------------- informers
    def _list_vms(self, **kw: Any) -> Any:
        if self.namespace:
            return self.custom.list_namespaced_custom_object(
                api.GROUP, api.VERSION, self.namespace, api.PLURAL, **kw
            )
        return self.custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL, **kw)

    def _list_pods(self, **kw: Any) -> Any:
        sel = podspec.LABEL_VM
        if self.namespace:
            return self.core.list_namespaced_pod(self.namespace, label_selector=sel, **kw)
        return self.core.list_pod_for_all_namespaces(label_selector=sel, **kw)

    def _on_pod(self, key: str) -> None:
        ns, name = key.split("/", 1)
        pod = self.pods.get(key)
        vm = (pod or {}).get("metadata", {}).get("labels", {}).get(podspec.LABEL_VM)
        if vm:
            self.queue.add(f"{ns}/{vm}")
        elif name.endswith("-vm"):
            self.queue.add(f"{ns}/{name[:-3]}")

    # ---------------------------------------------------------------- run
    def run(self, stop: threading.Event, leading: threading.Event | None = None, workers: int = 2) -> None:
        """Informers and resync start at once (a standby keeps warm caches); workers act only while
        ``leading`` is set."""
        self.vms.start(stop)
        self.pods.start(stop)
        threading.Thread(target=self._resync_loop, args=(stop,), name="resync", daemon=True).start()
        threads = [
            threading.Thread(target=self._worker, args=(stop, leading), name=f"worker-{i}", daemon=True)
            for i in range(1, workers)
        ]
        for t in threads:
            t.start()
        self._worker(stop, leading)
        for t in threads:
            t.join(5)

    def _worker(self, stop: threading.Event, leading: threading.Event | None) -> None:
        while not stop.is_set():
            if leading is not None and not leading.wait(0.5):
                continue
            key = self.queue.get(stop)
            if key is None:
                break
            try:
                if not (self.vms.synced.is_set() and self.pods.synced.is_set()):
                    self.queue.add_after(key, 0.2)
                    continue
                again = self.reconcile(key)
                if again:
                    self.queue.add_after(key, again)
            except ApiException as e:
                level = logging.INFO if e.status == 409 else logging.WARNING
                log.log(level, "reconcile %s: API %s %s: retrying", key, e.status, e.reason)
                self.queue.add_after(key, 0.5 if e.status == 409 else 2.0)
            except Exception:
                log.exception("reconcile %s failed: retrying", key)
                self.queue.add_after(key, 5.0)
            finally:
                self.queue.done(key)

    def _resync_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.resync):
            for k in list(self.vms.cache):
                self.queue.add(k)

    # ---------------------------------------------------------------- reconcile
    def reconcile(self, key: str) -> float | None:
        """Bring one VM's pod and status in line. Returns seconds after which to look again, if any."""
        self.reconciles += 1
        vm = self.vms.get(key)
        if vm is None:
            self.create_errors.pop(key, None)
            self.sandbox_errors.pop(key, None)
            return None  # gone: its pod goes with it (owner reference, garbage collector)
        ns, name = key.split("/", 1)
        meta = vm["metadata"]
        deleting = bool(meta.get("deletionTimestamp"))
        if not deleting and api.FINALIZER not in (meta.get("finalizers") or []):
            vm = self._patch_vm(
                vm, {"metadata": {"finalizers": [*(meta.get("finalizers") or []), api.FINALIZER]}}
            )
            meta = vm["metadata"]
        pod = self.pods.get(f"{ns}/{api.pod_name(name)}")
        if pod is not None and not podspec.owned_by(pod, vm):
            msg = f"pod {api.pod_name(name)} exists and is not owned by this VirtualMachine: delete it"
            self._write_status(vm, None, msg)
            return 10.0
        spec = vm.get("spec") or {}
        strategy = api.run_strategy(spec)
        request = (meta.get("annotations") or {}).get(api.STATE_REQUEST, "")
        pod_request = ((pod or {}).get("metadata", {}).get("annotations") or {}).get(
            podspec.ANN_STATE_REQUEST, ""
        )
        d = decide(strategy, pod_state(pod), request, pod_request, deleting)
        again: float | None = None
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
                return 5.0
        elif d.action is Action.DELETE and pod is not None:
            self._delete_pod(vm, pod)
            # our view until the watch shows it: the pod is on its way out
            pod = {**pod, "metadata": {**pod["metadata"], "deletionTimestamp": status.now()}}
            again = 1.0
        elif d.action is Action.HALT:
            self._patch_vm(vm, {"spec": {"runStrategy": "Halted"}})
            self.events.emit(
                vm, "Normal", "Halted", "runStrategy Once: the VM ran once; runStrategy is now Halted"
            )
        if d.clear_request and request:
            vm = self._patch_vm(vm, {"metadata": {"annotations": {api.STATE_REQUEST: None}}})
        if (
            deleting
            and pod is None
            and api.FINALIZER in (meta.get("finalizers") or [])
            and not (vm.get("status") or {}).get("nodeName")
        ):
            # never placed on a node: no node-local state exists (otherwise node mode cleans up)
            self._remove_finalizer(vm)
            return None
        sandbox_error = self._sandbox_error(vm, pod)
        self._write_status(vm, pod, self.create_errors.get(key, ""), sandbox_error)
        if pod is not None and pod_state(pod) is PodState.TERMINATING:
            again = 2.0
        elif sandbox_error or self._stuck_pending(pod):
            again = SANDBOX_RECHECK  # kubelet's retries do not change the pod: look again
        return again

    @staticmethod
    def _stuck_pending(pod: dict | None) -> bool:
        """Scheduled, Pending, no container started yet."""
        if pod is None or pod_state(pod) is not PodState.ACTIVE:
            return False
        st = pod.get("status") or {}
        return bool((pod.get("spec") or {}).get("nodeName")) and st.get("phase") == "Pending"

    def _sandbox_error(self, vm: dict, pod: dict | None) -> str:
        """kubelet's latest FailedCreatePodSandBox message for a VM pod stuck in Pending (the kvm
        handler refused it, say), from the pod's Events; mirrored as a VM Event once per message."""
        if not self._stuck_pending(pod):
            return ""
        assert pod is not None
        pm = pod["metadata"]
        evs = self.core.list_namespaced_event(
            pm["namespace"], field_selector=f"involvedObject.uid={pm['uid']},reason=FailedCreatePodSandBox"
        ).items
        if not evs:
            return ""
        last = max(evs, key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp)
        msg = last.message or ""
        key = f"{vm['metadata']['namespace']}/{vm['metadata']['name']}"
        if self.sandbox_errors.get(key) != (pm["uid"], msg):
            self.sandbox_errors[key] = (pm["uid"], msg)
            self.events.emit(vm, "Warning", "FailedCreatePodSandBox", f"VM pod {pm['name']}: {msg}")
        return msg

    # ---------------------------------------------------------------- actions
    def _patch_vm(self, vm: dict, body: dict) -> dict:
        m = vm["metadata"]
        body = {**body, "metadata": {**body.get("metadata", {}), "resourceVersion": m["resourceVersion"]}}
        return self.custom.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, m["namespace"], api.PLURAL, m["name"], body
        )

    def _remove_finalizer(self, vm: dict) -> None:
        fins = [f for f in vm["metadata"].get("finalizers") or [] if f != api.FINALIZER]
        self._patch_vm(vm, {"metadata": {"finalizers": fins}})

    def _create_pod(self, vm: dict, request: str) -> dict | None:
        m = vm["metadata"]
        key = f"{m['namespace']}/{m['name']}"
        node = (vm.get("spec") or {}).get("nodeName") or (vm.get("status") or {}).get("nodeName")
        body = podspec.build_pod(vm, node, request, self.runtime_class)
        try:
            pod = self.core.create_namespaced_pod(m["namespace"], body)
        except ApiException as e:
            if e.status == 409:  # already there (our cache is behind): use what the API has
                live = self.core.read_namespaced_pod(body["metadata"]["name"], m["namespace"])
                return self.core.api_client.sanitize_for_serialization(live)
            msg = _api_message(e)
            if self.create_errors.get(key) != msg:
                self.events.emit(
                    vm, "Warning", "FailedCreate", f"creating pod {body['metadata']['name']}: {msg}"
                )
            self.create_errors[key] = msg
            self._write_status(vm, None, msg)
            return None
        self.create_errors.pop(key, None)
        pod_dict = self.core.api_client.sanitize_for_serialization(pod)
        self.events.emit(
            vm,
            "Normal",
            "SuccessfulCreate",
            f"created VM pod {body['metadata']['name']}" + (f" on {node}" if node else ""),
        )
        return pod_dict

    def _delete_pod(self, vm: dict, pod: dict) -> None:
        pm = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(
                pm["name"],
                pm["namespace"],
                body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=pm["uid"])),
            )
        except ApiException as e:
            if e.status in (404, 409):
                return
            raise
        self.events.emit(vm, "Normal", "SuccessfulDelete", f"deleted VM pod {pm['name']} (graceful shutdown)")

    def _write_status(self, vm: dict, pod: dict | None, create_error: str, sandbox_error: str = "") -> None:
        new = status.compute(vm, pod, create_error, sandbox_error)
        if not status.differs(vm, new):
            return
        m = vm["metadata"]
        self.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, m["namespace"], api.PLURAL, m["name"], {"status": new}
        )
        old = vm.get("status") or {}
        if old.get("printableStatus") != new["printableStatus"]:
            etype, reason = PRINTABLE_EVENTS[new["printableStatus"]]
            msg = next(
                (
                    c["message"]
                    for c in new["conditions"]
                    if c["type"] == api.COND_FAILURE and c["status"] == "True"
                ),
                "",
            )
            self.events.emit(
                vm,
                etype,
                reason,
                f"{old.get('printableStatus') or 'New'} -> {new['printableStatus']}"
                + (f": {msg}" if msg else ""),
            )
        old_rr = _cond(old, api.COND_RESTART_REQUIRED)
        new_rr = _cond(new, api.COND_RESTART_REQUIRED)
        if new_rr == "True" and old_rr != "True":
            self.events.emit(
                vm,
                "Warning",
                "RestartRequired",
                "boot settings changed while running: restart the VM to apply them",
            )


def _cond(st: dict, ctype: str) -> str | None:
    for c in st.get("conditions") or []:
        if c.get("type") == ctype:
            return c.get("status")
    return None


def _api_message(e: ApiException) -> str:
    import json

    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except Exception:
        return f"{e.status} {e.reason}"
