"""The VM pod contract read strictly: every annotation with its type, as the CRD would check it, and
malformed ones refused naming the annotation and the place inside its JSON (never a TypeError)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cri_shim.kvm.contract import (
    ANN_CLOUD_INIT_USER_DATA,
    ANN_IMAGE,
    ANN_KERNEL_BOOT,
    ANN_VM_NAME,
    ANN_VM_UID,
    ANN_VOLUMES,
    CLOUD_INIT_SECRET_PATH,
    ContractError,
    parse_pod_contract,
    to_volume_spec,
)

BASE = {ANN_VM_UID: "11111111-2222-3333-4444-555555555555", ANN_IMAGE: "reg.example/vm/d:1"}


def refused(ann: dict[str, str]) -> str:
    with pytest.raises(ContractError) as ei:
        parse_pod_contract({**BASE, **ann})
    return str(ei.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"kernel": 5}', r"^edgevirt.io/kernel-boot.kernel: must be a string, not int"),
        ('{"kernel": ""}', r"^edgevirt.io/kernel-boot.kernel: is empty"),
        ('{"kernel": "/k", "initrd": ["x"]}', r"^edgevirt.io/kernel-boot.initrd: must be a string, not list"),
        ('{"kernel": "/k", "cmdline": 1}', r"^edgevirt.io/kernel-boot.cmdline: must be a string"),
        (
            '{"kernel": "/k", "cmdline": "' + "x" * 4097 + '"}',
            r"kernel-boot.cmdline: must be a string of at most 4096",
        ),
        ('{"kernel": "/k", "append": "x"}', r"^edgevirt.io/kernel-boot: has unknown keys \['append'\]"),
        ('["/k"]', r'^edgevirt.io/kernel-boot: needs an object with "kernel"'),
        ("{", r"^edgevirt.io/kernel-boot: not JSON"),
    ],
)
def test_kernel_boot_fields_are_typed(value, message):
    with pytest.raises(ContractError, match=message):
        parse_pod_contract({**BASE, ANN_KERNEL_BOOT: value})


def vols(*items: dict) -> dict[str, str]:
    return {ANN_VOLUMES: json.dumps(list(items))}


@pytest.mark.parametrize(
    ("volume", "message"),
    [
        ({"name": "Data", "emptyDisk": {"capacity": "1Gi"}}, r"\[0\].name: 'Data' is not a DNS label"),
        ({"name": "d" * 64, "emptyDisk": {"capacity": "1Gi"}}, r"\[0\].name: .* is not a DNS label"),
        ({"name": "d", "emptyDisk": {"capacity": 1}}, r"\[0\].emptyDisk.capacity: must be a string, not int"),
        ({"name": "d", "emptyDisk": {"capacity": "lots"}}, r"\[0\].emptyDisk.capacity: 'lots' is not a size"),
        ({"name": "d", "emptyDisk": {}}, r"\[0\].emptyDisk.capacity: must be a string, not NoneType"),
        ({"name": "d", "emptyDisk": "1Gi"}, r"\[0\].emptyDisk: must be an object, not str"),
        (
            {"name": "d", "emptyDisk": {"capacity": "1Gi", "size": 1}},
            r"emptyDisk: has unknown keys \['size'\]",
        ),
        ({"name": "d", "image": ["x"]}, r"\[0\].image: must be a string, not list"),
        ({"name": "d", "hostDisk": {"path": 1}}, r"\[0\].hostDisk.path: must be a string"),
        ({"name": "d", "hostDisk": {"path": "/x", "type": "File"}}, r"hostDisk.type: 'File' is not one of"),
        (
            {"name": "d", "hostDisk": {"path": "/x", "type": "DiskOrCreate"}},
            r"hostDisk.capacity: is required",
        ),
        (
            {"name": "d", "image": "x", "bus": "ide"},
            r"\[0\].bus: 'ide' is not one of \['virtio', 'scsi', 'sata'\]",
        ),
        ({"name": "d", "image": "x", "readOnly": "yes"}, r"\[0\].readOnly: must be true or false"),
        ({"name": "d", "image": "x", "hotpluggable": 1}, r"\[0\].hotpluggable: must be true or false"),
        ({"name": "d", "image": "x", "emptyDisk": {"capacity": "1Gi"}}, r"\[0\]: has 2 sources"),
        ({"name": "d"}, r"\[0\]: has 0 sources"),
        ({"name": "d", "image": "x", "persistentVolumeClaim": {}}, r"\[0\]: has unknown keys"),
        ({"bus": "virtio"}, r"^edgevirt.io/volumes: needs a JSON list of objects with a name"),
    ],
)
def test_volume_fields_are_typed(volume, message):
    with pytest.raises(ContractError, match=message):
        parse_pod_contract({**BASE, **vols(volume)})


def test_volume_lists_are_bounded_and_names_unique():
    many = [{"name": f"v{i}", "emptyDisk": {"capacity": "1Mi"}} for i in range(33)]
    assert "lists 33 volumes; use at most 32" in refused(vols(*many))
    two = {"name": "d", "emptyDisk": {"capacity": "1Mi"}}
    assert "names volumes ['d'] twice" in refused(vols(two, two))
    assert "not JSON" in refused({ANN_VOLUMES: "[{"})
    assert "needs a JSON list" in refused({ANN_VOLUMES: '{"name": "d"}'})


def test_scalar_annotations_are_checked():
    assert "is not a UID" in refused({ANN_VM_UID: "../../etc"})
    assert "is not a UID" in refused({ANN_VM_UID: "u1\n"})  # fullmatch: no trailing newline
    assert "is not a VirtualMachine name" in refused({ANN_VM_NAME: "Web VM"})
    assert "contains control characters" in refused({ANN_IMAGE: "reg.example/x:1\n"})
    assert "is 1025 characters long" in refused({ANN_IMAGE: "x" * 1025})
    assert "is over 65536 bytes; shorten it, or use a Secret" in refused(
        {ANN_CLOUD_INIT_USER_DATA: "é" * 40000}
    )
    with pytest.raises(ContractError, match=r"^edgevirt.io/image: is 1025 characters"):
        parse_pod_contract({ANN_IMAGE: "x" * 1025})  # on a plain kvm pod too


def test_a_well_formed_contract_is_read_as_written():
    volumes = [
        {"name": "data", "hotpluggable": True, "emptyDisk": {"capacity": "1.5Gi"}, "bus": "scsi"},
        {"name": "cd", "image": "reg.example/iso:1", "cdrom": True, "bus": "sata", "readOnly": True},
        {
            "name": "h",
            "hostDisk": {
                "path": "/var/lib/edgevirt/hostdisks/ns/h.img",
                "type": "DiskOrCreate",
                "capacity": "1Gi",
            },
        },
    ]
    c = parse_pod_contract(
        {
            **BASE,
            ANN_VM_NAME: "web",
            ANN_KERNEL_BOOT: '{"kernel": "/k", "cmdline": "console=ttyS0"}',
            **vols(*volumes),
        }
    )
    assert c.vm is not None and c.vm.volumes == tuple(volumes) and c.vm.vm_name == "web"
    assert c.vm.kernel_boot == {"kernel": "/k", "cmdline": "console=ttyS0"}
    assert [to_volume_spec(v).name for v in volumes] == ["data", "cd", "h"]
    assert CLOUD_INIT_SECRET_PATH == "/run/edgevirt/cloud-init"


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: (
            st.lists(c, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    ["name", "emptyDisk", "image", "hostDisk", "capacity", "path", "type", "bus", "kernel"]
                ),
                c,
                max_size=4,
            )
        ),
        max_leaves=12,
    )
)
def test_any_json_is_refused_or_read_never_crashing(value):
    text = json.dumps(value)
    for ann in ({ANN_VOLUMES: text}, {ANN_KERNEL_BOOT: text}):
        try:
            c = parse_pod_contract({**BASE, **ann})
        except ContractError:
            continue
        assert c.vm is not None
        for v in c.vm.volumes:
            to_volume_spec(v)
