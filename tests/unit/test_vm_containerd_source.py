"""containerDisks from containerd's own store (cri_shim/vm/containerd_source.py and its parts), with a
fake containerd: a real gRPC server on a unix socket speaking the CRI ImageService (ImageStatus,
PullImage) and a content store directory laid out as containerd's.

* a tag is resolved in containerd's store (no pull, no registry) and the disk, cached under the
  manifest digest, is found again without taking it out twice;
* an index is resolved to its linux/amd64 manifest; every blob is verified while read: a damaged
  layer or manifest is refused and leaves nothing, a layer containerd dropped is named as such;
* an image containerd does not hold is pulled through containerd; a failed pull names the registry
  and why; containerd not answering names its socket and the kvm option;
* layers are read once, whiteouts honoured, a raw disk stays sparse; the metrics count the bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from cri_shim import protos
from cri_shim.vm import ImageError, ImageStore, image_metrics
from cri_shim.vm.containerd_images import ContainerdImages, why_pull_failed
from cri_shim.vm.containerd_source import CONTENT_BLOBS, ContainerdSource
from cri_shim.vm.disk_layers import Layer, extract_disk
from cri_shim.vm.oci import parse_reference

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (qemu-utils)"),
    pytest.mark.timeout(120),
]
api = protos.api()
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def tar_gz(files: dict[str, bytes]) -> bytes:
    return gzip.compress(tar(files))


class FakeContainerd:
    """containerd as the kvm handler sees it: CRI ImageStatus/PullImage on a unix socket, blobs in
    ``<root>/io.containerd.content.v1.content/blobs/sha256``. ``registry`` holds what a pull can get
    (name -> (manifest digest, blobs)); ``images`` what containerd holds (name -> digest)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="evctd-", dir="/tmp"))  # short: a unix socket path
        self.root = self.dir / "root"
        self.blobs = self.root / CONTENT_BLOBS
        self.blobs.mkdir(parents=True)
        self.socket = self.dir / "c.sock"
        self.registry: dict[str, tuple[str, dict[str, bytes]]] = {}
        self.images: dict[str, str] = {}
        self.configs: dict[str, str] = {}  # name -> config digest (the image ID)
        self.tag_only: set[str] = set()  # imported by tag (ctr images import): no repo digest
        self.pulls: list[str] = []
        self.statuses: list[str] = []
        self.pull_error = "failed to resolve reference: not found"
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {
            "ImageStatus": grpc.unary_unary_rpc_method_handler(
                self._status, api.ImageStatusRequest.FromString, lambda m: m.SerializeToString()
            ),
            "PullImage": grpc.unary_unary_rpc_method_handler(
                self._pull, api.PullImageRequest.FromString, lambda m: m.SerializeToString()
            ),
        }
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("runtime.v1.ImageService",
                                                                                    handlers)])  # fmt: skip
        self.server.add_insecure_port(f"unix://{self.socket}")
        self.server.start()

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (self.blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    def image(self, name: str, layers: list[bytes], *, index: bool = False, pulled: bool = True) -> str:
        """An image ``name`` made of ``layers``; in containerd's store when ``pulled``, else only in
        the registry. Returns the digest its name points at (the index's, with ``index``)."""
        blobs: dict[str, bytes] = {}

        def blob(data: bytes) -> str:
            d = f"sha256:{hashlib.sha256(data).hexdigest()}"
            blobs[d] = data
            return d

        cfg = b'{"architecture":"amd64","os":"linux"}'
        man = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(cfg),
                       "size": len(cfg)},
            "layers": [{"mediaType": LAYER, "digest": blob(x), "size": len(x)} for x in layers],
        }).encode()  # fmt: skip
        top = blob(man)
        self.configs[name] = f"sha256:{hashlib.sha256(cfg).hexdigest()}"
        if index:
            other = b'{"schemaVersion":2,"layers":[]}'  # arm64: containerd does not fetch its blobs
            idx = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
                {"mediaType": MANIFEST, "digest": f"sha256:{hashlib.sha256(other).hexdigest()}",
                 "size": len(other), "platform": {"os": "linux", "architecture": "arm64"}},
                {"mediaType": MANIFEST, "digest": top, "size": len(man),
                 "platform": {"os": "linux", "architecture": "amd64"}},
            ]}).encode()  # fmt: skip
            top = blob(idx)
        self.registry[name] = (top, blobs)
        if pulled:
            self._store(name)
        return top

    def _store(self, name: str) -> None:
        top, blobs = self.registry[name]
        for data in blobs.values():
            self.put(data)
        self.images[name] = top

    def _status(self, req, ctx):
        with self.lock:
            self.statuses.append(req.image.image)
            ref = parse_reference(req.image.image)
            hit = next((n for n in self.images if parse_reference(n).name == ref.name), None)
            if hit is None or (ref.digest and self.images[hit] != ref.digest):
                return api.ImageStatusResponse()  # what containerd answers for an unknown image
            digests = [] if hit in self.tag_only else [f"{ref.name}@{self.images[hit]}"]
            return api.ImageStatusResponse(
                image=api.Image(id=self.configs[hit], repo_tags=[hit], repo_digests=digests)
            )

    def _pull(self, req, ctx):
        with self.lock:
            self.pulls.append(req.image.image)
            name = next((n for n in self.registry if n == req.image.image), None)
            if name is None:
                ctx.abort(grpc.StatusCode.UNKNOWN, f'failed to pull and unpack image "{req.image.image}": '
                                                   f"{self.pull_error}")  # fmt: skip
            self._store(name)
            return api.PullImageResponse(image_ref="sha256:" + "c" * 64)

    def close(self) -> None:
        self.server.stop(None)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def ctd():
    c = FakeContainerd()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def disk(tmp_path) -> bytes:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "d.qcow2"), "4M"], check=True)
    return (tmp_path / "d.qcow2").read_bytes()


