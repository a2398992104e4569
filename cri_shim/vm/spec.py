"""Plain data describing a libvirt domain, and the checks that keep hostile input out of it.

These are the *resolved* shapes (file paths, MACs, tap device nodes) that :mod:`.domain_xml`
renders. The CRI handler and the VirtualMachine controller build them from their own APIs;
:mod:`.build` fills in the disks it creates itself (overlay, seed ISO, emptyDisk).
"""

from __future__ import annotations

import dataclasses
import re
import uuid as uuidlib
from pathlib import Path

from .errors import ValidationError

BUSES = ("virtio", "scsi", "sata")
HOTPLUG_BUSES = ("virtio", "scsi")
DISK_FORMATS = ("qcow2", "raw")
DOMAIN_TYPES = ("kvm", "qemu")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
TARGET_RE = re.compile(r"(vd|sd|hd)[a-z]{1,2}")
CONTROL_RE = re.compile("[\x00-\x1f\x7f\ud800-\udfff\ufffe\uffff]")  # also not representable in XML
MAX_NAME = 200


def check_name(field: str, value: str) -> str:
    """A libvirt domain (or volume) name: 1..200 chars, no '/', no control characters."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field, "must be a non-empty string", "give a name such as 'web-vm'")
    if len(value) > MAX_NAME:
        raise ValidationError(field, f"is {len(value)} characters long", f"use at most {MAX_NAME}")
    if "/" in value or CONTROL_RE.search(value):
        raise ValidationError(
            field, "contains '/' or a control character", "use letters, digits, '-', '_', '.' and the like"
        )
    return value


def check_abs_path(field: str, value: str | Path) -> Path:
    """An absolute path without NUL, control characters or '..' components."""
    s = str(value)
    if not s or CONTROL_RE.search(s):
        raise ValidationError(field, "is empty or contains control characters", "give an absolute file path")
    p = Path(s)
    if not p.is_absolute():
        raise ValidationError(field, f"{s!r} is not absolute", "give an absolute path starting with '/'")
    if ".." in p.parts:
        raise ValidationError(field, f"{s!r} contains '..'", "give the path without '..' components")
    return p


def check_mac(field: str, value: str) -> str:
    """A unicast MAC, returned lower-case."""
    mac = str(value).lower()
    if not MAC_RE.fullmatch(mac):
        raise ValidationError(field, f"{value!r} is not a MAC address", "use the form 02:00:00:00:00:01")
    if int(mac[:2], 16) & 1:
        raise ValidationError(
            field, f"{value!r} is a multicast MAC", "clear the lowest bit of the first octet"
        )
    return mac


@dataclasses.dataclass
class DiskSpec:
    """One disk of a domain. ``target`` is chosen by :func:`assign_targets` when empty."""

    name: str
    path: Path
    format: str = "qcow2"
    bus: str = "virtio"
    read_only: bool = False
    cdrom: bool = False
    target: str = ""
    boot_order: int | None = None
    serial: str = ""

    def validate(self, field: str) -> None:
        check_name(f"{field}.name", self.name)
        self.path = check_abs_path(f"{field}.path", self.path)
        if self.format not in DISK_FORMATS:
            raise ValidationError(f"{field}.format", f"{self.format!r} is not supported", "use qcow2 or raw")
        bus_ok = self.bus in BUSES or (self.cdrom and self.bus == "ide")
        if not bus_ok:
            raise ValidationError(
                f"{field}.bus", f"{self.bus!r} is not a disk bus", "use virtio, scsi or sata"
            )
        if self.cdrom and self.bus == "virtio":
            raise ValidationError(f"{field}.bus", "a cdrom cannot be on virtio", "use scsi or sata for cdrom")
        if self.bus == "sata" and self.read_only and not self.cdrom:
            raise ValidationError(
                f"{field}.readOnly",
                "QEMU cannot make a sata disk read-only",
                "use bus virtio or scsi, or cdrom: true",
            )
        if self.target and not TARGET_RE.fullmatch(self.target):
            raise ValidationError(
                f"{field}.target", f"{self.target!r} is not a disk target", "use e.g. vdb or sdc"
            )
        if self.serial and not re.fullmatch(r"[A-Za-z0-9_.-]{1,20}", self.serial):
            raise ValidationError(
                f"{field}.serial", f"{self.serial!r} is not a safe serial", "use [A-Za-z0-9_.-]{1,20}"
            )


@dataclasses.dataclass
class NicSpec:
    """A NIC backed by a macvtap char device node that QEMU receives as an open fd."""

    mac: str
    tap_device: Path
    model: str = "virtio-net-pci"

    def validate(self, field: str) -> None:
        self.mac = check_mac(f"{field}.mac", self.mac)
        self.tap_device = check_abs_path(f"{field}.tapDevice", self.tap_device)
        if self.model not in ("virtio-net-pci", "e1000"):
            raise ValidationError(f"{field}.model", f"{self.model!r} is not supported", "use virtio-net-pci")


@dataclasses.dataclass
class KernelBoot:
    """Direct kernel boot (QEMU -kernel/-initrd/-append)."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""

    def validate(self, field: str) -> None:
        self.kernel = check_abs_path(f"{field}.kernel", self.kernel)
        if self.initrd is not None:
            self.initrd = check_abs_path(f"{field}.initrd", self.initrd)
        if CONTROL_RE.search(self.cmdline) or len(self.cmdline) > 4096:
            raise ValidationError(
                f"{field}.cmdline",
                "has control characters or is over 4096 bytes",
                "use one line of printable text",
            )


