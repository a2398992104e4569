"""Node mode: what needs the node's libvirt, for the VirtualMachines placed on this node.

* **mount / unmount**: a hotpluggable volume in ``spec.volumes`` of a Running VM is attached live;
  one removed from the spec is detached; ``status.volumes[]`` shows Attaching, Mounted, Detaching
  or Failed (with a message).
* **pause / unpause**: ``spec.paused`` suspends / resumes the domain.
* **facts**: ``status.accel`` and ``status.domainState`` from the domain.
* **cleanup**: the finalizer ``edgevirt.io/node-cleanup`` is removed only after the VM's pod is
  gone (cluster mode cleared ``status.podName``) and no domain of the VM runs here, once its domain
  and VM-scoped disks (keyed by the VM's UID) are deleted from this node.

Node mode reads no pods (its account may not): what it needs comes from the VirtualMachine and from
libvirt. A VM is acted on while cluster mode reports it Running or Paused (``printableStatus``,
from its pod) and its domain runs; the volumes it booted with are the user disks of the domain's
persistent definition (the kvm handler defines the non-hotpluggable volumes; hot-plugs are live
only). Only VMs on this node are its own: ``status.nodeName``, else the pin ``spec.nodeName`` (the
admission policy ``edgevirt-node-own-vms-only`` refuses writes to any other).

The VM's domains and disks are found through the libvirt layer (``cri_shim.vm``) by the VM's
namespace and UID (the kvm handler keys them by the pod's namespace, as kubelet gives it, and the
``edgevirt.io/vm-uid`` annotation); disks a VM still has in the layout of before namespaces are moved
to its namespace on reconcile. Disks no VirtualMachine owns are collected by :mod:`vmcrd.diskgc`.
The loop around the reconcile (informer, resync, retries) is :mod:`vmcrd.runner`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cri_shim.kube_rest import KubeApi
from cri_shim.kvm.contract import to_volume_spec
from cri_shim.vm import attached_volumes

from . import api
from .api import KubeObject
from .diskgc import DiskCollector
from .kube import EventRecorder, Informer, WorkQueue
from .resources import VirtualMachines
from .runner import RetryDelays, Runner

if TYPE_CHECKING:
    from cri_shim.vm import DiskManager, DomainManager

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/edgevirt/vm")
HOST_DISK_ROOT = Path("/var/lib/edgevirt/hostdisks")
RETRY = RetryDelays(conflict=1.0, api_error=3.0, error=5.0)
#: Seconds between looks at a Running VM pod whose domain the kvm handler has not made yet.
NO_DOMAIN_RECHECK = 5.0
#: Seconds before a failed attach or detach is tried again.
HOTPLUG_RETRY = 5.0
#: Seconds between looks at a VM being deleted whose pod cluster mode is still deleting (or whose
#: domain still runs).
POD_GONE_RECHECK = 2.0
#: printableStatus values under which the VM's pod runs its domain (cluster mode's view of the pod).
RUNNING_STATES = (api.RUNNING, api.PAUSED)


def hotplug_plan(
    spec_volumes: list[KubeObject], boot_volumes: set[str], attached: dict[str, str]
) -> tuple[list[KubeObject], list[str]]:
    """(to attach, to detach): hotpluggable spec volumes not attached; attached volumes gone from the
    spec that were hot-plugged (not among ``boot_volumes``, the domain's persistent disks: those
    need a restart to go)."""
    wanted = {v["name"]: v for v in spec_volumes}
    attach = [v for n, v in wanted.items() if v.get("hotpluggable") and n not in attached]
    detach = [n for n in attached if n not in wanted and n not in boot_volumes]
    return attach, detach


def volume_status(
    entries: dict[str, KubeObject], attached: dict[str, str], wanted: set[str]
) -> list[KubeObject]:
    """``status.volumes`` after the hotplug round: ``entries`` (by name, as the round left them) with
    every attached volume Mounted (unless its entry says Failed), without entries of volumes neither
    attached nor wanted any more (e.g. Attaching written just before this controller was killed, then
    the volume was unmounted): they tell nothing true."""
    vols = dict(entries)
    for n, target in attached.items():
        if n not in vols or vols[n].get("phase") != "Failed":
            vols[n] = {"name": n, "target": target, "phase": "Mounted"}
    for n in [n for n in vols if n not in attached and n not in wanted]:
        del vols[n]
    return sorted(vols.values(), key=lambda x: x["name"])


def vm_node(vm: KubeObject) -> str | None:
    """The node a VM lives on: ``status.nodeName`` (cluster mode's), else the pin ``spec.nodeName``
    (as the admission policy edgevirt-node-own-vms-only reads it)."""
    return (vm.get("status") or {}).get("nodeName") or (vm.get("spec") or {}).get("nodeName") or None


class NodeController:
    def __init__(
        self,
        kube: KubeApi | Any,
        node: str,
        namespace: str | None = None,
        state_dir: Path = DEFAULT_STATE_DIR,
        libvirt_uri: str = "qemu:///system",
        resync: float = 60.0,
        containerd_socket: Path | None = None,
        containerd_root: Path | None = None,
    ) -> None:
        self.vm_api = VirtualMachines(kube)  # a KubeApi (node mode: cri_shim.kube_http) or an ApiClient
        self.node = node
        self.namespace = namespace
        self.state_dir = state_dir
        self.libvirt_uri = libvirt_uri
        # hot-plugged OCI image volumes come from containerd's store, as the kvm handler's disks do
        self.containerd_socket = containerd_socket
        self.containerd_root = containerd_root
        self.queue = WorkQueue()
        self.events = EventRecorder(self.vm_api.api, "edgevirt-controller-node", node)
        self._disks: DiskManager | None = None
        self._manager: DomainManager | None = None
        # the disk collector's thread and the reconcile worker may ask for them at the same moment:
        # one DomainManager (one connection, one set of per-domain locks) for both
        self._layers_lock = threading.RLock()
        self.vms = Informer("virtualmachines", self.vm_api.list_watch(namespace), self.queue.add)
        self.runner = Runner(
            "node reconcile", self.queue, [self.vms], self.reconcile, resync=resync, delays=RETRY
        )

    @property
    def disks(self) -> DiskManager:
        """The VM disk layer alone (no libvirt): what the disk collector lists."""
        if self._disks is not None:
            return self._disks
        with self._layers_lock:
            if self._disks is None:
                from cri_shim.vm import DiskManager

                self._disks = DiskManager(self.state_dir, host_disk_roots=[HOST_DISK_ROOT])
            return self._disks

    @property
    def manager(self) -> DomainManager:
        """The libvirt layer's DomainManager, built on first use (a VM of this node to act on, or
        unowned disks to judge): a node without VMs never loads libvirt. It shares :attr:`disks`."""
        if self._manager is not None:
            return self._manager
        with self._layers_lock:
            if self._manager is None:
                from cri_shim.vm import DomainManager, ImageStore
                from cri_shim.vm.containerd_source import DEFAULT_ROOT, ContainerdSource

                source = ContainerdSource(self.containerd_socket, self.containerd_root or DEFAULT_ROOT)
                images = ImageStore(self.state_dir, container_disks=source)
                self._manager = DomainManager(
                    self.state_dir, uri=self.libvirt_uri, disks=self.disks, images=images
                )
            return self._manager

    def run(self, stop: threading.Event) -> None:
        DiskCollector(lambda: self.disks, lambda: self.manager, self.vms, self.namespace).start(stop)
        self.runner.run(stop)

    def mine(self, vm: KubeObject) -> bool:
        return vm_node(vm) == self.node

    # ---------------------------------------------------------------- reconcile
    def reconcile(self, key: str) -> float | None:
        vm = self.vms.get(key)
        if vm is None or not self.mine(vm):
            return None
        meta = vm["metadata"]
        st = vm.get("status") or {}
        if meta.get("deletionTimestamp"):
            if api.FINALIZER not in (meta.get("finalizers") or []):
                return None
            if st.get("podName") or self._runs_here(meta["namespace"], meta["uid"]):
                return POD_GONE_RECHECK  # cluster mode is deleting the pod; the domain goes with it
            self.cleanup(meta["namespace"], meta["uid"])
            self.vm_api.remove_finalizer(vm)
            self.events.emit(
                vm, "Normal", "NodeStateRemoved", f"removed the VM's disks and state on {self.node}"
            )
            return None
        self._adopt_legacy_disks(meta["namespace"], meta["uid"])
        if st.get("printableStatus") not in RUNNING_STATES:
            return None  # cluster mode's next status write (from the pod) wakes us
        return self.reconcile_domain(vm)

    def _adopt_legacy_disks(self, namespace: str, uid: str) -> None:
        """Move the VM's disks of the layout of before namespaces into its namespace's folder, while no
        domain of it exists (a defined domain names its disk files by path: they stay where they are
        until the domain is gone)."""
        if not self.disks.has_legacy_vm_disks(uid):
            return  # the common case: known without libvirt
        mgr = self.manager
        try:
            unused = not mgr.vm_domains(namespace, uid)
            if unused and mgr.adopt_legacy_vm_disks(namespace, uid):
                log.info("moved the disks of %s/%s to their namespace's folder", namespace, uid)
        except Exception as e:  # libvirt away: try again on the next reconcile
            log.warning("moving the disks of %s/%s: %s", namespace, uid, e)

    def _domains_of(self, namespace: str, uid: str) -> Iterator[str]:
        """The managed domains of this VM (its namespace and UID in their edgevirt metadata)."""
        return iter(self.manager.vm_domains(namespace, uid))

    def cleanup(self, namespace: str, uid: str) -> None:
        """Remove every domain of this VM and its disks. Idempotent; the disks go even when libvirt
        does not answer (a stale domain is then reported in the log)."""
        try:
            self.manager.remove_vm(namespace, uid)
        except Exception as e:
            log.warning("cleanup of %s/%s: libvirt: %s", namespace, uid, e)

    def find_domain(self, namespace: str, uid: str) -> str | None:
        return next(self._domains_of(namespace, uid), None)

    def _runs_here(self, namespace: str, uid: str) -> bool:
        """A domain of this VM runs (or is paused) on this node: its pod is not gone yet, whatever
        the VM's status says (e.g. cluster mode's write lags)."""
        try:
            return any(
                self.manager.state(d).phase in ("running", "paused") for d in self._domains_of(namespace, uid)
            )
        except Exception as e:  # libvirt away: nothing can be checked or removed; cleanup reports it
            log.warning("is %s/%s running here? libvirt: %s", namespace, uid, e)
            return False

    def reconcile_domain(self, vm: KubeObject) -> float | None:
        """Pause state, hot-plugged volumes and the domain's facts of a VM whose pod runs."""
        mgr = self.manager
        dom = self.find_domain(vm["metadata"]["namespace"], vm["metadata"]["uid"])
        if dom is None or mgr.state(dom).phase not in ("running", "paused"):
            return NO_DOMAIN_RECHECK  # the kvm handler has not made or started it yet
        facts = self._apply_paused(vm, dom)
        spec = vm.get("spec") or {}
        old = vm.get("status") or {}
        vols = {v["name"]: dict(v) for v in old.get("volumes") or []}
        boot = set(attached_volumes(mgr.xml(dom, inactive=True)))
        attach, detach = hotplug_plan(spec.get("volumes") or [], boot, attached_volumes(mgr.xml(dom)))
        retry: float | None = None
        if attach or detach:
            retry = self._hotplug(vm, dom, vols, attach, detach)
        wanted = {v["name"] for v in spec.get("volumes") or []}
        new = {
            "accel": facts["accel"],
            "domainState": facts["phase"].capitalize(),
            "volumes": volume_status(vols, attached_volumes(mgr.xml(dom)), wanted),
        }
        if attach or detach or any(old.get(k) != v for k, v in new.items()):
            self.vm_api.patch_status(vm, new)
        return retry

    def _apply_paused(self, vm: KubeObject, dom: str) -> dict[str, Any]:
        """Suspend or resume the domain as ``spec.paused`` says; the domain's facts afterwards."""
        mgr = self.manager
        facts = mgr.facts(dom)
        want_paused = bool((vm.get("spec") or {}).get("paused"))
        if want_paused == (facts["phase"] == "paused") or facts["phase"] not in ("running", "paused"):
            return facts
        if want_paused:
            mgr.suspend(dom)
            self.events.emit(vm, "Normal", "Suspended", "the guest is paused")
        else:
            mgr.resume(dom)
            self.events.emit(vm, "Normal", "Resumed", "the guest runs again")
        return mgr.facts(dom)

    def _hotplug(
        self,
        vm: KubeObject,
        dom: str,
        vols: dict[str, KubeObject],
        attach: list[KubeObject],
        detach: list[str],
    ) -> float | None:
        """Attach and detach, recording each volume's outcome in ``vols``; a retry delay if one failed."""
        mgr = self.manager
        for v in attach:  # show the operation before the (slow) libvirt call
            vols[v["name"]] = {"name": v["name"], "phase": "Attaching"}
        for n in detach:
            vols[n] = {**vols.get(n, {"name": n}), "phase": "Detaching"}
        self.vm_api.patch_status(vm, {"volumes": sorted(vols.values(), key=lambda x: x["name"])})
        failed = False
        for v in attach:
            try:
                target = mgr.attach_volume(dom, to_volume_spec(v))
                vols[v["name"]] = {"name": v["name"], "target": target, "phase": "Mounted"}
                self.events.emit(vm, "Normal", "VolumeMounted", f"volume {v['name']} attached as {target}")
            except Exception as e:
                vols[v["name"]] = {"name": v["name"], "phase": "Failed", "message": str(e)}
                self.events.emit(vm, "Warning", "VolumeMountFailed", f"volume {v['name']}: {e}")
                failed = True
        for n in detach:
            try:
                mgr.detach_volume(dom, n)
                vols.pop(n, None)
                self.events.emit(vm, "Normal", "VolumeUnmounted", f"volume {n} detached")
            except Exception as e:
                # e.g. the guest had not finished taking the device when the unplug came: try again
                vols[n] = {"name": n, "phase": "Failed", "message": f"detach: {e}"}
                self.events.emit(vm, "Warning", "VolumeUnmountFailed", f"volume {n}: {e}")
                failed = True
        return HOTPLUG_RETRY if failed else None
