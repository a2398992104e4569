"""Image store: file:// confinement, format/backing-file checks, reference errors, OCI layout extraction."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from cri_shim.vm import ImageError, ImageStore, ValidationError
from cri_shim.vm.disks import DiskManager, parse_quantity
from cri_shim.vm.images import extract_disk_from_oci_layout, extract_disk_from_rootfs

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (qemu-utils)")
REPO = Path(__file__).resolve().parents[2]


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=120)


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "images-root"
    root.mkdir()
    return ImageStore(tmp_path / "state", file_roots=[root]), root


def test_file_image_is_hashed_cached_and_read_only(store):
    st, root = store
    qemu_img("create", "-f", "qcow2", str(root / "base.qcow2"), "8M")
    img = st.resolve(f"file://{root}/base.qcow2")
    digest = hashlib.sha256((root / "base.qcow2").read_bytes()).hexdigest()
    assert img.digest == f"sha256:{digest}"
    assert img.path == st.blobs / digest
    assert (img.format, img.virtual_size) == ("qcow2", 8 * 2**20)
    assert not os.access(img.path, os.W_OK) or os.geteuid() == 0
    assert oct(img.path.stat().st_mode & 0o777) == "0o444"
    assert st.resolve(f"file://{root}/base.qcow2").path == img.path
    assert list(st.tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("file:///{root}/../etc/passwd", r"contains|not a clean absolute path"),
        ("file://host/{root}/x", r"names a host"),
        ("file:///etc/passwd", r"outside the allowed image roots; put it under"),
        ("file:///{root}/link-out", r"resolves to '/etc/hostname', outside the allowed image roots"),
        ("file:///{root}/missing.img", r"is not a regular file"),
        ("file:///{root}", r"is not a regular file"),
        ("", r"is empty"),
        ("ftp://x/y", r"unsupported scheme"),
        ("https://x/y.img", r"has no '#sha256=<64 hex digits>' fragment; append"),
        ("https://x/y.img#sha256=abc", r"has no '#sha256="),
        ("http://x/y.img#sha256=" + "0" * 64, r"plain http is not allowed; use https"),
    ],
)
def test_bad_references_name_the_field_and_fix(store, ref, message):
    st, root = store
    (root / "link-out").symlink_to("/etc/hostname")
    with pytest.raises(ValidationError, match=message) as ei:
        st.resolve(
            ref.format(root=str(root).lstrip("/") if ref.startswith("file:///{") else root), "spec.image"
        )
    assert ei.value.field == "spec.image"
    assert list(st.blobs.iterdir()) == []


def test_backing_file_and_unknown_format_are_refused(store):
    st, root = store
    qemu_img("create", "-f", "qcow2", str(root / "base.qcow2"), "4M")
    qemu_img(
        "create", "-f", "qcow2", "-F", "qcow2", "-b", str(root / "base.qcow2"), str(root / "child.qcow2")
    )
    with pytest.raises(ValidationError, match=r"^image: the qcow2 image names a backing file .* flatten it"):
        st.resolve(f"file://{root}/child.qcow2")
    qemu_img("create", "-f", "vmdk", str(root / "x.vmdk"), "4M")
    with pytest.raises(ValidationError, match=r"^image: disk image format 'vmdk' is not supported; convert"):
        st.resolve(f"file://{root}/x.vmdk")
    assert list(st.blobs.iterdir()) == [] and list(st.tmp.iterdir()) == []


def _layer(files: dict[str, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


def _layout(path: Path, layers: list[bytes]) -> None:
    blobs = path / "blobs/sha256"
    blobs.mkdir(parents=True)

    def put(b: bytes) -> str:
        h = hashlib.sha256(b).hexdigest()
        (blobs / h).write_bytes(b)
        return f"sha256:{h}"

    cfg = put(b"{}")
    man = json.dumps(
        {
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": 2},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(x), "size": len(x)}
                for x in layers
            ],
        }
    ).encode()
    md = put(man)
    (path / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": [{"digest": md, "size": len(man)}]})
    )


def test_oci_layout_layers_and_whiteouts(tmp_path):
    _layout(
        tmp_path / "l",
        [
            _layer(
                {"disk": None, "disk/a.qcow2": b"AAAA", "etc/passwd": b"x", "disk/../etc/shadow": b"evil"}
            ),
            _layer({"disk/.wh.a.qcow2": b"", "./disk/b.img": b"BBBB"}),
        ],
    )
    extract_disk_from_oci_layout(tmp_path / "l", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"BBBB"


@pytest.mark.parametrize(
    "layers",
    [[{"etc/x": b"1"}], [{"disk/a": b"1", "disk/b": b"2"}], [{"disk/a": b"1"}, {"disk/.wh..wh..opq": b""}]],
)
def test_oci_layout_needs_exactly_one_disk_file(tmp_path, layers):
    _layout(tmp_path / "l", [_layer(x) for x in layers])
    with pytest.raises(ImageError, match=r"exactly one regular file under /disk/"):
        extract_disk_from_oci_layout(tmp_path / "l", tmp_path / "out")


def test_oci_layout_from_the_vm_disk_builder(tmp_path):
    sys.path.insert(0, str(REPO / "deploy/images"))
    import build_vm_disk

    disk = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", str(disk), "1M")
    digest = build_vm_disk.write_oci_layout(disk, tmp_path / "oci", tag="t1")
    assert extract_disk_from_oci_layout(tmp_path / "oci", tmp_path / "out", tag="t1") == digest
    assert (tmp_path / "out").read_bytes() == disk.read_bytes()
    assert json.loads((tmp_path / "oci/oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}


def test_extract_from_unpacked_rootfs(tmp_path):
    (tmp_path / "rootfs/disk").mkdir(parents=True)
    (tmp_path / "rootfs/disk/disk.img").write_bytes(b"D")
    extract_disk_from_rootfs(tmp_path / "rootfs", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"D"
    with pytest.raises(ImageError, match="no /disk directory"):
        extract_disk_from_rootfs(tmp_path / "nothing", tmp_path / "out2")


def test_quantities():
    assert parse_quantity("f", "64Mi") == 64 * 2**20
    assert parse_quantity("f", "1G") == 10**9
    assert parse_quantity("f", 4096) == 4096
    for bad in ("", "1.5Gi", "-1Mi", "0", "12Pi", "1000"):
        with pytest.raises(ValidationError) as ei:
            parse_quantity("volumes[x].emptyDisk.capacity", bad)
        assert ei.value.field == "volumes[x].emptyDisk.capacity"


def test_disk_manager_confinement_and_kinds(tmp_path):
    allowed = tmp_path / "hostdisks"
    allowed.mkdir()
    dm = DiskManager(tmp_path / "state", host_disk_roots=[allowed])
    for scope, key in (("vm", "../x"), ("vm", "a/b"), ("vm", ""), ("node", "k")):
        with pytest.raises(ValidationError):
            dm.dir_for(scope, key)
    p, created = dm.empty_disk("vm", "uid1", "data", "16Mi", "raw")
    assert created and p.stat().st_size == 16 * 2**20
    assert dm.empty_disk("vm", "uid1", "data", "16Mi", "raw") == (p, False)
    with pytest.raises(ValidationError, match=r"hostDisk.path: .* resolves outside the allowed roots"):
        dm.host_disk("h", "/etc/passwd", "Disk")
    (allowed / "esc").symlink_to("/etc")
    with pytest.raises(ValidationError, match=r"resolves outside"):
        dm.host_disk("h", f"{allowed}/esc/passwd", "Disk")
    with pytest.raises(ValidationError, match=r"does not exist; create it or use DiskOrCreate"):
        dm.host_disk("h", f"{allowed}/new.img", "Disk")
    with pytest.raises(ValidationError, match=r"hostDisk.capacity: is required"):
        dm.host_disk("h", f"{allowed}/new.img", "DiskOrCreate")
    hp, created = dm.host_disk("h", f"{allowed}/new.img", "DiskOrCreate", "8Mi")
    assert created and hp.stat().st_size == 8 * 2**20
    assert dm.host_disk("h", f"{allowed}/new.img", "Disk") == (hp, False)
    dm.remove("vm", "uid1")
    dm.remove("vm", "uid1")  # idempotent
    assert not (tmp_path / "state/disks").exists()
    assert hp.exists()  # host disks belong to the host


@pytest.mark.parametrize("key", ["abc\n", "abc\n\n", "\nabc", "a/b", ".."])
def test_a_disk_key_with_a_newline_makes_no_folder(tmp_path, key):
    # `$` matches before a trailing newline: a disk folder "abc\n" was created
    dm = DiskManager(tmp_path / "state")
    with pytest.raises(ValidationError, match=r"is not a safe key"):
        dm.dir_for("vm", key)
    with pytest.raises(ValidationError, match=r"is not a safe key"):
        dm.empty_disk("pod", key, "data", "1Mi")
    assert not (tmp_path / "state").exists() or list((tmp_path / "state").rglob("*")) == []
    assert dm.dir_for("vm", "abc") == tmp_path / "state" / "disks" / "vm" / "abc"
