"""The lifecycle of a VM container: its record and its libvirt domain, kept in step.

* create: the record is written (phase ``setup``) before the domain is defined; if defining fails,
  the domain and the record are removed again; a record still in ``setup`` at start (the shim was
  killed halfway) is undone by :meth:`ContainerLifecycle.recover`.
* start, stop (ACPI shutdown, destroy after the timeout), remove.
* :meth:`ContainerLifecycle.observe` asks libvirt whether a started container's domain has ended and
  records the end once (exit code, reason: :func:`container_end`), so a container's state never flips
  back; reading the state (:attr:`~.records.ContainerRecord.state`) never asks libvirt.

Only the guest's own power-off is a success (exit 0, ``Completed``; libvirt reports a SIGTERM to
QEMU the same way, shut off with reason ``shutdown``); QEMU killed with kill -9 (libvirt: shut off,
reason ``crashed``), destroyed, failed or gone is an error, so kubelet's ``restartPolicy: OnFailure``
restarts it, and ``Always`` restarts either. kubelet restarts a VM in the same sandbox: a new
container (CreateContainer, attempt + 1) whose new domain boots the same disks (they are the VM's
or the pod's, not the container's) and the same NIC (the sandbox's CNI result and tap device node);
the ended container's domain stays, shut off, until kubelet removes it, and removing it leaves the
shared disks alone.

Locking is the caller's (the handler holds the container's lock). Errors of the libvirt layer
(:class:`~cri_shim.vm.errors.VMError`) propagate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..vm.errors import DomainNotFound, VMError
from ..vm.model import DomainState, DomainStats, VMSpec
from .console import ConsoleLogs
from .records import ContainerRecord, RecordStore

log = logging.getLogger("edgevirt-cri.kvm")


class Closable(Protocol):
    def close(self) -> None: ...


class Domains(Protocol):
    """What the kvm handler uses of the libvirt layer (:class:`cri_shim.vm.DomainManager`)."""

    def connect(self) -> None: ...

    def lib_version(self) -> int: ...

    def create(self, spec: VMSpec, *, start: bool = True, paused: bool = False) -> str: ...

    def metadata(self, name: str) -> dict[str, str]: ...

    def start(self, name: str, paused: bool = False) -> None: ...

    def shutdown(self, name: str, timeout: float = 30.0, poll: float = 0.2) -> str: ...

    def destroy(self, name: str) -> None: ...

    def remove(self, name: str, delete_disks: bool = False) -> bool: ...

    def state(self, name: str) -> DomainState: ...

    def stats(self, name: str) -> DomainStats: ...

    def console_pty(self, name: str) -> str: ...

    def watch_stops(self, on_stop: Callable[[str], None]) -> Closable: ...

    def close(self) -> None: ...

    def has_legacy_vm_disks(self, uid: str) -> bool: ...

    def adopt_legacy_vm_disks(self, namespace: str, uid: str) -> bool: ...

    def remove_pod_disks(self, namespace: str, pod_uid: str) -> None: ...


def now() -> int:
    return time.time_ns()


#: libvirt's reason for a domain that ended -> (exit code, what happened); an unlisted reason is 1
ENDS = {
    ("shutoff", "shutdown"): (0, "the guest powered off"),
    ("shutoff", "crashed"): (139, "QEMU ended without the guest powering off (killed or crashed)"),
    ("shutoff", "destroyed"): (137, "the VM was stopped hard (destroyed)"),
    ("shutoff", "daemon"): (137, "libvirt stopped the VM"),
    ("shutoff", "failed"): (1, "QEMU failed"),
    ("crashed", "panicked"): (139, "the guest kernel panicked"),
}


def container_end(st: DomainState) -> tuple[int, str, str]:
    """(exit code, CRI reason, message) of a started container whose domain is in state ``st``
    (not running): ``Completed`` only for the guest's own power-off, ``Error`` for anything else."""
    code, what = ENDS.get((st.phase, st.reason), (1, "the VM ended"))
    return code, "Completed" if code == 0 else "Error", f"{what}: domain {st.phase} ({st.reason})"


#: the exit code of a container whose VM failed to boot (containerd's for a failed start)
START_ERROR_EXIT_CODE = 128


class AlreadyRan(Exception):
    """StartContainer of a container whose VM has run and ended (CRI: create a new one)."""


