"""Node mode: what needs the node's libvirt, for the VirtualMachines placed on this node.

* **mount / unmount**: a hotpluggable volume in ``spec.volumes`` of a Running VM is attached live;
  one removed from the spec is detached; ``status.volumes[]`` shows Attaching, Mounted, Detaching
  or Failed (with a message).
* **pause / unpause**: ``spec.paused`` suspends / resumes the domain.
* **facts**: ``status.accel`` and ``status.domainState`` from the domain.
* **cleanup**: the finalizer ``edgevirt.io/node-cleanup`` is removed only after the VM's pod is
  gone and its domain and VM-scoped disks (keyed by the VM's UID) are deleted from this node.

The VM's domain is found through the libvirt layer (``cri_shim.vm``) by the ``uid`` in its
edgevirt metadata, which the CRI kvm handler sets from the pod annotation ``edgevirt.io/vm-uid``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from cri_shim.kvm.contract import ANN_VOLUMES, to_volume_spec
from cri_shim.vm import attached_volumes

from . import api, podspec
from .kube import EventRecorder, Informer, WorkQueue

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/edgevirt/vm")
HOST_DISK_ROOT = Path("/var/lib/edgevirt/hostdisks")


def hotplug_plan(
    spec_volumes: list[dict], boot_volumes: list[dict], attached: dict[str, str]
) -> tuple[list, list]:
    """(to attach, to detach): hotpluggable spec volumes not attached; attached volumes gone from the
    spec that may be unplugged (hotpluggable at boot, or hot-added later)."""
    wanted = {v["name"]: v for v in spec_volumes}
    boot = {v["name"]: v for v in boot_volumes}
    attach = [v for n, v in wanted.items() if v.get("hotpluggable") and n not in attached]
    detach = [n for n in attached if n not in wanted and (n not in boot or boot[n].get("hotpluggable"))]
    return attach, detach


class NodeController:
    def __init__(
        self,
        api_client: client.ApiClient,
        node: str,
        namespace: str | None = None,
        state_dir: Path = DEFAULT_STATE_DIR,
        libvirt_uri: str = "qemu:///system",
        resync: float = 60.0,
    ) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.node = node
        self.namespace = namespace
        self.state_dir = state_dir
        self.libvirt_uri = libvirt_uri
        self.resync = resync
        self.queue = WorkQueue()
        self.events = EventRecorder(self.core, "edgevirt-controller-node", node)
        self._manager: Any = None
        self.vms = Informer("virtualmachines", self._list_vms, self.queue.add)
        self.pods = Informer("pods", self._list_pods, self._on_pod)

    @property
    def manager(self) -> Any:
        """The libvirt layer's DomainManager (connected lazily: cleanup of disks needs no libvirt)."""
        if self._manager is None:
            from cri_shim.vm import DiskManager, DomainManager

            disks = DiskManager(self.state_dir, host_disk_roots=[HOST_DISK_ROOT])
            self._manager = DomainManager(self.state_dir, uri=self.libvirt_uri, disks=disks)
        return self._manager

    def _list_vms(self, **kw: Any) -> Any:
        if self.namespace:
            return self.custom.list_namespaced_custom_object(
                api.GROUP, api.VERSION, self.namespace, api.PLURAL, **kw
            )
        return self.custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL, **kw)

    def _list_pods(self, **kw: Any) -> Any:
        fs = f"spec.nodeName={self.node}"
        if self.namespace:
            return self.core.list_namespaced_pod(
                self.namespace, label_selector=podspec.LABEL_VM, field_selector=fs, **kw
            )
        return self.core.list_pod_for_all_namespaces(label_selector=podspec.LABEL_VM, field_selector=fs, **kw)

    def _on_pod(self, key: str) -> None:
        ns, name = key.split("/", 1)
        if name.endswith("-vm"):
            self.queue.add(f"{ns}/{name[:-3]}")

    def run(self, stop: threading.Event) -> None:
        self.vms.start(stop)
        self.pods.start(stop)
        threading.Thread(target=self._resync_loop, args=(stop,), daemon=True).start()
        while not stop.is_set():
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
                log.warning("node reconcile %s: API %s %s: retrying", key, e.status, e.reason)
                self.queue.add_after(key, 1.0 if e.status == 409 else 3.0)
            except Exception:
                log.exception("node reconcile %s failed: retrying", key)
                self.queue.add_after(key, 5.0)
            finally:
                self.queue.done(key)

    def _resync_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.resync):
            for k in list(self.vms.cache):
                self.queue.add(k)

    def mine(self, vm: dict) -> bool:
        return self.node in ((vm.get("status") or {}).get("nodeName"), (vm.get("spec") or {}).get("nodeName"))

    # ---------------------------------------------------------------- reconcile
    def reconcile(self, key: str) -> float | None:
        vm = self.vms.get(key)
        if vm is None or not self.mine(vm):
            return None
        ns, name = key.split("/", 1)
        pod = self.pods.get(f"{ns}/{api.pod_name(name)}")
        meta = vm["metadata"]
        if meta.get("deletionTimestamp"):
            if api.FINALIZER not in (meta.get("finalizers") or []):
                return None
            if pod is not None:
                return 2.0  # cluster mode is deleting it; the domain goes with the pod
            self.cleanup(meta["uid"])
            fins = [f for f in meta.get("finalizers") or [] if f != api.FINALIZER]
            self.custom.patch_namespaced_custom_object(
                api.GROUP,
                api.VERSION,
                ns,
                api.PLURAL,
                name,
                {"metadata": {"finalizers": fins, "resourceVersion": meta["resourceVersion"]}},
            )
            self.events.emit(
                vm, "Normal", "NodeStateRemoved", f"removed the VM's disks and state on {self.node}"
            )
            return None
        if pod is None or (pod.get("status") or {}).get("phase") != "Running":
            return None
        return self.reconcile_domain(vm, pod)

    def cleanup(self, uid: str) -> None:
        """Remove every domain of this VM and its VM-scoped disks. Idempotent."""
        from cri_shim.vm import DiskManager

        try:
            mgr = self.manager
            for dom in mgr.list_managed():
                if mgr.metadata(dom).get("uid") == uid:
                    mgr.remove(dom, delete_disks=True)
        except Exception as e:  # libvirt away: the disks can still go; a stale domain is reported
            log.warning("cleanup of %s: libvirt: %s", uid, e)
        DiskManager(self.state_dir).remove("vm", uid)

    def find_domain(self, uid: str) -> str | None:
        mgr = self.manager
        for dom in mgr.list_managed():
            if mgr.metadata(dom).get("uid") == uid:
                return dom
        return None

    def reconcile_domain(self, vm: dict, pod: dict) -> float | None:
        mgr = self.manager
        dom = self.find_domain(vm["metadata"]["uid"])
        if dom is None:
            return 5.0
        spec = vm.get("spec") or {}
        old = vm.get("status") or {}
        facts = mgr.facts(dom)
        paused = facts["phase"] == "paused"
        if bool(spec.get("paused")) != paused and facts["phase"] in ("running", "paused"):
            if spec.get("paused"):
                mgr.suspend(dom)
                self.events.emit(vm, "Normal", "Suspended", "the guest is paused")
            else:
                mgr.resume(dom)
                self.events.emit(vm, "Normal", "Resumed", "the guest runs again")
            facts = mgr.facts(dom)
        retry: float | None = None
        vols = {v["name"]: dict(v) for v in old.get("volumes") or []}
        boot = podspec_volumes(pod)
        attach, detach = hotplug_plan(spec.get("volumes") or [], boot, attached_volumes(mgr.xml(dom)))
        if attach or detach:  # show the operation before the (slow) libvirt call
            for v in attach:
                vols[v["name"]] = {"name": v["name"], "phase": "Attaching"}
            for n in detach:
                vols[n] = {**vols.get(n, {"name": n}), "phase": "Detaching"}
            self._patch_status(vm, {"volumes": sorted(vols.values(), key=lambda x: x["name"])})
        for v in attach:
            try:
                target = mgr.attach_volume(dom, to_volume_spec(v))
                vols[v["name"]] = {"name": v["name"], "target": target, "phase": "Mounted"}
                self.events.emit(vm, "Normal", "VolumeMounted", f"volume {v['name']} attached as {target}")
            except Exception as e:
                vols[v["name"]] = {"name": v["name"], "phase": "Failed", "message": str(e)}
                self.events.emit(vm, "Warning", "VolumeMountFailed", f"volume {v['name']}: {e}")
                retry = 5.0
        for n in detach:
            try:
                mgr.detach_volume(dom, n)
                vols.pop(n, None)
                self.events.emit(vm, "Normal", "VolumeUnmounted", f"volume {n} detached")
            except Exception as e:
                # e.g. the guest had not finished taking the device when the unplug came: try again
                vols[n] = {"name": n, "phase": "Failed", "message": f"detach: {e}"}
                self.events.emit(vm, "Warning", "VolumeUnmountFailed", f"volume {n}: {e}")
                retry = 5.0
        now = attached_volumes(mgr.xml(dom))
        for n, target in now.items():
            if n not in vols or vols[n].get("phase") != "Failed":
                vols[n] = {"name": n, "target": target, "phase": "Mounted"}
        # an entry of a volume that is neither attached nor wanted any more tells nothing true (e.g.
        # Attaching written just before this controller was killed, then the volume was unmounted)
        wanted = {v["name"] for v in spec.get("volumes") or []}
        for n in [n for n in vols if n not in now and n not in wanted]:
            del vols[n]
        new = {
            "accel": facts["accel"],
            "domainState": facts["phase"].capitalize(),
            "volumes": sorted(vols.values(), key=lambda x: x["name"]),
        }
        if attach or detach or any(old.get(k) != v for k, v in new.items()):
            self._patch_status(vm, new)
        return retry

    def _patch_status(self, vm: dict, fields: dict) -> None:
        m = vm["metadata"]
        self.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, m["namespace"], api.PLURAL, m["name"], {"status": fields}
        )


def podspec_volumes(pod: dict) -> list[dict]:
    import json

    raw = (pod["metadata"].get("annotations") or {}).get(ANN_VOLUMES, "[]")
    try:
        return list(json.loads(raw))
    except ValueError:
        return []
