"""Hot-plug and hot-unplug of data volumes on a running domain (the controller's node mode).

A volume's writable disk belongs to the owner the domain's metadata records (namespace, VM or pod,
key): the same as at boot, and a hostDisk must lie in that namespace's folder.

A volume's disk carries the user alias of its name (:func:`.domain_xml.user_alias`), so it is found
again by name in the live and the persistent definition: attach is idempotent per volume name,
detach reports False for a volume that is not attached. The caller (:class:`.lifecycle.DomainManager`)
holds the domain's lock and validated the volume.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import libvirt

from . import domain_xml
from .build import Undo, owner_from_metadata, run_undo, volume_disk
from .disks import DiskManager
from .errors import VMError
from .images import ImageStore
from .model import VolumeSpec
from .spec import next_target


def find_disk(xml: str, volume_name: str) -> ET.Element | None:
    """The ``<disk>`` of volume ``volume_name`` in a domain XML, if any."""
    alias = domain_xml.user_alias(volume_name)
    for d in ET.fromstring(xml).iterfind("devices/disk"):
        a = d.find("alias")
        if a is not None and a.get("name") == alias:
            return d
    return None


def attach_volume(
    name: str,
    dom: libvirt.virDomain,
    volume: VolumeSpec,
    persist: bool,
    images: ImageStore,
    disks: DiskManager,
) -> str:
    """Make the volume's disk and hot-plug it into domain ``name`` (``dom``); returns the guest
    target (e.g. ``vdb``)."""
    if not dom.isActive():
        raise VMError(f"domain {name!r} is not running: cannot hot-plug {volume.name!r}")
    live = dom.XMLDesc(0)
    existing = find_disk(live, volume.name)
    if existing is not None:
        target = existing.find("target")
        return target.get("dev", "") if target is not None else ""
    if persist:
        _drop_stale_definition(name, dom, volume.name)
    owner = owner_from_metadata(domain_xml.read_metadata(live), name)
    undo: Undo = []
    disk = volume_disk(volume, "volume", owner, images, disks, undo)
    disk.target = next_target(disk.bus, set(domain_xml.disk_targets(live)))
    disk.validate("volume")
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if persist else 0)
    try:
        dom.attachDeviceFlags(domain_xml.disk_xml(disk), flags)
    except libvirt.libvirtError as e:
        run_undo(undo)
        raise VMError(f"hot-plug of {volume.name!r} into {name!r} failed: {e}") from None
    return disk.target


def _drop_stale_definition(name: str, dom: libvirt.virDomain, volume_name: str) -> None:
    """A detach that ended halfway (the process killed between the live unplug and the persistent
    definition's) leaves the volume in the definition only; attaching it with AFFECT_CONFIG again
    would fail on its alias ("non unique alias detected"), so that leftover goes first."""
    stale = find_disk(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), volume_name)
    if stale is None:
        return
    try:
        dom.detachDeviceFlags(ET.tostring(stale, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    except libvirt.libvirtError as e:
        raise VMError(
            f"removing the leftover {volume_name!r} from the definition of {name!r} failed: {e}"
        ) from None


def detach_volume(name: str, dom: libvirt.virDomain, volume_name: str, timeout: float) -> bool:
    """Hot-unplug a volume from domain ``name`` (``dom``) and wait until the guest released it; also
    drop it from the persistent definition when it is there. False if it was not attached."""
    disk = find_disk(dom.XMLDesc(0), volume_name)
    if disk is None:
        return False
    cfg = find_disk(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), volume_name)
    try:
        dom.detachDeviceFlags(ET.tostring(disk, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        raise VMError(f"hot-unplug of {volume_name!r} from {name!r} failed: {e}") from None
    deadline = time.monotonic() + timeout
    while find_disk(dom.XMLDesc(0), volume_name) is not None:
        if time.monotonic() > deadline:
            raise VMError(f"the guest in {name!r} did not release {volume_name!r} within {timeout:.0f}s")
        time.sleep(0.2)
    if cfg is not None:
        # a separate call: libvirt 9.0 left the persistent definition alone when LIVE|CONFIG
        # were given together and the guest acknowledged the unplug asynchronously
        try:
            dom.detachDeviceFlags(ET.tostring(cfg, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as e:
            raise VMError(f"removing {volume_name!r} from the definition of {name!r} failed: {e}") from None
    return True