@dataclasses.dataclass
class DomainSpec:
    """Everything :func:`.domain_xml.build_domain_xml` needs."""

    name: str
    uuid: str = ""
    vcpus: int = 1
    memory_mib: int = 256
    domain_type: str = "qemu"
    disks: list[DiskSpec] = dataclasses.field(default_factory=list)
    nics: list[NicSpec] = dataclasses.field(default_factory=list)
    console_log: Path | None = None
    kernel_boot: KernelBoot | None = None
    emulator: Path | None = None
    qemu_binary: Path = Path("/usr/bin/qemu-system-x86_64")
    scsi_controller: bool = True
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    #: TCG's translation cache in MiB (QEMU's ``-accel tcg,tb-size``); None: QEMU's default (1 GiB)
    tcg_tb_cache_mib: int | None = None

    def validate(self) -> None:
        check_name("name", self.name)
        if not self.uuid:
            self.uuid = str(uuidlib.uuid4())
        try:
            self.uuid = str(uuidlib.UUID(self.uuid))
        except ValueError:
            raise ValidationError(
                "uuid", f"{self.uuid!r} is not a UUID", "leave it empty to get a new one"
            ) from None
        if not isinstance(self.vcpus, int) or not 1 <= self.vcpus <= 64:
            raise ValidationError("cpu", f"{self.vcpus!r} vCPUs", "use a whole number from 1 to 64")
        if not isinstance(self.memory_mib, int) or not 16 <= self.memory_mib <= 1024 * 1024:
            raise ValidationError("memory", f"{self.memory_mib!r} MiB", "use at least 16Mi (e.g. 256Mi)")
        if self.domain_type not in DOMAIN_TYPES:
            raise ValidationError(
                "domainType", f"{self.domain_type!r}", "use 'kvm' or 'qemu' (from the probe)"
            )
        tb = self.tcg_tb_cache_mib
        if tb is not None and (isinstance(tb, bool) or not isinstance(tb, int) or not 1 <= tb <= 2048):
            raise ValidationError(
                "tcgTbCacheMiB",
                f"{tb!r}",
                "use a whole number of MiB from 1 to 2048, or none for QEMU's default",
            )
        for i, d in enumerate(self.disks):
            d.validate(f"disks[{i}]")
        names = [d.name for d in self.disks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValidationError(
                "disks", f"duplicate disk names {sorted(dup)}", "give every disk its own name"
            )
        for i, n in enumerate(self.nics):
            n.validate(f"networks[{i}]")
        macs = [n.mac for n in self.nics]
        if len(set(macs)) != len(macs):
            raise ValidationError("networks", "two NICs share a MAC", "give every NIC its own MAC")
        if self.console_log is not None:
            self.console_log = check_abs_path("consoleLog", self.console_log)
        if self.kernel_boot is not None:
            self.kernel_boot.validate("kernelBoot")
        if self.emulator is not None:
            self.emulator = check_abs_path("emulator", self.emulator)
        for k in self.metadata:
            if not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_-]{0,62}", k):
                raise ValidationError(f"metadata.{k}", "is not a valid key", "use [a-zA-Z][a-zA-Z0-9_-]*")
            if CONTROL_RE.search(self.metadata[k]):
                raise ValidationError(f"metadata.{k}", "has control characters", "use printable text")
        assign_targets(self.disks)


def target_prefix(bus: str) -> str:
    return {"virtio": "vd", "ide": "hd"}.get(bus, "sd")


def target_name(prefix: str, index: int) -> str:
    """vda..vdz, vdaa..vdzz (libvirt's naming)."""
    letters = ""
    i = index
    while True:
        letters = chr(ord("a") + i % 26) + letters
        i = i // 26 - 1
        if i < 0:
            return prefix + letters


def next_target(bus: str, used: set[str]) -> str:
    """The first free target for ``bus`` given the targets already in use."""
    prefix = target_prefix(bus)
    for i in range(26 * 27):
        t = target_name(prefix, i)
        if t not in used:
            return t
    raise ValidationError("bus", f"no free {prefix}* target left", "detach a disk first")


def assign_targets(disks: list[DiskSpec]) -> None:
    """Fill empty ``target`` fields; scsi and sata share the sd* names, as in libvirt."""
    used = {d.target for d in disks if d.target}
    for d in disks:
        if not d.target:
            d.target = next_target(d.bus, used)
            used.add(d.target)
    targets = [d.target for d in disks]
    if len(set(targets)) != len(targets):
        raise ValidationError(
            "disks", f"duplicate targets in {targets}", "leave target empty to get a free one"
        )
