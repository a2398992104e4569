"""Writable disks per namespace: the layout keyed by (namespace, VM or pod UID), hostDisk confined to
its namespace's folder (as written and after symlinks, at boot and for hot-plug alike), the node's size
limits and free-space reserve, the move of old-layout VM disks, removal, and 0600/0700 modes."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cri_shim.vm import ImageStore, ValidationError
from cri_shim.vm.disks import DiskManager, DiskOwner
from cri_shim.vm.sizes import DiskLimits, format_bytes, parse_quantity

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (qemu-utils)")

A = DiskOwner("vm", "vm-uid-1", "team-a")
B = DiskOwner("vm", "vm-uid-1", "team-b")  # the same VM UID, copied into a pod of another namespace
NO_RESERVE = DiskLimits(min_free_bytes=0)


def mode(p: Path) -> str:
    return oct(p.stat().st_mode & 0o777)


@pytest.fixture
def dm(tmp_path):
    root = tmp_path / "hostdisks"
    (root / "team-a").mkdir(parents=True)
    (root / "team-b").mkdir()
    return DiskManager(tmp_path / "state", host_disk_roots=[root], limits=NO_RESERVE), root


@pytest.fixture
def base(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(images / "a.qcow2"), "8M"], check=True, timeout=60
    )
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(images / "b.qcow2"), "9M"], check=True, timeout=60
    )
    st = ImageStore(tmp_path / "state", file_roots=[images])
    return st.resolve(f"file://{images}/a.qcow2"), st.resolve(f"file://{images}/b.qcow2")


def test_the_same_vm_uid_in_two_namespaces_gets_two_sets_of_disks(dm, base, tmp_path):
    m, _ = dm
    a_root, created = m.overlay(base[0], A)
    b_root, created_b = m.overlay(base[0], B)
    assert created and created_b and a_root != b_root
    assert a_root == tmp_path / "state/disks/ns/team-a/vm/vm-uid-1/root.qcow2"
    assert b_root == tmp_path / "state/disks/ns/team-b/vm/vm-uid-1/root.qcow2"
    a_data, _ = m.empty_disk(A, "data", "16Mi")
    b_data, _ = m.empty_disk(B, "data", "16Mi")
    assert a_data != b_data and a_data.parent == a_root.parent
    assert m.overlay(base[0], A) == (a_root, False)  # kept across stop/start
    for p in (a_root, a_data):
        assert mode(p) == "0o600"
    for d in (a_root.parent, a_root.parent.parent, tmp_path / "state/disks/ns/team-a"):
        assert mode(d) == "0o700"


def test_a_vms_disk_on_another_image_is_refused_without_paths_and_a_pods_starts_again(dm, base):
    m, _ = dm
    m.overlay(base[0], A)
    with pytest.raises(ValidationError) as ei:
        m.overlay(base[1], A)
    msg = str(ei.value)
    assert msg.startswith("image: the VM's disk was made from another image than the one it names now")
    assert "/" not in msg.split(";")[0] and "sha256" not in msg and base[0].digest[7:] not in msg
    assert str(base[0].path) in ei.value.detail  # the node's log gets the paths
    pod = DiskOwner("pod", "pod-uid-1", "team-a")
    first, _ = m.overlay(base[0], pod)
    again, created = m.overlay(base[1], pod)  # the pod's container image changed: a new root disk
    assert again == first and created


def test_hostdisk_lives_in_its_namespaces_folder(dm):
    m, root = dm
    (root / "team-a" / "a.img").write_bytes(b"\0" * 4096)
    assert m.host_disk("team-a", "h", "a.img", "Disk") == (root / "team-a" / "a.img", False)
    # the same relative path of another namespace is that namespace's own file, never team-a's
    with pytest.raises(ValidationError, match=r"'a.img' does not exist"):
        m.host_disk("team-b", "h", "a.img", "Disk")
    p, created = m.host_disk("team-b", "h", "new.img", "DiskOrCreate", "1Mi")
    assert created and p == root / "team-b" / "new.img"
    assert not (root / "team-a" / "new.img").exists()  # nothing made in another namespace's folder


@pytest.mark.parametrize(
    "path", ["../team-a/a.img", "./x.img", "d//x", "/etc/passwd", "{root}/team-b/x", "", "x\n", "a/.."]
)
def test_hostdisk_paths_must_be_clean_and_relative(dm, path):
    m, root = dm
    with pytest.raises(
        ValidationError,
        match=r"hostDisk.path: .* is not (a clean path|a path relative to the namespace's folder)",
    ):
        m.host_disk("team-b", "h", path.format(root=root), "Disk")


def test_a_symlink_out_of_the_namespace_folder_is_refused_and_not_followed_when_creating(dm, tmp_path):
    m, root = dm
    (root / "team-a" / "a.img").write_bytes(b"\0" * 4096)
    (root / "team-b" / "to-a").symlink_to(root / "team-a")
    (root / "team-b" / "etc").symlink_to("/etc")
    for path in ("to-a/a.img", "etc/passwd"):
        with pytest.raises(
            ValidationError, match=r"leads out of the folder of namespace 'team-b' \(through a symlink\)"
        ) as ei:
            m.host_disk("team-b", "h", path, "Disk")
        assert "/etc" not in str(ei.value).replace(path, "") and str(root / "team-a") not in str(
            ei.value
        ).replace(path, "")
    with pytest.raises(ValidationError, match=r"leads out"):
        m.host_disk("team-b", "h", "to-a/new.img", "DiskOrCreate", "1Mi")
    assert not (root / "team-a" / "new.img").exists()
    # a symlink the administrator made inside the namespace's folder is fine
    (root / "team-b" / "disks").mkdir()
    (root / "team-b" / "current").symlink_to(root / "team-b" / "disks")
    p, created = m.host_disk("team-b", "h", "current/d.img", "DiskOrCreate", "8Mi")
    assert created and p == root / "team-b" / "disks" / "d.img" and p.stat().st_size == 8 * 2**20
    assert p.stat().st_blocks == 0 and mode(p) == "0o600"  # sparse, private


def test_hostdisk_without_a_root_or_a_namespace_is_refused(tmp_path):
    with pytest.raises(ValidationError, match=r"hostDisk is disabled on this node; ask its administrator"):
        DiskManager(tmp_path / "s").host_disk("team-a", "h", "x", "Disk")
    m = DiskManager(tmp_path / "s", host_disk_roots=[tmp_path])
    with pytest.raises(ValidationError, match=r"a hostDisk needs the VM's namespace"):
        m.host_disk("", "h", "x", "Disk")


def test_sizes_are_bounded_by_the_node_and_errors_name_field_and_fix(tmp_path, base):
    m = DiskManager(
        tmp_path / "state",
        host_disk_roots=[tmp_path / "hd"],
        limits=DiskLimits(max_disk_bytes=2**30, min_free_bytes=0),
    )
    with pytest.raises(ValidationError) as ei:
        m.empty_disk(A, "data", "16Ti")
    assert str(ei.value) == (
        "volumes[data].emptyDisk.capacity: 16Ti is over this node's limit of 1Gi per disk; "
        "ask for at most 1Gi (the node's kvm option max_disk_bytes)"
    )
    with pytest.raises(
        ValidationError, match=r"^volumes\[h\].hostDisk.capacity: 2Gi is over this node's limit"
    ):
        m.host_disk("team-a", "h", "x.img", "DiskOrCreate", "2Gi")
    with pytest.raises(ValidationError, match=r"^image: 2Gi is over this node's limit of 1Gi per disk"):
        m.overlay(base[0], A, size=2 * 2**30)  # the root disk's virtual size is bounded too
    assert not (tmp_path / "state/disks").exists() and not (tmp_path / "hd/team-a/x.img").exists()


def test_no_new_disk_when_the_node_would_keep_less_than_its_reserve(tmp_path, base):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    m = DiskManager(
        tmp_path / "state", host_disk_roots=[tmp_path / "hd"], limits=DiskLimits(min_free_bytes=free + 2**40)
    )
    with pytest.raises(ValidationError) as ei:
        m.empty_disk(A, "data", "1Mi")
    assert "the node has too little free disk space for it (it keeps" in str(ei.value)
    assert str(tmp_path) not in str(ei.value) and str(tmp_path) in ei.value.detail
    with pytest.raises(ValidationError, match=r"too little free disk space"):
        m.overlay(base[0], A)
    with pytest.raises(ValidationError, match=r"too little free disk space"):
        m.host_disk("team-a", "h", "x.img", "DiskOrCreate", "1Mi")
    assert not (tmp_path / "state/disks").exists()


def test_quantities():
    assert parse_quantity("f", "64Mi") == 64 * 2**20
    assert parse_quantity("f", "1.5Gi") == 3 * 2**29
    assert parse_quantity("f", "1G") == parse_quantity("f", "1e9") == 10**9
    assert parse_quantity("f", 4096) == 4096
    assert format_bytes(256 * 2**30) == "256Gi" and format_bytes(1000) == "1000"
    for bad in ("", "-1Mi", "0", "12Pi", "1000", "1.1", True, None, "1Gi\n", "5 Gi"):
        with pytest.raises(ValidationError) as ei:
            parse_quantity("volumes[x].emptyDisk.capacity", bad)
        assert ei.value.field == "volumes[x].emptyDisk.capacity"


def test_old_layout_vm_disks_move_to_their_namespace_once(dm, base, tmp_path):
    m, _ = dm
    legacy = DiskOwner("vm", "vm-old")  # unscoped: the layout before namespaces
    old_root, _ = m.overlay(base[0], legacy)
    assert old_root == tmp_path / "state/disks/vm/vm-old/root.qcow2" and m.has_legacy_vm_disks("vm-old")
    assert m.adopt_legacy_vm_disks("team-a", "vm-old")
    new_root = tmp_path / "state/disks/ns/team-a/vm/vm-old/root.qcow2"
    assert (
        new_root.exists()
        and not m.has_legacy_vm_disks("vm-old")
        and not (tmp_path / "state/disks/vm").exists()
    )
    assert m.overlay(base[0], DiskOwner("vm", "vm-old", "team-a")) == (new_root, False)  # same base: kept
    assert not m.adopt_legacy_vm_disks("team-b", "vm-old")  # nothing left to claim
    m.overlay(base[0], legacy)
    assert not m.adopt_legacy_vm_disks("team-a", "vm-old")  # never over disks already there
    assert m.vm_disk_owners() == [("team-a", "vm-old")]


def test_removal_is_exact_idempotent_and_the_old_call_removes_a_deleted_vm_everywhere(dm, base, tmp_path):
    m, _root = dm
    for owner in (A, B, DiskOwner("pod", "p1", "team-a"), DiskOwner("vm", "vm-uid-1")):
        m.empty_disk(owner, "d", "1Mi")
    hp, _ = m.host_disk("team-a", "h", "h.img", "DiskOrCreate", "1Mi")
    m.remove_vm_disks("team-a", "vm-uid-1")
    m.remove_vm_disks("team-a", "vm-uid-1")
    assert (
        not m.owner_dir(A).exists() and not m.dir_for("vm", "vm-uid-1").exists() and m.owner_dir(B).exists()
    )
    m.remove_owner(DiskOwner("pod", "p1", "team-a"))
    assert m.vm_disk_owners() == [("team-b", "vm-uid-1")]
    m.remove("vm", "vm-uid-1")  # node mode before it passed a namespace: the deleted VM's UID, anywhere
    assert not (tmp_path / "state/disks").exists()
    assert hp.exists()  # host disks belong to the host


@pytest.mark.parametrize("key", ["abc\n", "abc\n\n", "\nabc", "a/b", ".."])
def test_a_disk_key_with_a_newline_makes_no_folder(tmp_path, key):
    m = DiskManager(tmp_path / "state")
    with pytest.raises(ValidationError, match=r"is not a safe key"):
        m.dir_for("vm", key, "team-a")
    with pytest.raises(ValidationError, match=r"is not a safe key"):
        m.empty_disk(DiskOwner("pod", key, "team-a"), "data", "1Mi")
    assert not (tmp_path / "state").exists() or list((tmp_path / "state").rglob("*")) == []
    assert m.dir_for("vm", "abc") == tmp_path / "state" / "disks" / "vm" / "abc"


@pytest.mark.parametrize("ns", ["Team-A", "a/b", "..", "", "x" * 64, "team-a\n"])
def test_a_namespace_must_be_a_dns_label(tmp_path, ns):
    m = DiskManager(tmp_path / "state")
    if ns == "":
        assert m.dir_for("vm", "u") == tmp_path / "state/disks/vm/u"  # unscoped
        return
    with pytest.raises(ValidationError, match=r"is not a namespace name"):
        m.dir_for("vm", "u", ns)
