"""Domain XML: structure, escaping of hostile names/paths, validation errors that name field and fix."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cri_shim.vm import DiskSpec, DomainSpec, KernelBoot, NicSpec, ValidationError
from cri_shim.vm.domain_xml import (
    AGENT_CHANNEL,
    METADATA_NS,
    QEMU_NS,
    VIRTIO_SERIAL_PORTS,
    build_domain_xml,
    disk_targets,
    disk_xml,
    read_metadata,
)
from cri_shim.vm.spec import assign_targets, next_target, target_name

Q = f"{{{QEMU_NS}}}"


def base_spec(**kw) -> DomainSpec:
    d = {
        "name": "web-vm",
        "uuid": "6f1f2c1e-0a58-4d3f-9f3c-2b0b7a3a9a10",
        "vcpus": 2,
        "memory_mib": 512,
        "domain_type": "qemu",
        "disks": [DiskSpec(name="root", path=Path("/var/lib/ev/root.qcow2"), boot_order=1)],
        "console_log": Path("/var/log/ev/console.log"),
    }
    d.update(kw)
    return DomainSpec(**d)


def test_basic_structure_tcg():
    root = ET.fromstring(build_domain_xml(base_spec()))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "web-vm"
    assert root.findtext("uuid") == "6f1f2c1e-0a58-4d3f-9f3c-2b0b7a3a9a10"
    assert root.findtext("vcpu") == "2"
    assert root.find("memory").get("unit") == "MiB" and root.findtext("memory") == "512"
    assert root.find("cpu") is None  # TCG: QEMU's default model
    disk = root.find("devices/disk")
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("boot").get("order") == "1"
    serial = root.find("devices/serial")
    assert serial.get("type") == "pty"
    assert serial.find("log").attrib == {"file": "/var/log/ev/console.log", "append": "on"}
    assert root.find("devices/emulator").text == "/usr/bin/qemu-system-x86_64"
    assert root.find(f"{Q}commandline") is None  # no NICs, no wrapper arguments


def test_kvm_uses_host_cpu():
    root = ET.fromstring(build_domain_xml(base_spec(domain_type="kvm")))
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"


def test_kernel_boot():
    kb = KernelBoot(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd.img"), cmdline="console=ttyS0 a=<b>&c")
    root = ET.fromstring(build_domain_xml(base_spec(kernel_boot=kb)))
    assert root.findtext("os/kernel") == "/k/vmlinuz"
    assert root.findtext("os/initrd") == "/k/initrd.img"
    assert root.findtext("os/cmdline") == "console=ttyS0 a=<b>&c"


def test_nic_goes_through_wrapper_with_fd_placeholder():
    nic = NicSpec(mac="02:AA:00:00:00:01", tap_device=Path("/run/edgevirt/macvtap/abc/eth0"))
    spec = base_spec(nics=[nic], emulator=Path("/var/lib/ev/bin/edgevirt-qemu"))
    root = ET.fromstring(build_domain_xml(spec))
    assert root.findtext("devices/emulator") == "/var/lib/ev/bin/edgevirt-qemu"
    assert root.find("devices/interface") is None
    args = [a.get("value") for a in root.findall(f"{Q}commandline/{Q}arg")]
    assert args[0:2] == ["-netdev", "tap,id=evnet0,fd=@EDGEVIRT_TAP_0_FD@,vhost=off"]
    assert args[2] == "-device"
    assert "mac=02:aa:00:00:00:01" in args[3] and "addr=0x1f" in args[3]
    env = {e.get("name"): e.get("value") for e in root.findall(f"{Q}commandline/{Q}env")}
    assert env == {
        "EDGEVIRT_QEMU": "/usr/bin/qemu-system-x86_64",
        "EDGEVIRT_TAP_0": "/run/edgevirt/macvtap/abc/eth0",
    }


def test_nic_without_wrapper_is_refused():
    nic = NicSpec(mac="02:00:00:00:00:01", tap_device=Path("/dev/tap5"))
    with pytest.raises(
        ValidationError, match=r"^emulator: NICs need the edgevirt QEMU wrapper; set emulator"
    ):
        build_domain_xml(base_spec(nics=[nic]))


HOSTILE = [
    "a'b\"c<d>&e",
    "]]><!--",
    "name with spaces & ümlauts",
    "x" * 200,
    "$(rm -rf ~);`id`",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_and_paths_round_trip(name):
    path = Path(f"/var/lib/ev/{name[:50]}<&>'\".qcow2")
    spec = base_spec(
        name=name,
        disks=[DiskSpec(name=name, path=path)],
        metadata={"uid": name, "note": "</edgevirt:vm><evil/>"},
        kernel_boot=KernelBoot(kernel=Path("/k/vmlinuz"), cmdline=name),
    )
    xml = build_domain_xml(spec)
    root = ET.fromstring(xml)  # well-formed
    assert root.findtext("name") == name
    assert root.find("devices/disk/source").get("file") == str(path)
    assert root.findtext("os/cmdline") == name
    assert read_metadata(xml) == {"note": "</edgevirt:vm><evil/>", "uid": name}
    assert root.find(".//evil") is None
    alias = root.find("devices/disk/alias").get("name")
    assert alias.startswith("ua-") and all(c.isalnum() or c in "_-" for c in alias)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_any_name_is_escaped_or_refused_by_field(name):
    try:
        xml = build_domain_xml(base_spec(name=name, metadata={"uid": name}))
    except ValidationError as e:
        assert e.field == "name"
        assert (
            "/" in name
            or any(ord(c) < 32 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in name)
            or ("\ufffe" in name or "\uffff" in name)
        )
        return
    root = ET.fromstring(xml)
    assert root.findtext("name") == name
    assert read_metadata(xml)["uid"] == name


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "a/b"}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"uuid": "nope"}, "uuid"),
        ({"vcpus": 0}, "cpu"),
        ({"vcpus": "2"}, "cpu"),
        ({"memory_mib": 8}, "memory"),
        ({"domain_type": "xen"}, "domainType"),
        ({"console_log": Path("relative.log")}, "consoleLog"),
        ({"console_log": Path("/var/../etc/shadow")}, "consoleLog"),
        ({"disks": [DiskSpec(name="d", path=Path("/a"), bus="ide")]}, "disks[0].bus"),
        ({"disks": [DiskSpec(name="d", path=Path("/a"), bus="usb")]}, "disks[0].bus"),
        ({"disks": [DiskSpec(name="d", path=Path("/a"), format="vmdk")]}, "disks[0].format"),
        ({"disks": [DiskSpec(name="d", path=Path("/a"), cdrom=True)]}, "disks[0].bus"),
        ({"disks": [DiskSpec(name="d", path=Path("/a"), bus="sata", read_only=True)]}, "disks[0].readOnly"),
        ({"disks": [DiskSpec(name="d", path=Path("/a"), serial="a b")]}, "disks[0].serial"),
        ({"disks": [DiskSpec(name="d", path=Path("/a")), DiskSpec(name="d", path=Path("/b"))]}, "disks"),
        ({"nics": [NicSpec(mac="zz:00:00:00:00:01", tap_device=Path("/dev/tap1"))]}, "networks[0].mac"),
        ({"nics": [NicSpec(mac="03:00:00:00:00:01", tap_device=Path("/dev/tap1"))]}, "networks[0].mac"),
        ({"nics": [NicSpec(mac="02:00:00:00:00:01", tap_device=Path("tap1"))]}, "networks[0].tapDevice"),
        ({"kernel_boot": KernelBoot(kernel=Path("vmlinuz"))}, "kernelBoot.kernel"),
        ({"metadata": {"bad key": "x"}}, "metadata.bad key"),
        ({"metadata": {"uid": "a\x01b"}}, "metadata.uid"),
        ({"kernel_boot": KernelBoot(kernel=Path("/k"), cmdline="a\x1bb")}, "kernelBoot.cmdline"),
    ],
)
def test_validation_names_field_and_fix(kw, field):
    with pytest.raises(ValidationError) as ei:
        build_domain_xml(base_spec(**kw))
    assert ei.value.field == field
    assert str(ei.value).startswith(f"{field}: ")
    assert ei.value.fix and "; " in str(ei.value)


def test_targets_per_bus_and_shared_sd_namespace():
    disks = [
        DiskSpec(name="root", path=Path("/a")),
        DiskSpec(name="s", path=Path("/b"), bus="scsi"),
        DiskSpec(name="t", path=Path("/c"), bus="sata"),
        DiskSpec(name="seed", path=Path("/d"), bus="sata", cdrom=True, format="raw"),
        DiskSpec(name="v", path=Path("/e")),
    ]
    assign_targets(disks)
    assert [d.target for d in disks] == ["vda", "sda", "sdb", "sdc", "vdb"]
    assert target_name("vd", 25) == "vdz" and target_name("vd", 26) == "vdaa"
    assert next_target("virtio", {"vda", "vdb"}) == "vdc"
    root = ET.fromstring(build_domain_xml(base_spec(disks=disks)))
    assert root.find("devices/controller[@type='scsi']").get("model") == "virtio-scsi"
    cd = root.find("devices/disk[@device='cdrom']")
    assert cd.find("readonly") is not None
    assert disk_targets(ET.tostring(root, encoding="unicode"))["sdc"] == "/d"


def test_hotplug_disk_xml():
    d = DiskSpec(name="data", path=Path("/x/empty-data.qcow2"), target="vdb", read_only=True)
    el = ET.fromstring(disk_xml(d))
    assert el.get("device") == "disk"
    assert el.find("target").get("dev") == "vdb"
    assert el.find("readonly") is not None
    assert el.find("alias").get("name") == "ua-data"


def test_metadata_namespace():
    xml = build_domain_xml(base_spec(metadata={"uid": "u1", "diskScope": "vm"}))
    assert METADATA_NS in xml
    assert read_metadata(xml) == {"uid": "u1", "diskScope": "vm"}
    assert read_metadata("<domain/>") == {}


@pytest.mark.parametrize("mac", ["02:00:00:00:00:01\n", "02:00:00:00:00:01\n\n", "\n02:00:00:00:00:01"])
def test_a_mac_with_a_newline_never_reaches_qemu(mac):
    # `$` matches before a trailing newline: "…\n" once passed the check and became part of the
    # -device argument
    from cri_shim.vm.spec import check_mac

    with pytest.raises(ValidationError, match=r"^networks\[0\]\.mac: .* is not a MAC address"):
        check_mac("networks[0].mac", mac)
    spec = DomainSpec(name="vm", nics=[NicSpec(mac=mac, tap_device=Path("/run/tap"))], emulator=Path("/e"))
    with pytest.raises(ValidationError, match=r"is not a MAC address"):
        build_domain_xml(spec)
    assert check_mac("f", "02:00:00:00:00:0A") == "02:00:00:00:00:0a"


def test_every_domain_has_the_guest_agent_channel_on_a_virtio_serial_controller():
    root = ET.fromstring(build_domain_xml(base_spec()))
    ctrl = root.findall("devices/controller[@type='virtio-serial']")
    assert [(c.get("index"), c.get("ports")) for c in ctrl] == [("0", str(VIRTIO_SERIAL_PORTS))]
    (agent,) = root.findall("devices/channel")
    assert agent.get("type") == "unix"
    assert agent.find("source").attrib == {"mode": "bind"}  # libvirt picks the socket's path
    assert agent.find("target").attrib == {"type": "virtio", "name": AGENT_CHANNEL}


def test_tcg_translation_cache_is_sized_only_under_tcg_and_bounded():
    root = ET.fromstring(build_domain_xml(base_spec(tcg_tb_cache_mib=32)))
    assert root.find("features/tcg/tb-cache").attrib == {"unit": "MiB"}
    assert root.findtext("features/tcg/tb-cache") == "32"
    assert ET.fromstring(build_domain_xml(base_spec())).find("features/tcg") is None  # QEMU's default
    kvm = ET.fromstring(build_domain_xml(base_spec(domain_type="kvm", tcg_tb_cache_mib=32)))
    assert kvm.find("features/tcg") is None
    for bad in (0, 4096, "32", True):
        with pytest.raises(ValidationError, match=r"tcgTbCacheMiB.*from 1 to 2048"):
            build_domain_xml(base_spec(tcg_tb_cache_mib=bad))
