"""Node mode's pure parts: which volumes to hot-plug/unplug, the volume status after a round,
reading a live domain XML, VM layer specs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cri_shim.kvm.contract import to_volume_spec
from cri_shim.vm import attached_volumes
from vmcrd.node import hotplug_plan, volume_status

names = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)


def vol(name: str, hot: bool = True) -> dict:
    return {"name": name, "hotpluggable": hot, "emptyDisk": {"capacity": "64Mi"}}


@given(
    st.dictionaries(names, st.booleans(), max_size=6),
    st.sets(names, max_size=6),
    st.sets(names, max_size=6),
)
def test_plan_attaches_missing_hotpluggables_and_detaches_only_unpluggable_leftovers(
    spec_m, boot, attached_s
):
    """``boot``: the user disks of the domain's persistent definition (what it booted with: the
    kvm handler defines the non-hotpluggable volumes, hot-plugs are live only)."""
    spec = [vol(n, h) for n, h in spec_m.items()]
    attached = {n: "vdx" for n in attached_s}
    attach, detach = hotplug_plan(spec, boot, attached)
    assert {v["name"] for v in attach} == {n for n, h in spec_m.items() if h and n not in attached_s}
    for n in detach:
        assert n in attached_s and n not in spec_m  # only what is attached and gone from the spec
        assert n not in boot  # never a cold (boot-time) disk: that needs a restart
    assert set(detach) == attached_s - set(spec_m) - boot
    assert not ({v["name"] for v in attach} & set(detach))


def test_attached_volumes_reads_user_aliases_only():
    xml = """<domain><devices>
      <disk type='file' device='disk'><target dev='vda'/><alias name='ua-root'/></disk>
      <disk type='file' device='disk'><target dev='vdb'/><alias name='ua-data'/></disk>
      <disk type='file' device='cdrom'><target dev='sda'/><alias name='sata0-0-0'/></disk>
      <disk type='file' device='disk'><target dev='sdb'/></disk>
    </devices></domain>"""
    assert attached_volumes(xml) == {"data": "vdb"}  # root is the boot disk, not a volume


def test_to_volume_spec_maps_every_source():
    v = to_volume_spec({"name": "a", "emptyDisk": {"capacity": "1Gi"}, "bus": "scsi", "readOnly": True})
    assert (v.name, v.empty_disk, v.bus, v.read_only, v.host_disk, v.image) == (
        "a",
        "1Gi",
        "scsi",
        True,
        None,
        None,
    )
    h = to_volume_spec(
        {
            "name": "h",
            "hostDisk": {"path": "team/x.img", "type": "DiskOrCreate", "capacity": "1Gi"},
        }
    )
    assert (h.host_disk.path, h.host_disk.type, h.host_disk.capacity) == (
        "team/x.img",
        "DiskOrCreate",
        "1Gi",
    )
    i = to_volume_spec({"name": "i", "image": "127.0.0.1:5000/d:1", "cdrom": True})
    assert (i.image, i.cdrom, i.bus) == ("127.0.0.1:5000/d:1", True, "virtio")
    for v_ in (v, h, i):
        v_.validate("volume")


def test_the_boot_disk_and_the_seed_are_not_volumes():
    xml = """<domain><devices>
      <disk device="disk"><target dev="vda"/><alias name="ua-root"/></disk>
      <disk device="cdrom"><target dev="sda"/><alias name="ua-cidata"/></disk>
      <disk device="disk"><target dev="vdb"/><alias name="ua-data"/></disk>
    </devices></domain>"""
    assert attached_volumes(xml) == {"data": "vdb"}
    assert hotplug_plan([], set(), attached_volumes(xml)) == ([], ["data"])
    assert hotplug_plan([], set(attached_volumes(xml)), attached_volumes(xml)) == ([], [])


def test_volume_status_after_a_round():
    entries = {
        "data": {"name": "data", "phase": "Attaching"},  # attached meanwhile: Mounted
        "bad": {"name": "bad", "phase": "Failed", "message": "no space"},  # attached, but failed: kept
        "stale": {"name": "stale", "phase": "Attaching"},  # neither attached nor wanted: dropped
        "retry": {"name": "retry", "phase": "Failed", "message": "x"},  # wanted, not attached: kept
    }
    attached = {"data": "vdb", "bad": "vdc", "boot": "vdd"}
    got = volume_status(entries, attached, wanted={"data", "bad", "retry"})
    assert got == [
        {"name": "bad", "phase": "Failed", "message": "no space"},
        {"name": "boot", "target": "vdd", "phase": "Mounted"},
        {"name": "data", "target": "vdb", "phase": "Mounted"},
        {"name": "retry", "phase": "Failed", "message": "x"},
    ]
    assert entries["data"] == {"name": "data", "phase": "Attaching"}  # the input is left alone
