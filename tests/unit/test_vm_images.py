"""Image store: file:// confinement, format/backing-file checks, reference errors, registry references
only (every other skopeo/containers-image transport refused before any source is asked), the cache
answering only the reference that filled it, OCI layout extraction within the size cap (every blob
verified); error texts without host paths or digests. containerd's store as the source:
test_vm_containerd_source.py."""

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

from cri_shim.vm import ImageError, ImageStore, ValidationError, https_fetch
from cri_shim.vm.oci import Manifest, extract_disk_from_oci_layout, extract_disk_from_rootfs, parse_reference

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
        ("file:///etc/passwd", r"outside the node's image roots .*; use an image under"),
        ("file:///{root}/link-out", r"outside the node's image roots \(after resolving symlinks\)"),
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
    assert "/etc/hostname" not in str(ei.value)  # where a symlink leads is the node's business
    assert list(st.blobs.iterdir()) == []


def test_backing_file_and_unknown_format_are_refused(store):
    st, root = store
    qemu_img("create", "-f", "qcow2", str(root / "base.qcow2"), "4M")
    qemu_img(
        "create", "-f", "qcow2", "-F", "qcow2", "-b", str(root / "base.qcow2"), str(root / "child.qcow2")
    )
    with pytest.raises(ValidationError, match=r"^image: the qcow2 image names a backing file; flatten it"):
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


class RecordingSource:
    """A containerDisk source that records what reaches it and serves one disk file."""

    def __init__(self, disk: Path, digest: str = "sha256:" + "d" * 64, layer_bytes: int = 1) -> None:
        self.disk, self.digest, self.layer_bytes = disk, digest, layer_bytes
        self.inspected: list[str] = []
        self.fetched: list[str] = []
        self.offline = False

    def inspect(self, ref, timeout):
        if self.offline:
            raise AssertionError(f"the registry was asked about {ref} although the disk is cached")
        self.inspected.append(str(ref))
        return Manifest(self.digest, self.layer_bytes)

    def fetch_disk(self, ref, dest, max_bytes, timeout):
        assert ref.digest == self.digest  # pinned to what inspect answered
        self.fetched.append(f"{ref.name}:{ref.tag}")
        shutil.copyfile(self.disk, dest)
        return None  # the store hashes the file itself


@pytest.fixture
def oci_store(tmp_path):
    disk = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(disk), "4M")
    src = RecordingSource(disk)
    return ImageStore(tmp_path / "state", container_disks=src), src


@pytest.mark.parametrize(
    "ref",
    [
        "oci:/var/lib/edgevirt/images/layout:1",
        "oci-archive:/etc/shadow",
        "docker-archive:/root/x.tar",
        "dir:/etc",
        "containers-storage:alpine",
        "docker-daemon:alpine:latest",
        "ostree:x@/ostree/repo",
        "sif:/x.sif",
        "tarball:/x.tar",
        "docker://oci:/etc",
        "docker://dir:/etc",
        "registry.example//x:1",
        "Registry.Example/UPPER:1",
        "registry.example/x:bad tag",
        "registry.example/x@sha256:abc",
        "registry.example/x@md5:" + "0" * 32,
        "-registry.example/x:1",
    ],
)
def test_only_registry_references_reach_the_source(oci_store, ref):
    st, src = oci_store
    with pytest.raises(ValidationError) as ei:
        st.resolve(ref, "spec.image")
    assert ei.value.field == "spec.image" and "registry reference" in str(ei.value)
    assert src.inspected == [] and src.fetched == []
    assert list(st.tmp.iterdir()) == [] and list(st.blobs.iterdir()) == []


def test_a_transport_is_named_in_its_refusal(oci_store):
    st, _ = oci_store
    with pytest.raises(ValidationError, match=r"uses skopeo transport 'oci-archive', which the kvm handler"):
        st.resolve("oci-archive:/etc/shadow")


@pytest.mark.parametrize(
    ("ref", "canonical"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.20", "docker.io/library/alpine:3.20"),
        ("docker://alpine:3.20", "docker.io/library/alpine:3.20"),
        ("user/img", "docker.io/user/img:latest"),
        ("index.docker.io/user/img:1", "docker.io/user/img:1"),
        ("127.0.0.1:5000/vm/test-disk:1", "127.0.0.1:5000/vm/test-disk:1"),
        ("localhost/vm/d", "localhost/vm/d:latest"),
        ("[::1]:5000/vm/d:1", "[::1]:5000/vm/d:1"),
        ("reg.example/a/b@sha256:" + "e" * 64, "reg.example/a/b@sha256:" + "e" * 64),
        (
            "reg.example/a__b/c-d.e:v1.2_3@sha256:" + "e" * 64,
            "reg.example/a__b/c-d.e:v1.2_3@sha256:" + "e" * 64,
        ),
    ],
)
def test_registry_references_are_normalised_as_kubelet_reads_them(ref, canonical):
    assert str(parse_reference(ref)) == canonical


