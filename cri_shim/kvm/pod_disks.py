"""Whose disks a kvm pod gets, and when they go: the handler's side of the disk layout of
:mod:`cri_shim.vm.disks` (``disks/ns/<namespace>/{vm,pod}/<uid>/``).

* A VirtualMachine's pod boots the disks of (its namespace as kubelet gave it, the VM's UID); they
  outlive the pod (node mode removes them with the VM). A VM whose disks still lie in the layout of
  an edgevirt before namespaces (``disks/vm/<uid>/``) is refused until they are claimed for its
  namespace (:func:`refuse_unclaimed_legacy_disks`): by this handler at start for the VM pods it
  ran before the upgrade (:func:`adopt_legacy_disks`), or by node mode, which knows each VM's
  namespace from the API server. An annotation alone never claims them: that was the hole.
* A plain kvm pod's disks are (namespace, pod UID): a new container of the pod boots the same root
  disk, and they go with the pod's last sandbox (:func:`release_pod_disks`; kubelet may make a new
  sandbox for the same pod before it removes the old one).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Protocol

import grpc

from ..errors import BackendError
from .records import RecordStore, SandboxRecord

log = logging.getLogger("edgevirt-cri.kvm")


class PodDisks(Protocol):
    """What this module uses of the libvirt layer (:class:`cri_shim.vm.DomainManager`)."""

    def has_legacy_vm_disks(self, uid: str) -> bool: ...

    def adopt_legacy_vm_disks(self, namespace: str, uid: str) -> bool: ...

    def remove_pod_disks(self, namespace: str, pod_uid: str) -> None: ...


def refuse_unclaimed_legacy_disks(disks: PodDisks, sb: SandboxRecord) -> None:
    """FAILED_PRECONDITION (kubelet retries) for a VM pod whose VM UID still has disks of the layout
    before namespaces: they are the VM's, but only node mode can say which namespace it is in."""
    vm = sb.contract.vm
    if vm is not None and disks.has_legacy_vm_disks(vm.vm_uid):
        raise BackendError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the disks of VM {vm.vm_uid} were made by an edgevirt before disks had namespaces and are "
            f"not yet claimed for namespace {sb.metadata.namespace}: the node-mode controller "
            "(edgevirt-controller --mode node) claims them for the VM's namespace, then this is retried "
            "(see the kvm handler's documentation, upgrading)",
        )


def adopt_legacy_disks(disks: PodDisks, sandboxes: RecordStore[SandboxRecord]) -> None:
    """At start: move the old-layout disks of the VM pods this handler ran (their namespace is
    kubelet's) to their namespace; a VM UID claimed by pods of two namespaces is left for node mode."""
    claims: dict[str, set[str]] = defaultdict(set)
    for sb in sandboxes.all():
        if sb.phase == "ready" and sb.contract.vm is not None:
            claims[sb.contract.vm.vm_uid].add(sb.metadata.namespace)
    for uid, namespaces in sorted(claims.items()):
        if len(namespaces) != 1:
            log.warning(
                "VM uid %s is claimed by pods of namespaces %s: its old disks stay", uid, sorted(namespaces)
            )
            continue
        (ns,) = namespaces
        try:
            if disks.adopt_legacy_vm_disks(ns, uid):
                log.info("moved the disks of VM %s to namespace %s (new layout)", uid, ns)
        except Exception as e:  # a bad record must not stop the handler
            log.warning("could not move the old disks of VM %s to namespace %s: %s", uid, ns, e)


def release_pod_disks(disks: PodDisks, sandboxes: RecordStore[SandboxRecord], sb: SandboxRecord) -> None:
    """Remove a plain kvm pod's disks with its last sandbox (``sb`` is being removed)."""
    md = sb.metadata
    if sb.contract.vm is not None:
        return  # a VM's disks are node mode's to remove, with the VM
    others = [
        o
        for o in sandboxes.all()
        if o.id != sb.id and (o.metadata.namespace, o.metadata.uid) == (md.namespace, md.uid)
    ]
    if not others:
        disks.remove_pod_disks(md.namespace, md.uid)