class ContainerLifecycle:
    """Containers of the kvm handler: records in ``store``, domains through ``domains``."""

    def __init__(self, store: RecordStore[ContainerRecord], domains: Domains, consoles: ConsoleLogs) -> None:
        self.store = store
        self.domains = domains
        self.consoles = consoles

    def of_sandbox(self, sandbox_id: str) -> list[ContainerRecord]:
        return [c for c in self.store.all() if c.sandbox_id == sandbox_id]

    def create(self, c: ContainerRecord, spec: VMSpec) -> ContainerRecord:
        """Record ``c``, define its domain (not started), touch its CRI log; all-or-nothing up to
        the definition."""
        self.store.put(c)
        try:
            self.domains.create(spec, start=False)
            console = self.domains.metadata(spec.name).get("consoleLog", "")
        except BaseException:
            with contextlib.suppress(Exception):
                self.domains.remove(spec.name)
            self.store.delete(c.id)
            raise
        if c.log_path:
            Path(c.log_path).parent.mkdir(parents=True, exist_ok=True)
            Path(c.log_path).touch()
        return self.store.update(c.id, lambda r: _created(r, console))

    def start(self, c: ContainerRecord) -> ContainerRecord:
        """Boot the VM and start its console log; no-op when it runs, :class:`AlreadyRan` when it
        has ended (a failed boot too: :meth:`start_failed`)."""
        if c.started_at or c.finished_at:
            if self.observe(c).state == "RUNNING":
                return c
            raise AlreadyRan(c.id)
        # the console log starts fresh for each boot (kubelet keeps the CRI log per container)
        with contextlib.suppress(OSError):
            Path(c.console_source).unlink(missing_ok=True)
        self.domains.start(c.domain)
        c = self.store.update(c.id, lambda r: _started(r, now()))
        self.consoles.start(c)
        return c

    def start_failed(self, c: ContainerRecord, message: str) -> ContainerRecord:
        """End a container whose VM failed to boot (exit code 128, ``StartError``, as containerd
        records a failed start): kubelet then creates the next one in the same sandbox, instead of
        finding a container that never ran in the pod's one place for a VM."""
        with contextlib.suppress(Exception):
            self.domains.destroy(c.domain)  # whatever QEMU the failed start left
        return self.store.update(c.id, lambda r: r.ended(now(), START_ERROR_EXIT_CODE, "StartError", message))

    def stop(self, c: ContainerRecord, timeout: float) -> ContainerRecord:
        """ACPI shutdown (destroy after ``timeout`` s; at once for 0), then record the end."""
        if c.started_at and not c.finished_at:
            try:
                if timeout > 0:
                    how = self.domains.shutdown(c.domain, timeout=timeout)
                else:
                    self.domains.destroy(c.domain)
                    how = "destroyed"
            except DomainNotFound:
                how = "gone"
            log.info("container %s stopped (%s)", c.id[:12], how)
        c = self.observe(self.store.get(c.id) or c)
        self.consoles.stop(c.id)
        return c

    def remove(self, c: ContainerRecord) -> None:
        self.consoles.stop(c.id)
        self.domains.remove(c.domain)
        self.consoles.forget(c.id)
        self.store.delete(c.id)

    def observe(self, c: ContainerRecord) -> ContainerRecord:
        """``c`` with the end of its domain recorded, if the domain has ended or is gone (asks
        libvirt only for a started container without a recorded end; libvirt away: unchanged)."""
        if c.finished_at or not c.started_at:
            return c
        try:
            st = self.domains.state(c.domain)
        except DomainNotFound:
            msg = f"libvirt domain {c.domain} no longer exists"
            return self.store.update(c.id, lambda r: r.ended(now(), 137, "DomainGone", msg))
        except VMError:
            return c  # libvirt away: the last known state (VMs run on without libvirtd)
        if st.running:
            return c
        code, reason, msg = container_end(st)
        c = self.store.update(c.id, lambda r: r.ended(now(), code, reason, msg))
        self.consoles.stop(c.id)
        return c

    def stats(self, c: ContainerRecord) -> DomainStats | None:
        """The running VM's CPU and memory use; None when it is not running or libvirt cannot say."""
        if self.observe(c).state != "RUNNING":
            return None
        try:
            return self.domains.stats(c.domain)
        except VMError:
            return None

    def recover(self) -> None:
        """At start: undo containers left half-made, resume the console logs of running ones."""
        for c in self.store.all():
            if c.phase == "setup":
                log.warning("container %s was left half-made; removing its domain", c.id[:12])
                with contextlib.suppress(Exception):
                    self.domains.remove(c.domain)
                self.store.delete(c.id)
            elif c.started_at and not c.finished_at:
                self.consoles.start(c)


def _created(c: ContainerRecord, console: str) -> ContainerRecord:
    return dataclasses.replace(c, phase="created", console_source=console)


def _started(c: ContainerRecord, at: int) -> ContainerRecord:
    return dataclasses.replace(c, started_at=at)
