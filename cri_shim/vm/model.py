"""What callers of the libvirt layer hand it and get back.

* :class:`VMSpec` - a VM to create (:meth:`.lifecycle.DomainManager.create` turns it into a domain);
  the CRI kvm handler builds it from a CRI request (:mod:`cri_shim.kvm.translate`), tests and the
  benches by hand.
* :class:`VolumeSpec` / :class:`HostDisk` - a data volume, at boot or hot-plugged (node mode).
* :class:`DomainState` / :class:`DomainStats` - what a domain reports (see :mod:`.states`).

Plain data: no libvirt here. The resolved shapes rendered as XML are in :mod:`.spec`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .cloudinit import CloudInit
from .domain_xml import RESERVED_DISK_NAMES
from .errors import ValidationError
from .spec import KernelBoot, NicSpec, check_name


@dataclasses.dataclass(frozen=True)
class DomainState:
    """A domain's state as edgevirt reports it."""

    phase: str  # running | paused | shutting-down | shutoff | crashed | pmsuspended | unknown
    reason: str
    exit_code: int | None = None  # only for shutoff/crashed

    @property
    def running(self) -> bool:
        return self.phase in ("running", "paused", "shutting-down", "pmsuspended")


@dataclasses.dataclass(frozen=True)
class DomainStats:
    """CPU and memory usage (CRI ContainerStats / node-mode facts)."""

    timestamp_ns: int
    cpu_time_ns: int
    memory_actual_kib: int
    memory_rss_kib: int
    memory_available_kib: int | None
    memory_unused_kib: int | None


@dataclasses.dataclass
class HostDisk:
    path: str
    type: str = "Disk"  # Disk | DiskOrCreate
    capacity: str | int | None = None


@dataclasses.dataclass
class VolumeSpec:
    """A data volume (a VirtualMachine's ``spec.volumes[]``): exactly one of empty_disk, host_disk,
    image."""

    name: str
    empty_disk: str | int | None = None  # capacity, e.g. "64Mi"
    host_disk: HostDisk | None = None
    image: str | None = None
    bus: str = "virtio"
    read_only: bool = False
    cdrom: bool = False
    format: str = "qcow2"

    def validate(self, field: str) -> None:
        check_name(f"{field}.name", self.name)
        if self.name in RESERVED_DISK_NAMES:
            raise ValidationError(f"{field}.name", f"{self.name!r} is reserved", "choose another volume name")
        srcs = [s for s in (self.empty_disk, self.host_disk, self.image) if s is not None]
        if len(srcs) != 1:
            raise ValidationError(
                field, f"has {len(srcs)} sources", "give exactly one of emptyDisk, hostDisk, image"
            )


@dataclasses.dataclass
class VMSpec:
    """What a caller asks for; :meth:`.lifecycle.DomainManager.create` turns it into a domain."""

    name: str
    uid: str
    cpu: int = 1
    memory_mib: int = 256
    image: str | None = None
    root_size: str | int | None = None
    kernel_boot: KernelBoot | None = None
    cloud_init: CloudInit | None = None
    cni_result: dict[str, Any] | None = None
    nics: list[NicSpec] = dataclasses.field(default_factory=list)
    volumes: list[VolumeSpec] = dataclasses.field(default_factory=list)
    console_log: Path | None = None
    disk_scope: str = "vm"  # "vm": disks kept across stop/start, keyed by uid; "pod": the pod's
    disk_key: str = ""  # defaults to uid
    uuid: str = ""
    # whose disks: the VM's or pod's namespace (the kvm handler: kubelet's); "" = unscoped (the layout
    # before namespaces, for callers that serve one tenant; no hostDisk then)
    namespace: str = ""


def dump_spec(spec: VMSpec) -> str:
    """JSON of a VMSpec (for logs and debugging)."""
    return json.dumps(dataclasses.asdict(spec), default=str, sort_keys=True)