def store_of(ctd: FakeContainerd, tmp_path: Path, **kw) -> ImageStore:
    src = ContainerdSource(ctd.socket, ctd.root)
    return ImageStore(tmp_path / "state", container_disks=src, **kw)


def test_a_tag_is_found_in_containerds_store_and_the_disk_cached_by_manifest_digest(ctd, disk, tmp_path):
    top = ctd.image("127.0.0.1:5000/vm/d:1", [tar_gz({"etc/x": b"x"}), tar_gz({"disk/d.qcow2": disk})])
    st = store_of(ctd, tmp_path)
    extracted = image_metrics.EXTRACTED_BYTES.labels("containerd")._value.get
    before = extracted()
    img = st.resolve("127.0.0.1:5000/vm/d:1")
    assert img.path.read_bytes() == disk and img.digest == f"sha256:{hashlib.sha256(disk).hexdigest()}"
    assert extracted() - before == len(disk)  # the metric counts the disk's bytes
    assert ctd.pulls == [] and list(st.tmp.iterdir()) == []
    # the next resolve asks containerd's store only, and takes nothing out again
    assert st.resolve("127.0.0.1:5000/vm/d:1").path == img.path and extracted() - before == len(disk)
    assert ctd.statuses == ["127.0.0.1:5000/vm/d:1"] * 2 and ctd.pulls == []
    # by digest: from the cache, containerd not even asked
    asked = len(ctd.statuses)
    assert st.resolve(f"127.0.0.1:5000/vm/d@{top}").path == img.path and len(ctd.statuses) == asked


def test_an_image_imported_by_tag_only_is_found_by_its_config(ctd, disk, tmp_path):
    ctd.image("edge.invalid/vm/imported:1", [tar_gz({"disk/d.qcow2": disk})])
    ctd.tag_only.add("edge.invalid/vm/imported:1")
    (ctd.blobs / ("f" * 64)).write_bytes(b"{not json")  # other small blobs are passed over
    assert store_of(ctd, tmp_path).resolve("edge.invalid/vm/imported:1").path.read_bytes() == disk
    assert ctd.pulls == []


def test_an_index_resolves_to_its_amd64_manifest(ctd, disk, tmp_path):
    ctd.image("reg.example/vm/multi:1", [tar_gz({"disk/d.qcow2": disk})], index=True)
    assert store_of(ctd, tmp_path).resolve("reg.example/vm/multi:1").path.read_bytes() == disk


