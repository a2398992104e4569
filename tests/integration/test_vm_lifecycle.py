"""The VM layer against a real libvirtd + QEMU (TCG here): boot from disk, console log in CRI format,
stats, pause/resume, disk hotplug seen by the guest, ACPI shutdown, destroy-after-timeout, overlays
kept across stop/start, disks per namespace (the same VM UID in two namespaces boots two sets of
disks; a hostDisk of another namespace is refused at boot and at hot-plug), and a start that fails
halfway leaving nothing behind.

The guest is deploy/images/build_guest.py's busybox initramfs; it prints ``EDGEVIRT-GUEST:`` lines
on the serial console (``up``, ``blocks ...``, ``block+ vdb <sectors>``, ``block- vdb``,
``acpi power button``).
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
from helpers.vm_env import console_size, leftovers, wait_console

from cri_shim.vm import (
    ConsoleLogConverter,
    DomainExists,
    DomainNotFound,
    HostDisk,
    ImageStore,
    KernelBoot,
    NicSpec,
    ValidationError,
    VMError,
    VMSpec,
    VolumeSpec,
)
from cri_shim.vm.hotplug import find_disk
from cri_shim.vm.oci import Manifest, extract_disk_from_oci_layout

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]
CRI_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z stdout [PF] .*$")


class LayoutSource:
    """The containerDisk source of these tests: the test disk's OCI layout answers any registry
    reference (the image store's containerDisk path without a registry; skopeo is
    tests/integration/test_vm_image_fetch.py's)."""

    def __init__(self, disk) -> None:
        self.disk = disk

    def inspect(self, ref, timeout):
        return Manifest(self.disk.manifest_digest, 0)

    def fetch_disk(self, ref, dest, max_bytes, timeout):
        extract_disk_from_oci_layout(self.disk.oci_layout, dest, tag=self.disk.tag, max_bytes=max_bytes)


def test_disk_boot_console_stats_pause_hotplug_acpi(vm_env, vm_disk, tmp_path):
    mgr = vm_env.manager
    name = vm_env.name("disk")
    console = tmp_path / "console.log"
    # the image is the OCI containerDisk (disk under /disk/), taken from its layers
    mgr.images = ImageStore(vm_env.state_dir, container_disks=LayoutSource(vm_disk))
    spec = VMSpec(
        name=name,
        uid="uid-disk-1",
        memory_mib=256,
        image="registry.test/vm/test-disk:1",
        console_log=console,
        namespace="team-a",
    )
    t0 = time.monotonic()
    uuid = mgr.create(spec)
    assert mgr.state(name).phase == "running"
    # boots from the disk: SYSLINUX from the disk's MBR/VBR, then the guest's init
    text = wait_console(console, "EDGEVIRT-GUEST: blocks")
    boot_s = time.monotonic() - t0
    assert "SYSLINUX" in text, text[-1000:]
    assert "EDGEVIRT-GUEST: blocks vda" in text
    print(f"boot from disk to init markers: {boot_s:.1f}s wall")

    facts = mgr.facts(name)
    assert facts["uuid"] == uuid
    assert facts["console"].startswith("/dev/pts/")
    assert facts["accel"] in ("tcg", "kvm")
    assert facts["disks"]["vda"].endswith("/root.qcow2")

    # console -> CRI log format
    cri = tmp_path / "cri.log"
    conv = ConsoleLogConverter(console, cri, state_file=tmp_path / "cri.state")
    assert conv.pump() > 0
    lines = cri.read_text().splitlines()
    assert all(CRI_LINE.match(line) for line in lines), [x for x in lines if not CRI_LINE.match(x)][:3]
    assert any(line.endswith(" stdout F EDGEVIRT-GUEST: up") for line in lines), lines[-5:]
    assert not any("\x1b" in line for line in lines)

    # stats
    st1 = mgr.stats(name)
    assert st1.cpu_time_ns > 0
    assert st1.memory_rss_kib > 0
    assert st1.memory_actual_kib == 256 * 1024

    # pause / resume
    mgr.suspend(name)
    assert (mgr.state(name).phase, mgr.state(name).reason) == ("paused", "user")
    mgr.suspend(name)  # idempotent
    mgr.resume(name)
    assert (mgr.state(name).phase, mgr.state(name).reason) == ("running", "unpaused")

    # hotplug a 64Mi emptyDisk: the guest sees vdb with 131072 sectors; detach removes it
    mark = console_size(console)
    target = mgr.attach_volume(name, VolumeSpec(name="data", empty_disk="64Mi"))
    assert target == "vdb"
    assert mgr.attach_volume(name, VolumeSpec(name="data", empty_disk="64Mi")) == "vdb"  # idempotent
    wait_console(console, "EDGEVIRT-GUEST: block+ vdb 131072", after=mark)
    assert "vdb" in mgr.facts(name)["disks"]
    mark = console_size(console)
    assert mgr.detach_volume(name, "data") is True
    wait_console(console, "EDGEVIRT-GUEST: block- vdb", after=mark)
    assert "vdb" not in mgr.facts(name)["disks"]
    assert mgr.detach_volume(name, "data") is False  # idempotent

    # scsi hotplug (libvirt adds the virtio-scsi controller as needed)
    mark = console_size(console)
    scsi = VolumeSpec(name="scsidata", empty_disk="32Mi", bus="scsi")
    assert mgr.attach_volume(name, scsi, persist=True) == "sda"
    wait_console(console, "EDGEVIRT-GUEST: block+ sda 65536", after=mark)
    assert "sda" in mgr.facts(name)["disks"]
    assert 'dev="sda"' in mgr.xml(name, inactive=True).replace("'", '"')  # persisted
    mark = console_size(console)
    assert mgr.detach_volume(name, "scsidata") is True
    wait_console(console, "EDGEVIRT-GUEST: block- sda", after=mark)
    assert "sda" not in mgr.facts(name)["disks"]
    assert 'dev="sda"' not in mgr.xml(name, inactive=True).replace("'", '"')
    # a detach killed halfway (unplugged live, still in the definition): attaching it again works
    mark = console_size(console)
    assert mgr.attach_volume(name, scsi, persist=True) == "sda"
    wait_console(console, "EDGEVIRT-GUEST: block+ sda 65536", after=mark)
    dom = mgr._conn.lookup(name)
    live = ET.tostring(find_disk(dom.XMLDesc(0), "scsidata"), encoding="unicode")
    mark = console_size(console)
    dom.detachDeviceFlags(live, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    wait_console(console, "EDGEVIRT-GUEST: block- sda", after=mark)
    assert 'dev="sda"' in mgr.xml(name, inactive=True).replace("'", '"')  # the leftover
    mark = console_size(console)
    assert mgr.attach_volume(name, scsi, persist=True) == "sda"
    wait_console(console, "EDGEVIRT-GUEST: block+ sda 65536", after=mark)
    assert mgr.xml(name, inactive=True).count("ua-scsidata") == 1
    assert mgr.detach_volume(name, "scsidata") is True
    with pytest.raises(ValidationError, match=r"volume.bus: 'sata' cannot be hot-plugged"):
        mgr.attach_volume(name, VolumeSpec(name="x", empty_disk="1Mi", bus="sata"))

    # ACPI shutdown: the guest handles the power button and powers off
    mark = console_size(console)
    assert mgr.shutdown(name, timeout=60) == "shutdown"
    wait_console(console, "EDGEVIRT-GUEST: acpi power button", after=mark, timeout=5)
    st = mgr.state(name)
    assert (st.phase, st.reason, st.exit_code) == ("shutoff", "shutdown", 0)
    assert mgr.shutdown(name) == "not-running"

    # the converter flushes the rest, then everything goes away
    conv.pump(final=True)
    assert "acpi power button" in cri.read_text()
    overlay = Path(facts["disks"]["vda"])
    assert overlay.exists()
    assert mgr.remove(name, delete_disks=True) is True
    assert mgr.remove(name) is False
    with pytest.raises(DomainNotFound):
        mgr.state(name)
    assert not overlay.exists()
    assert leftovers(vm_env) == {"domains": [], "files": []}


def test_destroy_after_shutdown_timeout(vm_env, test_guest, tmp_path):
    """A guest that does not (yet) handle the power button is destroyed after the timeout."""
    mgr = vm_env.manager
    name = vm_env.name("kill")
    spec = VMSpec(
        name=name,
        uid="uid-kill",
        kernel_boot=KernelBoot(kernel=test_guest.kernel, initrd=test_guest.initrd, cmdline="console=ttyS0"),
        console_log=tmp_path / "console.log",
        disk_scope="pod",
    )
    mgr.create(spec)
    t0 = time.monotonic()
    # right after start the guest is still in firmware/kernel: no button handler yet
    assert mgr.shutdown(name, timeout=1.5) == "destroyed"
    assert time.monotonic() - t0 < 10
    st = mgr.state(name)
    assert (st.phase, st.reason, st.exit_code) == ("shutoff", "destroyed", 137)
    mgr.start(name, paused=True)
    assert mgr.state(name).phase == "paused"
    mgr.destroy(name)
    assert mgr.remove(name) is True
    assert leftovers(vm_env) == {"domains": [], "files": []}


def test_failure_halfway_leaves_nothing(vm_env, vm_disk, tmp_path):
    """Start fails in QEMU (tap device missing): domain, overlay, seed ISO and run dir are gone."""
    mgr = vm_env.manager
    name = vm_env.name("fail")
    missing = tmp_path / "no-such-tap"
    spec = VMSpec(
        name=name,
        uid="uid-fail",
        image=f"file://{vm_disk.qcow2}",
        nics=[NicSpec(mac="02:00:00:00:00:09", tap_device=missing)],
        cni_result={"ips": [{"address": "10.99.0.5/24", "gateway": "10.99.0.1"}]},
        volumes=[VolumeSpec(name="data", empty_disk="16Mi")],
        console_log=tmp_path / "console.log",
    )
    with pytest.raises(VMError, match=r"cannot open tap device .*no-such-tap"):
        mgr.create(spec)
    assert leftovers(vm_env) == {"domains": [], "files": []}
    # bad input is refused before anything is made
    spec.nics = []
    spec.image = "file:///etc/passwd"
    with pytest.raises(ValidationError, match=r"^image: .* outside the node's image roots"):
        mgr.create(spec)
    spec.image = f"file://{vm_disk.qcow2}"
    # fails after the overlay, the run dir and the first volume were made: all undone
    spec.volumes = [
        VolumeSpec(name="data", empty_disk="16Mi"),
        VolumeSpec(name="host", host_disk=HostDisk(path="/etc/passwd", type="Disk")),
    ]
    with pytest.raises(ValidationError, match=r"^volumes\[host\].hostDisk"):
        mgr.create(spec)
    assert leftovers(vm_env) == {"domains": [], "files": []}
    spec.volumes = [VolumeSpec(name="data", empty_disk="lots")]
    with pytest.raises(ValidationError, match=r"volumes\[data\].emptyDisk.capacity: 'lots' is not a size"):
        mgr.create(spec)
    assert leftovers(vm_env) == {"domains": [], "files": []}


def test_overlay_kept_across_stop_start_and_pod_scope(vm_env, vm_disk, tmp_path):
    mgr = vm_env.manager
    name = vm_env.name("keep")
    spec = VMSpec(name=name, uid="uid-keep", image=f"file://{vm_disk.qcow2}", console_log=tmp_path / "c.log")
    mgr.create(spec, start=False)
    assert mgr.state(name).phase == "shutoff"
    overlay = Path(mgr.facts(name)["disks"]["vda"])
    ino = overlay.stat().st_ino
    mgr.remove(name)  # "stop": the VM's disk stays
    assert overlay.stat().st_ino == ino
    mgr.create(spec, start=False)  # "start" again: same disk
    assert Path(mgr.facts(name)["disks"]["vda"]) == overlay
    assert overlay.stat().st_ino == ino
    # a second VM may not take this one's name or uuid, and its failed attempt touches nothing of it
    with pytest.raises(DomainExists, match=r"^name: a domain named .* exists; remove it first"):
        mgr.create(spec, start=False)
    uuid = mgr.facts(name)["uuid"]
    twin = VMSpec(name=vm_env.name("twin"), uid="uid-twin", uuid=uuid, image=spec.image)
    with pytest.raises(DomainExists, match=r"^uuid: domain .* already has uuid"):
        mgr.create(twin, start=False)
    assert mgr.run_dir(uuid).is_dir() and overlay.exists()
    mgr.remove(name, delete_disks=True)
    assert not overlay.exists()
    # pod-scoped disks go with the pod
    pod = VMSpec(
        name=name,
        uid="uid-pod",
        image=f"file://{vm_disk.qcow2}",
        disk_scope="pod",
        console_log=tmp_path / "d.log",
    )
    mgr.create(pod, start=False)
    pod_overlay = Path(mgr.facts(name)["disks"]["vda"])
    assert pod_overlay.exists()
    mgr.remove(name)
    assert not pod_overlay.exists()
    assert leftovers(vm_env) == {"domains": [], "files": []}


def test_define_time_volumes_seed_and_buses(vm_env, vm_disk, tmp_path):
    """Every disk kind on every bus at define time; QEMU really opens them (paused start)."""
    from cri_shim.vm import CloudInit, HostDisk
    from cri_shim.vm.disks import DiskManager
    from cri_shim.vm.sizes import DiskLimits

    mgr = vm_env.manager
    hostroot = tmp_path / "hostdisks"
    (hostroot / "team-b").mkdir(parents=True)
    mgr.disks = DiskManager(vm_env.state_dir, host_disk_roots=[hostroot], limits=DiskLimits(min_free_bytes=0))
    name = vm_env.name("vols")
    spec = VMSpec(
        name=name,
        uid="uid-vols",
        namespace="team-a",
        image=f"file://{vm_disk.qcow2}",
        cloud_init=CloudInit(instance_id="uid-vols", hostname="vols", user_data="#cloud-config\n{}\n"),
        cni_result={"ips": [{"address": "10.66.0.5/24", "gateway": "10.66.0.1"}]},
        nics=[],
        volumes=[
            VolumeSpec(name="fast", empty_disk="8Mi"),
            VolumeSpec(name="scsi", empty_disk="8Mi", bus="scsi", format="raw", read_only=True),
            VolumeSpec(name="sata", empty_disk="8Mi", bus="sata"),
            VolumeSpec(
                name="host",
                host_disk=HostDisk(path="h.img", type="DiskOrCreate", capacity="4Mi"),
            ),
            VolumeSpec(name="cd", image=f"file://{vm_disk.qcow2}", cdrom=True, bus="sata"),
        ],
        console_log=tmp_path / "console.log",
    )
    mgr.create(spec, paused=True)
    assert mgr.state(name).phase == "paused"
    disks = mgr.facts(name)["disks"]
    assert set(disks) == {"vda", "vdb", "vdc", "sda", "sdb", "sdc", "sdd"}, disks
    assert disks["vdc"] == f"{hostroot}/team-a/h.img"
    assert disks["sdd"].endswith("/seed.iso")
    xml = mgr.xml(name)
    assert xml.count("<readonly />") + xml.count("<readonly/>") == 3  # scsi ro, cdrom, seed
    assert mgr.metadata(name)["namespace"] == "team-a"
    seed = Path(disks["sdd"])
    assert oct(seed.stat().st_mode & 0o777) == "0o600" and oct(seed.parent.stat().st_mode & 0o777) == "0o700"
    # hot-plug takes the namespace from the domain: another namespace's hostDisk is refused there too
    other = HostDisk(path="../team-b/x.img", type="DiskOrCreate", capacity="1Mi")
    with pytest.raises(ValidationError, match=r"is not a clean path"):
        mgr.attach_volume(name, VolumeSpec(name="other", host_disk=other))
    assert not (hostroot / "team-b" / "x.img").exists()
    mgr.remove(name, delete_disks=True)
    assert (hostroot / "team-a" / "h.img").exists()  # hostDisk belongs to the host, not to the VM
    assert leftovers(vm_env) == {"domains": [], "files": []}


def test_disks_belong_to_a_namespace_and_node_mode_finds_and_removes_them(vm_env, vm_disk, tmp_path):
    """Finding 1 on real domains: the same VM UID in two namespaces boots two root disks; a
    namespace's pod disks outlive the domain (they are the pod's); node mode finds the VM's domain
    by (namespace, uid) and removes the deleted VM with its disks."""
    mgr = vm_env.manager
    image = f"file://{vm_disk.qcow2}"
    a, b = vm_env.name("ns-a"), vm_env.name("ns-b")
    mgr.create(VMSpec(name=a, uid="uid-shared", image=image, namespace="team-a"), start=False)
    mgr.create(VMSpec(name=b, uid="uid-shared", image=image, namespace="team-b"), start=False)
    root_a, root_b = Path(mgr.facts(a)["disks"]["vda"]), Path(mgr.facts(b)["disks"]["vda"])
    assert root_a != root_b
    assert root_a == vm_env.state_dir / "disks/ns/team-a/vm/uid-shared/root.qcow2"
    assert mgr.vm_domains("team-a", "uid-shared") == [a] and mgr.vm_domains("team-b", "uid-shared") == [b]
    mgr.remove_vm("team-b", "uid-shared")
    assert not mgr.exists(b) and not root_b.exists() and mgr.exists(a) and root_a.exists()
    mgr.remove_vm("team-b", "uid-shared")  # idempotent
    mgr.remove_vm("team-a", "uid-shared")
    # a plain pod's disks of a namespace go with the pod, not with its domain
    pod = vm_env.name("pod")
    mgr.create(
        VMSpec(name=pod, uid="pod-uid", image=image, namespace="team-a", disk_scope="pod"), start=False
    )
    pod_root = Path(mgr.facts(pod)["disks"]["vda"])
    mgr.remove(pod)
    assert pod_root.exists()
    mgr.create(
        VMSpec(name=pod, uid="pod-uid", image=image, namespace="team-a", disk_scope="pod"), start=False
    )
    assert Path(mgr.facts(pod)["disks"]["vda"]) == pod_root  # a new container of the pod: same disk
    mgr.remove(pod)
    mgr.remove_pod_disks("team-a", "pod-uid")
    assert not pod_root.exists()
    assert leftovers(vm_env) == {"domains": [], "files": []}
