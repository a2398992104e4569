"""CRI requests + the parsed VM pod contract -> records and the libvirt layer's VMSpec (pure)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from cri_shim import protos
from cri_shim.kvm import translate
from cri_shim.kvm.contract import (
    ANN_CLOUD_INIT_USER_DATA,
    ANN_IMAGE,
    ANN_KERNEL_BOOT,
    ANN_MAC,
    ANN_VM_UID,
    ANN_VOLUMES,
    ContractError,
)
from cri_shim.kvm.records import ContainerMetadata, PodMetadata
from cri_shim.kvm.userdata import Mount
from cri_shim.vm.disks import DiskManager, DiskOwner
from cri_shim.vm.errors import ValidationError
from cri_shim.vm.sizes import DiskLimits

api = protos.api()

SID = "a" * 64
CID = "c" * 64
CNI_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:09", "sandbox": "/run/netns/x"}],
    "ips": [{"address": "10.245.0.9/24", "gateway": "10.245.0.1", "interface": 0}],
}


def pod(annotations: dict[str, str] | None = None, **md: str) -> translate.PodRequest:
    meta = {"name": "web", "namespace": "ns", "uid": "u1", **md}
    return translate.PodRequest(
        metadata=PodMetadata(**meta), annotations=annotations or {}, log_directory="/var/log/pods/x"
    )


def ready(sb, cni_result=CNI_RESULT):
    return dataclasses.replace(sb, phase="ready", state="READY", network_added=True, cni_result=cni_result)


def container(**kw) -> translate.ContainerRequest:
    return translate.ContainerRequest(
        metadata=ContainerMetadata("vm"), **{"image": "127.0.0.1:5000/vm/d:1", "log_path": "vm/0.log", **kw}
    )


VM = {ANN_VM_UID: "vm-1", ANN_IMAGE: "127.0.0.1:5000/vm/annotated:1"}


def test_a_sandbox_reads_the_contract_once_and_gets_its_mac():
    sb = translate.new_sandbox(pod(VM), SID, now=5)
    assert (sb.id, sb.netns, sb.created_at, sb.phase) == (SID, "cni-kvm-aaaaaaaaaaaa", 5, "setup")
    assert sb.contract.vm is not None and sb.contract.vm.vm_uid == "vm-1"
    assert sb.mac == translate.derived_mac("ns", "vm-1") and sb.mac.startswith("02:")  # stable per VM
    assert translate.new_sandbox(pod({**VM, ANN_MAC: "02:AA:00:00:00:01"}), SID, 0).mac == "02:aa:00:00:00:01"
    assert translate.new_sandbox(pod({ANN_MAC: "02:00:00:00:00:07"}), SID, 0).mac == "02:00:00:00:00:07"
    assert translate.new_sandbox(pod(), SID, 0).mac is None  # not a VM: the plugin picks one


def test_bad_sandbox_input_names_the_field():
    with pytest.raises(ValidationError, match=r"^config\.metadata\.namespace: 'bad/ns' is not a Kubernetes"):
        translate.new_sandbox(pod(namespace="bad/ns"), SID, 0)
    with pytest.raises(ValidationError, match=r"namespace: 'Team_A' is not a namespace name"):
        translate.new_sandbox(pod(namespace="Team_A"), SID, 0)  # it keys the pod's disks: a DNS label
    with pytest.raises(ValidationError, match=r"^config\.metadata\.uid: .* is not a safe key"):
        translate.new_sandbox(pod(uid="u" * 200), SID, 0)
    with pytest.raises(
        ValidationError, match=r"^config\.annotations\[edgevirt\.io/mac\]: 'nope' is not a MAC"
    ):
        translate.new_sandbox(pod({ANN_MAC: "nope"}), SID, 0)
    with pytest.raises(ValidationError, match=r"multicast"):
        translate.new_sandbox(pod({ANN_MAC: "03:00:00:00:00:01"}), SID, 0)
    with pytest.raises(ContractError, match=r"edgevirt\.io/image"):
        translate.new_sandbox(pod({ANN_VM_UID: "vm-2"}), SID, 0)


def test_resources_become_whole_vcpus_and_mib():
    assert translate.resources(container(), 256) == (1, 256)
    assert translate.resources(container(cpu_quota=150000, cpu_period=100000), 256) == (2, 256)
    assert translate.resources(container(memory_limit_in_bytes=512 * 2**20), 256) == (1, 512)
    assert translate.resources(container(memory_limit_in_bytes=2**20), 256) == (1, 64)  # at least 64 MiB


def test_the_image_annotation_wins_and_image_ids_are_refused():
    vm_sb = translate.new_sandbox(pod(VM), SID, 0)
    plain = translate.new_sandbox(pod(), SID, 0)
    assert translate.image_ref(vm_sb.contract, container(image="sha256:" + "b" * 64)) == VM[ANN_IMAGE]
    assert (
        translate.image_ref(plain.contract, container(user_specified_image="reg/x:1", image="y")) == "reg/x:1"
    )
    with pytest.raises(ValidationError, match=r"^config\.image\.image: 'sha256:b+' is an image ID"):
        translate.image_ref(plain.contract, container(image="sha256:" + "b" * 64))
    with pytest.raises(ValidationError, match=r"^config\.image\.image: is empty"):
        translate.image_ref(plain.contract, container(image=""))


def test_kernel_boot_files_must_lie_under_an_image_root(tmp_path: Path):
    root = tmp_path / "images"
    (root / "k").mkdir(parents=True)
    (root / "k" / "vmlinuz").touch()
    (tmp_path / "outside").touch()
    (root / "k" / "escape").symlink_to(tmp_path / "outside")

    def kb(d: dict[str, str]):
        sb = translate.new_sandbox(pod({**VM, ANN_KERNEL_BOOT: json.dumps(d)}), SID, 0)
        return translate.kernel_boot(sb.contract.vm, (root,))

    got = kb({"kernel": str(root / "k" / "vmlinuz"), "cmdline": "console=ttyS0"})
    assert got is not None and (got.kernel, got.initrd, got.cmdline) == (
        root / "k/vmlinuz",
        None,
        "console=ttyS0",
    )
    with pytest.raises(
        ValidationError, match=r"^config\.annotations\[edgevirt\.io/kernel-boot\]\.kernel: .* outside"
    ) as ei:
        kb({"kernel": str(root / "k" / "escape")})  # a symlink out of the root
    assert (
        str(tmp_path / "outside") not in str(ei.value)
        and str(root) not in str(ei.value).split(":", 1)[1][40:]
    )
    assert str(tmp_path / "outside") in ei.value.detail
    with pytest.raises(ValidationError, match=r"kernel-boot\]\.initrd"):
        kb({"kernel": str(root / "k" / "vmlinuz"), "initrd": "/etc/passwd"})
    assert translate.kernel_boot(None, (root,)) is None


def test_the_log_path_stays_in_the_pods_log_directory():
    assert translate.log_path("/var/log/pods/x", "vm/0.log") == "/var/log/pods/x/vm/0.log"
    assert translate.log_path("", "vm/0.log") == ""
    for bad in ("../y/0.log", "/etc/0.log"):
        with pytest.raises(ValidationError, match=r"^config\.log_path: .* leaves the pod's log directory"):
            translate.log_path("/var/log/pods/x", bad)


def test_a_vm_pods_container_boots_the_vm_with_its_disks_kept_per_vm():
    vols = [
        {"name": "data", "emptyDisk": {"capacity": "1Gi"}},
        {"name": "hot", "emptyDisk": {"capacity": "2Gi"}, "hotpluggable": True},
    ]
    ann = {**VM, ANN_VOLUMES: json.dumps(vols), "edgevirt.io/cloud-init-user-data": "#cloud-config\n"}
    sb = ready(translate.new_sandbox(pod(ann, name="web"), SID, 0))
    limits = translate.Limits(default_memory_mib=128, device_dir=Path("/run/tap"))
    rec, spec = translate.new_container(container(labels={"a": "b"}), sb, limits, CID, now=7)
    assert (spec.name, spec.uid, spec.cpu, spec.memory_mib) == ("edgevirt-" + CID[:20], "vm-1", 1, 128)
    assert (spec.image, spec.namespace, spec.disk_scope, spec.disk_key) == (VM[ANN_IMAGE], "ns", "vm", "vm-1")
    assert [v.name for v in spec.volumes] == ["data"]  # hotpluggable volumes are node mode's
    assert [(n.mac, n.tap_device) for n in spec.nics] == [
        ("02:00:00:00:00:09", Path("/run/tap") / SID / "eth0")
    ]
    assert spec.cloud_init is not None and spec.cloud_init.user_data == "#cloud-config\n"
    assert (spec.cloud_init.instance_id, spec.cloud_init.hostname) == ("vm-1", "web")
    assert spec.cni_result == CNI_RESULT
    assert (rec.id, rec.sandbox_id, rec.domain, rec.image, rec.image_spec) == (
        CID,
        SID,
        spec.name,
        VM[ANN_IMAGE],
        "127.0.0.1:5000/vm/d:1",
    )
    assert (rec.log_path, rec.labels, rec.created_at, rec.phase, rec.state) == (
        "/var/log/pods/x/vm/0.log",
        {"a": "b"},
        7,
        "setup",
        "CREATED",
    )


def test_a_plain_kvm_pods_disks_are_the_pods():
    sb = ready(translate.new_sandbox(pod(), SID, 0), cni_result=None)
    _rec, spec = translate.new_container(container(), sb, translate.Limits(), CID, now=0)
    assert (spec.uid, spec.namespace, spec.disk_scope, spec.disk_key, spec.nics, spec.volumes) == (
        "u1",
        "ns",
        "pod",
        "u1",
        [],
        [],
    )
    assert spec.cloud_init is not None and spec.cloud_init.user_data == "#cloud-config\n{}\n"


def test_requests_are_read_off_the_protobuf_messages():
    cfg = api.ContainerConfig(
        metadata=api.ContainerMetadata(name="vm", attempt=2),
        image=api.ImageSpec(image="img", user_specified_image="reg/img:1"),
        log_path="vm/2.log",
        labels={"l": "1"},
        linux=api.LinuxContainerConfig(
            resources=api.LinuxContainerResources(
                cpu_quota=50000, cpu_period=100000, memory_limit_in_bytes=2**30
            )
        ),
        mounts=[
            api.Mount(
                container_path="/run/edgevirt/cloud-init", host_path="/k/pods/u/volumes/s", readonly=True
            )
        ],
    )
    req = translate.ContainerRequest.from_cri(cfg)
    assert req == translate.ContainerRequest(
        metadata=ContainerMetadata("vm", 2),
        image="img",
        user_specified_image="reg/img:1",
        log_path="vm/2.log",
        labels={"l": "1"},
        cpu_quota=50000,
        cpu_period=100000,
        memory_limit_in_bytes=2**30,
        mounts=(Mount("/run/edgevirt/cloud-init", "/k/pods/u/volumes/s", True),),
    )
    pcfg = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name="web", namespace="ns", uid="u1", attempt=1),
        hostname="h",
        annotations={ANN_MAC: "02:00:00:00:00:01"},
    )
    assert translate.PodRequest.from_cri(pcfg) == translate.PodRequest(
        metadata=PodMetadata("web", "ns", "u1", 1), annotations={ANN_MAC: "02:00:00:00:00:01"}, hostname="h"
    )


def test_a_mac_annotation_with_a_newline_is_refused():
    with pytest.raises(ValidationError, match=r"^config\.annotations\[edgevirt\.io/mac\]: .* is not a MAC"):
        translate.new_sandbox(pod({ANN_MAC: "02:00:00:00:00:01\n"}), SID, 0)
    with pytest.raises(ValidationError, match=r"is not a Kubernetes name"):
        translate.new_sandbox(pod(name="web\n"), SID, 0)


def test_a_vm_uid_copied_into_another_namespace_gets_disks_of_its_own(tmp_path):
    """Finding 1: a pod of namespace B carrying namespace A's VM UID booted A's disks read-write."""
    a = ready(translate.new_sandbox(pod(VM, namespace="team-a", uid="pod-a"), SID, 0))
    b = ready(translate.new_sandbox(pod(VM, namespace="team-b", uid="pod-b"), SID, 0))
    _, spec_a = translate.new_container(container(), a, translate.Limits(), CID, 0)
    _, spec_b = translate.new_container(container(), b, translate.Limits(), CID, 0)
    dm = DiskManager(tmp_path)
    dir_a = dm.owner_dir(DiskOwner(spec_a.disk_scope, spec_a.disk_key, spec_a.namespace))
    dir_b = dm.owner_dir(DiskOwner(spec_b.disk_scope, spec_b.disk_key, spec_b.namespace))
    assert dir_a == tmp_path / "disks/ns/team-a/vm/vm-1" and dir_b == tmp_path / "disks/ns/team-b/vm/vm-1"
    assert a.mac != b.mac  # nor its MAC on the VM network


def test_volumes_are_bounded_by_the_nodes_limits():
    big = [{"name": "d", "emptyDisk": {"capacity": "16Ti"}}]
    limits = translate.Limits(disks=DiskLimits(max_disk_bytes=2**40), max_volumes=2)
    sb = ready(translate.new_sandbox(pod({**VM, ANN_VOLUMES: json.dumps(big)}), SID, 0))
    with pytest.raises(ValidationError) as ei:
        translate.new_container(container(), sb, limits, CID, 0)
    assert str(ei.value) == (
        "config.annotations[edgevirt.io/volumes][d].emptyDisk.capacity: 16Ti is over this node's limit of "
        "1Ti per disk; ask for at most 1Ti (the node's kvm option max_disk_bytes)"
    )
    hot = [
        {
            "name": "h",
            "hotpluggable": True,
            "hostDisk": {"path": "/x", "type": "DiskOrCreate", "capacity": "2Ti"},
        }
    ]
    sb = ready(translate.new_sandbox(pod({**VM, ANN_VOLUMES: json.dumps(hot)}), SID, 0))
    with pytest.raises(ValidationError, match=r"\[h\]\.hostDisk\.capacity: 2Ti is over"):
        translate.new_container(container(), sb, limits, CID, 0)  # also hotpluggable ones
    three = [{"name": f"v{i}", "emptyDisk": {"capacity": "1Mi"}} for i in range(3)]
    sb = ready(translate.new_sandbox(pod({**VM, ANN_VOLUMES: json.dumps(three)}), SID, 0))
    with pytest.raises(
        ValidationError, match=r"lists 3 volumes, over this node's limit of 2; use fewer volumes"
    ):
        translate.new_container(container(), sb, limits, CID, 0)


def test_user_data_comes_from_the_secret_or_the_annotation_never_both():
    sb = ready(translate.new_sandbox(pod(VM), SID, 0))
    _, spec = translate.new_container(
        container(), sb, translate.Limits(), CID, 0, secret_user_data="#secret\n"
    )
    assert spec.cloud_init is not None and spec.cloud_init.user_data == "#secret\n"
    plain = ready(translate.new_sandbox(pod(), SID, 0))  # a plain kvm pod may mount one too
    _, spec = translate.new_container(container(), plain, translate.Limits(), CID, 0, secret_user_data="#p\n")
    assert spec.cloud_init is not None and spec.cloud_init.user_data == "#p\n"
    both = ready(translate.new_sandbox(pod({**VM, ANN_CLOUD_INIT_USER_DATA: "#inline\n"}), SID, 0))
    with pytest.raises(
        ValidationError, match=r"is set while a Secret is mounted at /run/edgevirt/cloud-init too"
    ):
        translate.new_container(container(), both, translate.Limits(), CID, 0, secret_user_data="#secret\n")


def test_a_plain_kvm_pod_s_inline_user_data_reaches_its_seed_and_survives_the_record():
    from cri_shim.kvm import records

    plain = ready(translate.new_sandbox(pod({ANN_CLOUD_INIT_USER_DATA: "# edgevirt.agent: off\n"}), SID, 0))
    assert plain.contract.vm is None and plain.contract.user_data == "# edgevirt.agent: off\n"
    _, spec = translate.new_container(container(), plain, translate.Limits(), CID, 0)
    assert spec.cloud_init is not None and spec.cloud_init.user_data == "# edgevirt.agent: off\n"
    again = records.sandbox_from_json(json.loads(json.dumps(records.to_json(plain))))
    assert again.contract == plain.contract
    with pytest.raises(ValidationError, match=r"is set while a Secret is mounted"):
        translate.new_container(container(), plain, translate.Limits(), CID, 0, secret_user_data="#s\n")