def test_the_oci_cache_answers_the_same_repository_only_and_digests_offline(oci_store):
    st, src = oci_store
    a = st.resolve("reg.example/team-a/disk:1")
    assert src.fetched == ["reg.example/team-a/disk:1"]
    assert st.resolve("reg.example/team-a/disk:1").path == a.path and len(src.fetched) == 1  # tag unmoved
    # another repository whose registry claims the same manifest digest is fetched from there
    st.resolve("reg.example/team-b/disk:1")
    assert src.fetched[-1] == "reg.example/team-b/disk:1"
    # a reference by digest, fetched once, boots without asking the registry again
    pinned = f"reg.example/team-a/disk@{src.digest}"
    st.resolve(pinned)
    src.offline = True
    assert st.resolve(pinned).path == a.path
    with pytest.raises(AssertionError, match="asked about"):
        st.resolve(f"reg.example/team-c/disk@{src.digest}")  # never fetched from team-c: ask


def test_an_oci_image_over_the_size_cap_is_refused_before_its_layers_are_fetched(tmp_path):
    disk = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", str(disk), "4M")
    src = RecordingSource(disk, layer_bytes=30 * 2**30)
    st = ImageStore(tmp_path / "state", container_disks=src, max_image_bytes=20 * 2**30)
    with pytest.raises(ImageError, match=r"is 30Gi, over this node's limit of 20Gi per image"):
        st.resolve("reg.example/x/disk:1")
    assert src.fetched == [] and list(st.tmp.iterdir()) == []


def test_the_disk_in_a_layout_is_bounded_by_the_size_cap(tmp_path):
    _layout(tmp_path / "l", [_layer({"disk/big.img": b"B" * 4096})])
    with pytest.raises(ImageError, match=r"the disk in the image is 4Ki, over this node's limit of 1Ki"):
        extract_disk_from_oci_layout(tmp_path / "l", tmp_path / "out", max_bytes=1024)
    assert not (tmp_path / "out").exists()


class FakeDownloads:
    """https_fetch.download as a recorder that writes ``data`` (no network)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.urls: list[str] = []

    def __call__(self, url, dst, **kw):
        self.urls.append(url)
        dst.write(self.data)
        return hashlib.sha256(self.data).hexdigest()


def test_the_https_cache_answers_the_same_url_and_digest_only(store, monkeypatch):
    st, root = store
    qemu_img("create", "-f", "qcow2", str(root / "base.qcow2"), "1M")
    data = (root / "base.qcow2").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    st.resolve(f"file://{root}/base.qcow2")  # the blob is in the cache now, from another reference
    fake = FakeDownloads(data)
    monkeypatch.setattr(https_fetch, "download", fake)
    st.resolve(f"https://unreachable.invalid/x#sha256={digest}")
    assert fake.urls == ["https://unreachable.invalid/x"]  # knowing the digest is not enough
    st.resolve(f"https://unreachable.invalid/x#sha256={digest}")
    assert len(fake.urls) == 1  # the same URL and digest: never downloaded again (offline boots)
    st.resolve(f"https://mirror.invalid/x#sha256={digest}")
    assert fake.urls[-1] == "https://mirror.invalid/x"
    # a blob recorded by an edgevirt that keyed https images by URL alone still answers its URL
    old = st._ref_file("url:https://old.invalid/x")
    old.write_text(json.dumps({"key": "url:https://old.invalid/x", "digest": digest, "format": "qcow2",
                               "virtual_size": 2**20}))  # fmt: skip
    st.resolve(f"https://old.invalid/x#sha256={digest}")
    assert "https://old.invalid/x" not in fake.urls
    with pytest.raises(ImageError) as ei:
        st.resolve(f"https://old.invalid/x#sha256={'0' * 64}")  # another digest: download, mismatch
    assert "does not match the sha256 digest" in str(ei.value) and digest not in str(ei.value)
    assert digest in ei.value.detail  # the node's log gets it
