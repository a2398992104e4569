"""Node mode's collection of VM disks that no VirtualMachine owns any more.

A VM's writable disks are kept on its node, keyed by (namespace, VM UID), across stop and start; its
deletion removes them (the finalizer ``edgevirt.io/node-cleanup``). Disks can still be left without an
owner: a VM whose finalizer an administrator removed by hand, or a pod that named a VM UID nobody has
(the admission policy reserves that annotation, but the node holds on its own). Every
:data:`GC_INTERVAL` seconds node mode lists the VM disk folders of this node and removes those whose
(namespace, UID) is no VirtualMachine in the API server, once they are older than :data:`GRACE` (a VM
just created may not be in the informer yet) and no domain of theirs runs here. The folders are listed
with the disk layer alone: libvirt (the DomainManager, ~12 MiB once loaded, and a connection) is
needed only when such a folder exists, so a node that never ran a VM never loads it. Plain kvm pods' disks
are the kvm handler's (removed with the pod) and never touched here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from .api import KubeObject
from .kube import Informer

if TYPE_CHECKING:
    from cri_shim.vm import DiskManager, DomainManager

log = logging.getLogger(__name__)

#: Seconds between collections.
GC_INTERVAL = 300.0
#: A disk folder younger than this is never collected (seconds since its last change).
GRACE = 600.0

Owner = tuple[str, str]  # (namespace, VM UID)


def orphans(owners: Iterable[Owner], vms: Iterable[KubeObject], namespace: str | None = None) -> list[Owner]:
    """The disk owners that are no VirtualMachine of ``vms`` (within ``namespace`` when node mode
    watches one namespace only: other namespaces' disks are not its to judge)."""
    known = {(vm["metadata"].get("namespace", ""), vm["metadata"].get("uid", "")) for vm in vms}
    return [o for o in owners if o not in known and (namespace is None or o[0] == namespace)]


class DiskCollector:
    """Removes this node's VM disks that no VirtualMachine owns (see the module's docstring)."""

    def __init__(
        self,
        disks: Callable[[], DiskManager],
        manager: Callable[[], DomainManager],
        vms: Informer,
        namespace: str | None = None,
        interval: float = GC_INTERVAL,
        grace: float = GRACE,
    ) -> None:
        self.disks = disks
        self.manager = manager
        self.vms = vms
        self.namespace = namespace
        self.interval = interval
        self.grace = grace

    def collect_once(self, now: float | None = None) -> list[Owner]:
        """One collection; returns the owners whose disks were removed."""
        if not self.vms.synced.is_set():
            return []
        now = time.time() if now is None else now
        disks = self.disks()
        old_enough = []
        for ns, uid in orphans(disks.vm_disk_owners(), self.vms.values(), self.namespace):
            try:
                if now - disks.dir_for("vm", uid, ns).stat().st_mtime >= self.grace:
                    old_enough.append((ns, uid))
            except FileNotFoundError:
                continue
        if not old_enough:
            return []  # nothing to judge: no libvirt needed
        mgr = self.manager()
        removed = []
        for ns, uid in old_enough:
            if any(mgr.state(d).phase in ("running", "paused") for d in mgr.vm_domains(ns, uid)):
                continue  # in use: whoever runs it, its disks stay
            mgr.remove_vm(ns, uid)
            log.info("removed the disks of %s/%s: no VirtualMachine has that UID", ns, uid)
            removed.append((ns, uid))
        return removed

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.collect_once()
            except Exception as e:  # libvirt or the disk folder away: try again next time
                log.warning("collecting unowned VM disks failed: %s", e)

    def start(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(stop,), name="disk-gc", daemon=True)
        t.start()
        return t
