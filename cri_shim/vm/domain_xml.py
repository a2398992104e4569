"""Render a :class:`.spec.DomainSpec` as libvirt domain XML (ElementTree; the library escapes).

Choices worth knowing:

* ``type`` is ``kvm`` or ``qemu`` exactly as the node probe decided; with ``kvm`` the CPU is
  ``host-passthrough``, with TCG QEMU's default model.
* The serial console is a ``pty`` (so ``virsh console`` / ``kubectl vm console`` can attach) whose
  output is also written by virtlogd to ``console_log`` (``<log file=... append='on'/>``): raw bytes,
  rotated by virtlogd, surviving libvirtd restarts. :mod:`.console_log` turns it into CRI log lines.
* NICs are not libvirt ``<interface>`` elements: libvirt would look the macvtap up in *its* netns.
  Instead ``<emulator>`` is the edgevirt wrapper (:mod:`.tapwrap`), ``<qemu:env>`` tells it which
  tap device node to open for ``EDGEVIRT_TAP_<n>``, and ``<qemu:commandline>`` adds
  ``-netdev tap,fd=@EDGEVIRT_TAP_<n>_FD@`` whose placeholder the wrapper replaces by the fd it opened.
  The NIC sits at a fixed PCI slot from :data:`NIC_SLOT_BASE` downward so it never collides with the
  slots libvirt hands out (from the bottom up) for disks, including hotplugged ones.
* Edgevirt bookkeeping (VM uid, files this layer created) lives in ``<metadata>`` under
  :data:`METADATA_NS`, so cleanup works after a restart of the process that created the domain.
* Every VM has a virtio-serial controller with :data:`VIRTIO_SERIAL_PORTS` ports and the QEMU guest
  agent's channel (``org.qemu.guest_agent.0``, a unix socket whose path libvirt chooses and to which
  libvirt itself connects): exec, exec probes and port-forward go through the guest agent, and
  exec and port-forward sessions hot-plug channels of their own on that controller (:mod:`.channels`).
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET

from .errors import ValidationError
from .spec import DiskSpec, DomainSpec

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
METADATA_NS = "https://edgevirt.io/xmlns/vm/v1"
NIC_SLOT_BASE = 0x1F
TAP_ENV = "EDGEVIRT_TAP_{index}"
TAP_FD_PLACEHOLDER = "@EDGEVIRT_TAP_{index}_FD@"
REAL_QEMU_ENV = "EDGEVIRT_QEMU"
#: the name of the QEMU guest agent's virtio-serial port (what qemu-ga and libvirt look for)
AGENT_CHANNEL = "org.qemu.guest_agent.0"
#: ports of the virtio-serial controller: the agent's, plus the channels exec and port-forward
#: sessions hot-plug (QEMU's default of 31 would allow ~10 sessions at once; each port costs the
#: guest two small virtqueues)
VIRTIO_SERIAL_PORTS = 64

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("edgevirt", METADATA_NS)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def disk_element(disk: DiskSpec) -> ET.Element:
    """The ``<disk>`` element of one disk (used for define and for hotplug)."""
    el = ET.Element("disk", {"type": "file", "device": "cdrom" if disk.cdrom else "disk"})
    drv = {"name": "qemu", "type": disk.format}
    if not disk.cdrom:
        drv["discard"] = "unmap"
    _sub(el, "driver", **drv)
    _sub(el, "source", file=str(disk.path))
    _sub(el, "target", dev=disk.target, bus=disk.bus)
    if disk.read_only or disk.cdrom:
        _sub(el, "readonly")
    if disk.boot_order is not None:
        _sub(el, "boot", order=str(disk.boot_order))
    if disk.serial:
        _sub(el, "serial", disk.serial)
    _sub(el, "alias", name=user_alias(disk.name))
    return el


#: libvirt's prefix of user-chosen device aliases; every disk edgevirt makes carries one
USER_ALIAS_PREFIX = "ua-"
#: disks the VM layer adds itself: never user volumes (not reported, never unplugged)
RESERVED_DISK_NAMES = ("root", "cidata")


def user_alias(name: str) -> str:
    """The libvirt user alias of disk ``name`` (``ua-`` + [A-Za-z0-9_-]): unsafe characters become
    '_' plus a hash, so any name gives a valid, distinct alias."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in name)
    if safe != name:
        safe = f"{safe[:40]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return USER_ALIAS_PREFIX + safe


def attached_volumes(xml: str) -> dict[str, str]:
    """Volume name -> guest target of the user volumes in a (live) domain XML: disks whose alias is
    a user alias, without the reserved disks (boot disk, NoCloud seed)."""
    out = {}
    for d in ET.fromstring(xml).iterfind("devices/disk"):
        a, t = d.find("alias"), d.find("target")
        alias = (a.get("name") or "") if a is not None else ""
        name = alias[len(USER_ALIAS_PREFIX) :] if alias.startswith(USER_ALIAS_PREFIX) else ""
        if name and name not in RESERVED_DISK_NAMES:
            out[name] = t.get("dev", "") if t is not None else ""
    return out


def disk_xml(disk: DiskSpec) -> str:
    return ET.tostring(disk_element(disk), encoding="unicode")