def test_an_image_containerd_lacks_is_pulled_through_it(ctd, disk, tmp_path):
    ctd.image("127.0.0.1:5000/vm/vol:2", [tar_gz({"disk/v.qcow2": disk})], pulled=False)
    st = store_of(ctd, tmp_path)
    assert st.resolve("127.0.0.1:5000/vm/vol:2").path.read_bytes() == disk
    assert ctd.pulls == ["127.0.0.1:5000/vm/vol:2"]


@pytest.mark.parametrize(
    ("containerd_says", "why"),
    [
        ("failed to resolve reference: 127.0.0.1:5000/vm/none:1: not found", "has no such image"),
        ("dial tcp 127.0.0.1:5000: connect: connection refused", "cannot be reached from this node"),
        ("unexpected status: 401 Unauthorized", "wants credentials"),
    ],
)
def test_a_failed_pull_names_the_registry_and_why(ctd, tmp_path, containerd_says, why):
    ctd.pull_error = containerd_says
    st = store_of(ctd, tmp_path)
    with pytest.raises(ImageError) as ei:
        st.resolve("127.0.0.1:5000/vm/none:1")
    msg = str(ei.value)
    assert "127.0.0.1:5000/vm/none:1 is not in containerd's image store on this node" in msg
    assert "could not pull it from registry 127.0.0.1:5000" in msg and why in msg, msg
    assert containerd_says in ei.value.detail
    assert list(st.tmp.iterdir()) == [] and list(st.blobs.iterdir()) == []


def test_containerd_not_answering_names_its_socket_option(tmp_path):
    src = ContainerdSource(tmp_path / "nothing.sock", tmp_path)
    st = ImageStore(tmp_path / "state", container_disks=src)
    with pytest.raises(ImageError, match=r"containerd does not answer.*kvm option containerd_socket"):
        st.resolve("127.0.0.1:5000/vm/d:1")


@pytest.mark.parametrize("damage", ["layer", "manifest", "missing", "short"])
def test_damaged_or_missing_blobs_are_refused_and_leave_nothing(ctd, disk, tmp_path, damage):
    top = ctd.image("127.0.0.1:5000/vm/d:1", [tar({"disk/d.qcow2": disk})])  # an uncompressed layer
    man = json.loads((ctd.blobs / top[7:]).read_bytes())
    layer = ctd.blobs / man["layers"][0]["digest"][7:]
    if damage == "layer":  # other content of the same size: the tar reads, the digest does not match
        layer.write_bytes(tar({"disk/d.qcow2": disk[:-1] + b"X"}))
    elif damage == "manifest":
        (ctd.blobs / top[7:]).write_bytes(json.dumps({**man, "layers": []}).encode())
    elif damage == "missing":
        layer.unlink()
    else:
        layer.write_bytes(layer.read_bytes()[:-10])
    st = store_of(ctd, tmp_path)
    with pytest.raises(ImageError) as ei:
        st.resolve("127.0.0.1:5000/vm/d:1")
    expect = {
        "layer": "does not match its digest",
        "manifest": "does not match its digest",
        "missing": "is not in containerd's content store",
        "short": "does not have the size the image says",
    }[damage]
    assert expect in str(ei.value), str(ei.value)
    assert str(ctd.root) not in str(ei.value)  # paths of the node go to the log only
    assert list(st.tmp.iterdir()) == [] and list(st.blobs.iterdir()) == []


def test_layers_are_read_once_with_whiteouts_and_raw_disks_stay_sparse(tmp_path):
    raw = b"\0" * (4 << 20) + b"data" + b"\0" * (4 << 20)
    layers = [
        tar_gz({"disk/old.img": b"OLD", "disk/gone.img": b"G"}),
        tar_gz({"disk/.wh..wh..opq": b"", "disk/raw.img": raw}),
    ]
    descs = [Layer(f"sha256:{hashlib.sha256(x).hexdigest()}", len(x), LAYER) for x in layers]
    blobs = dict(zip([d.digest for d in descs], layers, strict=True))
    opened: list[str] = []

    def open_blob(layer: Layer):
        opened.append(layer.digest)
        return io.BytesIO(blobs[layer.digest])

    out = tmp_path / "out.img"
    got = extract_disk(descs, open_blob, out, what="img")
    assert out.read_bytes() == raw and got.sha256 == hashlib.sha256(raw).hexdigest()
    assert opened == [d.digest for d in descs]  # each layer once
    assert out.stat().st_blocks * 512 < len(raw) // 2  # the zeros are holes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.img"]


