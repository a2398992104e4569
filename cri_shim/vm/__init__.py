"""The libvirt layer shared by the CRI kvm handler and the VirtualMachine controller's node mode.

``vmcrd`` imports ``cri_shim.vm``; nothing here imports ``vmcrd`` or the kvm handler. One module
per job:

* :mod:`.model` - what callers hand in and get back (VMSpec, VolumeSpec, HostDisk, DomainState,
  DomainStats)
* :mod:`.states` - libvirt state/reason codes -> DomainState, exit codes (pure tables)
* :mod:`.connection` - the one seam to libvirt's connection (open/reconnect, lookup, define, list)
* :mod:`.lifecycle` - :class:`DomainManager`: create (with its undo list), start, shutdown, destroy,
  suspend/resume, remove, facts, console pty
* :mod:`.build` - VMSpec -> DomainSpec, making the files (overlay, volumes, seed ISO)
* :mod:`.hotplug` - attach/detach a volume on a running domain
* :mod:`.spec` - resolved domain data (disks, NICs, kernel boot) and input validation
* :mod:`.domain_xml` - domain XML via ElementTree (accel type, disks, console log, tap-fd NICs)
* :mod:`.tapwrap` / :mod:`.wrapper_install` - the QEMU wrapper that opens macvtap tap devices
* :mod:`.images` - image references -> verified base disks in a content-addressed cache;
  :mod:`.oci` (registry references), :mod:`.containerd_source` (containerDisks from containerd's
  image store, :mod:`.containerd_images`, :mod:`.disk_layers`) and :mod:`.https_fetch` (https
  downloads) fetch them; :mod:`.image_metrics` counts what they took out of images
* :mod:`.disks` - qcow2 overlays and emptyDisks, per namespace and VM or pod; :mod:`.hostdisks`
  confines hostDisk files to their namespace's folder; :mod:`.sizes` holds the node's size limits
* :mod:`.private` - files 0600 in folders 0700
* :mod:`.cloudinit` - NoCloud seed ISO, network-config v2 from a CNI result
* :mod:`.nics` - NICs (MAC + tap device node) from a macvtap CNI result
* :mod:`.console_log` - serial console -> CRI log format

The names below are imported on first use, so importing one module of this package (e.g.
:mod:`.model` for the VM pod contract) does not load libvirt. The node's acceleration (``kvm`` vs
TCG) comes from :mod:`runtimeclass.probe`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cloudinit import CloudInit, network_config_from_cni
    from .console_log import ConsoleLogConverter
    from .containerd_source import ContainerdSource
    from .disks import DiskManager, DiskOwner
    from .domain_xml import RESERVED_DISK_NAMES, attached_volumes
    from .errors import DomainExists, DomainNotFound, ImageError, ValidationError, VMError
    from .images import BaseImage, ImageStore
    from .lifecycle import DomainManager
    from .model import DomainState, DomainStats, HostDisk, VMSpec, VolumeSpec
    from .nics import nics_from_cni_result
    from .sizes import DiskLimits
    from .spec import DiskSpec, DomainSpec, KernelBoot, NicSpec

#: public name -> the module that defines it
_HOME = {
    "RESERVED_DISK_NAMES": ".domain_xml",
    "BaseImage": ".images",
    "CloudInit": ".cloudinit",
    "ConsoleLogConverter": ".console_log",
    "ContainerdSource": ".containerd_source",
    "DiskLimits": ".sizes",
    "DiskManager": ".disks",
    "DiskOwner": ".disks",
    "DiskSpec": ".spec",
    "DomainExists": ".errors",
    "DomainManager": ".lifecycle",
    "DomainNotFound": ".errors",
    "DomainSpec": ".spec",
    "DomainState": ".model",
    "DomainStats": ".model",
    "HostDisk": ".model",
    "ImageError": ".errors",
    "ImageStore": ".images",
    "KernelBoot": ".spec",
    "NicSpec": ".spec",
    "VMError": ".errors",
    "VMSpec": ".model",
    "ValidationError": ".errors",
    "VolumeSpec": ".model",
    "attached_volumes": ".domain_xml",
    "network_config_from_cni": ".cloudinit",
    "nics_from_cni_result": ".nics",
}

__all__ = [
    "RESERVED_DISK_NAMES",
    "BaseImage",
    "CloudInit",
    "ConsoleLogConverter",
    "ContainerdSource",
    "DiskLimits",
    "DiskManager",
    "DiskOwner",
    "DiskSpec",
    "DomainExists",
    "DomainManager",
    "DomainNotFound",
    "DomainSpec",
    "DomainState",
    "DomainStats",
    "HostDisk",
    "ImageError",
    "ImageStore",
    "KernelBoot",
    "NicSpec",
    "VMError",
    "VMSpec",
    "ValidationError",
    "VolumeSpec",
    "attached_volumes",
    "network_config_from_cni",
    "nics_from_cni_result",
]


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