def build_domain(spec: DomainSpec) -> ET.Element:
    """The ``<domain>`` element. ``spec`` must have been validated."""
    dom = ET.Element("domain", {"type": spec.domain_type})
    _sub(dom, "name", spec.name)
    _sub(dom, "uuid", spec.uuid)
    md = _sub(dom, "metadata")
    ev = ET.SubElement(md, f"{{{METADATA_NS}}}vm")
    for k, v in sorted(spec.metadata.items()):
        ET.SubElement(ev, f"{{{METADATA_NS}}}{k}").text = v
    _sub(dom, "memory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "currentMemory", str(spec.memory_mib), unit="MiB")
    _sub(dom, "vcpu", str(spec.vcpus), placement="static")
    os_el = _sub(dom, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine="pc")
    if spec.kernel_boot is not None:
        _sub(os_el, "kernel", str(spec.kernel_boot.kernel))
        if spec.kernel_boot.initrd is not None:
            _sub(os_el, "initrd", str(spec.kernel_boot.initrd))
        if spec.kernel_boot.cmdline:
            _sub(os_el, "cmdline", spec.kernel_boot.cmdline)
    feats = _sub(dom, "features")
    _sub(feats, "acpi")
    _sub(feats, "apic")
    if spec.domain_type == "qemu" and spec.tcg_tb_cache_mib:
        # TCG's translation cache: QEMU's default reserves 1 GiB and keeps what it filled resident
        tcg = _sub(feats, "tcg")
        _sub(tcg, "tb-cache", str(spec.tcg_tb_cache_mib), unit="MiB")
    if spec.domain_type == "kvm":
        _sub(dom, "cpu", mode="host-passthrough", check="none", migratable="off")
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")
    devs = _sub(dom, "devices")
    _sub(devs, "emulator", str(spec.emulator or spec.qemu_binary))
    for d in spec.disks:
        devs.append(disk_element(d))
    if spec.scsi_controller or any(d.bus == "scsi" for d in spec.disks):
        # defined up front so scsi volumes can be hot-plugged onto it (a controller hot-plugged
        # together with the first disk is not scanned by the guest)
        _sub(devs, "controller", type="scsi", index="0", model="virtio-scsi")
    serial = _sub(devs, "serial", type="pty")
    if spec.console_log is not None:
        _sub(serial, "log", file=str(spec.console_log), append="on")
    _sub(serial, "target", port="0")
    con = _sub(devs, "console", type="pty")
    _sub(con, "target", type="serial", port="0")
    _sub(devs, "controller", type="virtio-serial", index="0", ports=str(VIRTIO_SERIAL_PORTS))
    devs.append(channel_element(AGENT_CHANNEL))
    bal = _sub(devs, "memballoon", model="virtio")
    _sub(bal, "stats", period="5")
    _sub(devs, "rng", model="virtio").append(_backend_random())
    if spec.nics:
        _add_nics(dom, spec)
    return dom


def channel_element(port_name: str) -> ET.Element:
    """A virtio-serial ``<channel>`` named ``port_name`` whose host side is a unix socket QEMU
    listens on, at a path libvirt chooses (under its per-domain channel folder)."""
    ch = ET.Element("channel", {"type": "unix"})
    _sub(ch, "source", mode="bind")
    _sub(ch, "target", type="virtio", name=port_name)
    return ch


def _backend_random() -> ET.Element:
    b = ET.Element("backend", {"model": "random"})
    b.text = "/dev/urandom"
    return b


def _add_nics(dom: ET.Element, spec: DomainSpec) -> None:
    cl = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    args: list[str] = []
    for i, nic in enumerate(spec.nics):
        fd = TAP_FD_PLACEHOLDER.format(index=i)
        args += ["-netdev", f"tap,id=evnet{i},fd={fd},vhost=off"]
        args += [
            "-device",
            f"{nic.model},netdev=evnet{i},id=evnic{i},mac={nic.mac},bus=pci.0,addr={NIC_SLOT_BASE - i:#x}",
        ]
    for a in args:
        ET.SubElement(cl, f"{{{QEMU_NS}}}arg", {"value": a})
    ET.SubElement(cl, f"{{{QEMU_NS}}}env", {"name": REAL_QEMU_ENV, "value": str(spec.qemu_binary)})
    for i, nic in enumerate(spec.nics):
        ET.SubElement(
            cl, f"{{{QEMU_NS}}}env", {"name": TAP_ENV.format(index=i), "value": str(nic.tap_device)}
        )


def build_domain_xml(spec: DomainSpec) -> str:
    """Validate ``spec`` and return the domain XML text."""
    spec.validate()
    if spec.nics and spec.emulator is None:
        raise ValidationError(
            "emulator", "NICs need the edgevirt QEMU wrapper", "set emulator to tapwrap.install_wrapper()"
        )
    el = build_domain(spec)
    ET.indent(el)
    return ET.tostring(el, encoding="unicode")


def read_metadata(xml: str) -> dict[str, str]:
    """The edgevirt metadata of a domain XML (empty if none)."""
    root = ET.fromstring(xml)
    ev = root.find(f"metadata/{{{METADATA_NS}}}vm")
    if ev is None:
        return {}
    return {child.tag.split("}", 1)[1]: child.text or "" for child in ev}


def disk_targets(xml: str) -> dict[str, str]:
    """Map target dev -> source file of every file disk in a domain XML."""
    root = ET.fromstring(xml)
    out = {}
    for d in root.iterfind("devices/disk"):
        t = d.find("target")
        s = d.find("source")
        if t is not None:
            out[t.get("dev", "")] = s.get("file", "") if s is not None else ""
    return out