def test_the_disk_is_bounded_by_the_size_cap_before_it_is_written(ctd, tmp_path):
    ctd.image("127.0.0.1:5000/vm/big:1", [tar_gz({"disk/big.img": b"B" * 8192})])
    st = store_of(ctd, tmp_path, max_image_bytes=4096)
    with pytest.raises(ImageError, match=r"over this node's limit of 4Ki per image"):
        st.resolve("127.0.0.1:5000/vm/big:1")
    assert list(st.tmp.iterdir()) == []


def test_pull_failures_are_told_apart():
    assert why_pull_failed("x: manifest unknown") == "the registry has no such image"
    assert "cannot be reached" in why_pull_failed("dial tcp: lookup reg.example: no such host")
    assert why_pull_failed("something else") == "containerd's pull failed"
    assert ContainerdImages(Path("/nonexistent.sock")).socket == Path("/nonexistent.sock")


def test_the_factory_points_the_image_store_at_containerd_and_ignores_insecure_registries(tmp_path):
    from cri_shim.kvm import factory

    base = {"state_dir": str(tmp_path / "s"), "cni_conflist": str(tmp_path / "c.conflist")}
    opts = factory.parse_options("kvm", base)
    assert (opts.containerd_socket, opts.containerd_root) == (
        Path("/run/containerd/containerd.sock"),
        Path("/var/lib/containerd"),
    )
    opts = factory.parse_options(
        "kvm",
        {**base, "containerd_socket": "/run/x/c.sock", "containerd_root": "/data/ctd",
         "insecure_registries": ["127.0.0.1:5000"]},
    )  # fmt: skip
    src = factory.domain_manager(opts).images.container_disks
    assert isinstance(src, ContainerdSource)
    assert (src.images.socket, src.store.root) == (Path("/run/x/c.sock"), Path("/data/ctd"))


def test_edgevirt_cri_serves_the_image_store_metrics_of_its_kvm_backend(tmp_path):
    import urllib.request

    from cri_fake import FakeBackend

    from cri_shim import cli, config

    class KvmLike(FakeBackend):
        def collectors(self):
            return image_metrics.collectors()

    cfg = config.parse(
        {
            "socket": str(tmp_path / "cri.sock"),
            "backends": {
                "containerd": {"type": "containerd", "socket": str(tmp_path / "c.sock")},
                "kvm": {"type": "plugin", "factory": "cri_fake:create"},
            },
            "handlers": {"": "containerd", "kvm": "kvm"},
        }
    )
    backends = {"containerd": FakeBackend("containerd", images=True), "kvm": KvmLike("kvm")}
    ops, readiness, _ = cli._observability(cfg, backends, {"": "containerd"}, ("127.0.0.1", 0), True)
    assert ops is not None
    try:
        host, port = ops.address
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
    finally:
        ops.stop()
        readiness.close()
    for name in ("extracted_bytes_total", "extract_seconds", "resolutions_total"):
        assert f"# HELP edgevirt_vm_image_{name} " in text, text[:2000]


def test_the_repository_digest_is_the_references_own_and_never_another_repositorys():
    from cri_shim.vm.containerd_images import LocalImage

    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    img = LocalImage(
        "sha256:" + "c" * 64, (f"other.example/x/d@{a}", f"reg.example/x/d@{a}", f"reg.example/x/d@{b}")
    )
    assert img.digest_of(parse_reference("reg.example/x/d:1")) == a
    assert img.digest_of(parse_reference(f"reg.example/x/d@{b}")) == b
    assert img.digest_of(parse_reference("third.example/x/d:1")) is None
    assert (
        LocalImage("sha256:" + "c" * 64, ("docker.io/library/alpine@" + a,)).digest_of(
            parse_reference("alpine:3")
        )
        == a
    )  # containerd's names are normalised as kubelet's
