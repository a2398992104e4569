"""The CRI ``kvm`` runtime handler of edgevirt-cri: a pod is a network namespace with a macvtap NIC,
its one container a libvirt/QEMU virtual machine.

Importing this package imports nothing else: the VirtualMachine controller imports
:mod:`.contract` (the VM pod's annotations) without loading the handler, gRPC or libvirt.
edgevirt-cri's config names :func:`create` as the factory (``cri_shim.kvm:create``).

One module per job:

* :mod:`.contract` - the VM pod annotation contract (reader side)
* :mod:`.factory` - config options -> the handler
* :mod:`.handler` - the CRI methods (lock, delegate, answer)
* :mod:`.translate` - CRI requests + the parsed contract -> records and the libvirt layer's VMSpec (pure)
* :mod:`.sandboxes` / :mod:`.containers` - record and network / record and domain, kept in step
* :mod:`.sandbox_net` - network namespace + CNI ADD/DEL; :mod:`.cni_exec` runs a conflist
* :mod:`.records` - sandbox and container records, persisted as JSON
* :mod:`.replies` - runtime.v1 messages from records
* :mod:`.console` - console-log converter threads and Attach
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .handler import KvmHandler


def create(name: str, options: dict[str, Any]) -> KvmHandler:
    """The kvm handler named ``name`` from its config options (see :mod:`.factory`)."""
    from .factory import create as create_handler

    return create_handler(name, options)
