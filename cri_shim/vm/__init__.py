"""The libvirt layer shared by the CRI kvm handler and the VirtualMachine controller's node mode.

``vmcrd`` imports ``cri_shim.vm``; nothing here imports ``vmcrd``. One module per job:

* :mod:`.spec` - resolved domain data (disks, NICs, kernel boot) and input validation
* :mod:`.domain_xml` - domain XML via ElementTree (accel type, disks, console log, tap-fd NICs)
* :mod:`.tapwrap` / :mod:`.wrapper_install` - the QEMU wrapper that opens macvtap tap devices
* :mod:`.images` - image references -> verified base disks in a content-addressed cache
* :mod:`.disks` - qcow2 overlays (per VM or per pod), emptyDisk, hostDisk
* :mod:`.cloudinit` - NoCloud seed ISO, network-config v2 from a CNI result
* :mod:`.cni` - NICs (MAC + tap device node) from a macvtap CNI result
* :mod:`.console_log` - serial console -> CRI log format
* :mod:`.manager` - :class:`DomainManager`, the one owner of every domain operation

The node's acceleration (``kvm`` vs TCG) comes from :mod:`runtimeclass.probe`.
"""

from .cloudinit import CloudInit, network_config_from_cni
from .cni import nics_from_cni_result
from .console_log import ConsoleLogConverter
from .disks import DiskManager
from .domain_xml import RESERVED_DISK_NAMES, attached_volumes
from .errors import ImageError, ValidationError, VMError
from .images import BaseImage, ImageStore, SkopeoSource
from .manager import (
    DomainExists,
    DomainManager,
    DomainNotFound,
    DomainState,
    DomainStats,
    HostDisk,
    VMSpec,
    VolumeSpec,
)
from .spec import DiskSpec, DomainSpec, KernelBoot, NicSpec

__all__ = [
    "RESERVED_DISK_NAMES",
    "BaseImage",
    "CloudInit",
    "ConsoleLogConverter",
    "DiskManager",
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
    "SkopeoSource",
    "VMError",
    "VMSpec",
    "ValidationError",
    "VolumeSpec",
    "attached_volumes",
    "network_config_from_cni",
    "nics_from_cni_result",
]
