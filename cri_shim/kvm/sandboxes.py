"""The lifecycle of a VM pod sandbox: its record and its network, kept in step.

* setup: the record is written (phase ``setup``) before anything is made; then the network
  namespace, then CNI ADD; the record turns ``ready`` with the CNI result. If any step fails, what
  was made is torn down (CNI DEL is due from the moment ADD starts) and the record removed; a record
  still in ``setup`` at start (the shim was killed halfway) is undone by
  :meth:`SandboxLifecycle.recover`.
* stop: CNI DEL and namespace removal (kept retryable: the record says whether DEL is still due).
* remove: the record (the handler stopped and removed the sandbox's containers first).

Locking is the caller's (the handler holds the sandbox's lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

from ..vm.errors import VMError
from .records import RecordStore, SandboxRecord
from .sandbox_net import SandboxNetwork

log = logging.getLogger("edgevirt-cri.kvm")


class SandboxLifecycle:
    """Sandboxes of the kvm handler: records in ``store``, networks through ``network``."""

    def __init__(self, store: RecordStore[SandboxRecord], network: SandboxNetwork | None) -> None:
        self.store = store
        self._network = network

    @property
    def network(self) -> SandboxNetwork:
        if self._network is None:  # the handler reports itself unavailable and is not registered
            raise VMError("the kvm handler has no usable VM network (see its unavailable reason)")
        return self._network

    def setup(self, sb: SandboxRecord) -> SandboxRecord:
        """Record ``sb``, make its namespace and attach the VM network; all-or-nothing."""
        self.store.put(sb)
        try:
            self.network.create_namespace(sb)
            sb = dataclasses.replace(sb, network_added=True)  # DEL is due from here on, even if ADD fails
            result = self.network.add(sb)
            return self.store.put(dataclasses.replace(sb, cni_result=result, phase="ready", state="READY"))
        except BaseException:
            with contextlib.suppress(Exception):
                self.network.teardown(sb)
            self.store.delete(sb.id)
            raise

    def stop(self, sb: SandboxRecord) -> SandboxRecord:
        """Detach the network and remove the namespace (if anything is left); NOTREADY after."""
        if sb.network_added or self.network.has_namespace(sb):
            self.network.teardown(sb)  # CNIError: still due, the next StopPodSandbox tries again
            return self.store.update(sb.id, _detached)
        if sb.state != "NOTREADY":
            return self.store.update(sb.id, _not_ready)
        return sb

    def remove(self, sb: SandboxRecord) -> None:
        self.store.delete(sb.id)

    def recover(self) -> None:
        """At start: undo sandboxes left half-made by a shim that died inside RunPodSandbox."""
        for sb in self.store.all():
            if sb.phase == "setup":
                log.warning("pod sandbox %s was left half-made; removing what it made", sb.id[:12])
                with contextlib.suppress(Exception):
                    self.network.teardown(sb)
                self.store.delete(sb.id)


def _detached(sb: SandboxRecord) -> SandboxRecord:
    return dataclasses.replace(sb, network_added=False, state="NOTREADY")


def _not_ready(sb: SandboxRecord) -> SandboxRecord:
    return dataclasses.replace(sb, state="NOTREADY")
