"""Image store against real servers on 127.0.0.1: https download with sha256 verification (self-signed
certificate made here), containerDisk from an OCI layout and from a local registry via skopeo."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers.waiting import wait_for

from cri_shim.vm import ImageError, ImageStore, SkopeoSource

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(180)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def disk(tmp_path) -> Path:
    p = tmp_path / "www" / "disk.qcow2"
    p.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "16M"], check=True, timeout=60)
    return p


@pytest.fixture
def https_server(tmp_path, disk):
    """A TLS server on 127.0.0.1 serving tmp_path/www with a fresh self-signed certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
         "-out", str(cert), "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(disk.parent), **kw)

        def log_message(self, *a):
            hits.append(self.path)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    srv.socket = sctx.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"https://127.0.0.1:{srv.server_address[1]}", ssl.create_default_context(cafile=str(cert)), hits
    finally:
        srv.shutdown()
        srv.server_close()


def test_https_download_verified_and_cached(tmp_path, disk, https_server):
    base, ctx, hits = https_server
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()
    store = ImageStore(tmp_path / "state", ssl_context=ctx)
    progress: list[tuple[int, int | None]] = []
    img = store.resolve(f"{base}/disk.qcow2#sha256={digest}", progress=lambda d, t: progress.append((d, t)))
    assert img.digest == f"sha256:{digest}" and img.format == "qcow2"
    assert progress and progress[-1] == (disk.stat().st_size, disk.stat().st_size)
    n = len(hits)
    assert store.resolve(f"{base}/disk.qcow2#sha256={digest}").path == img.path
    assert len(hits) == n  # served from the content-addressed cache


def test_https_digest_mismatch_and_untrusted_cert_leave_nothing(tmp_path, disk, https_server):
    base, ctx, _ = https_server
    store = ImageStore(tmp_path / "state", ssl_context=ctx)
    with pytest.raises(ImageError, match=r"sha256 mismatch .* expected 0{64}"):
        store.resolve(f"{base}/disk.qcow2#sha256={'0' * 64}")
    strict = ImageStore(tmp_path / "state2")  # system CAs only: the self-signed cert is refused
    with pytest.raises(ImageError, match=r"download of .* failed: .*CERTIFICATE_VERIFY_FAILED"):
        strict.resolve(f"{base}/disk.qcow2#sha256={'1' * 64}")
    with pytest.raises(ImageError, match=r"download of .* failed"):
        store.resolve(f"{base}/nope.qcow2#sha256={'2' * 64}")
    for s in (store, strict):
        assert list(s.blobs.iterdir()) == [] and list(s.tmp.iterdir()) == []


@pytest.fixture(scope="module")
def vm_disk_oci():
    sys.path.insert(0, str(REPO / "deploy/images"))
    import build_vm_disk

    return build_vm_disk, build_vm_disk.build_vm_disk()


def test_container_disk_from_oci_layout_with_skopeo(tmp_path, vm_disk_oci):
    if shutil.which("skopeo") is None:
        pytest.skip("needs skopeo")
    _, d = vm_disk_oci
    fetched: list[str] = []

    class Counting(SkopeoSource):
        def fetch_disk(self, ref, dest, progress=None):
            fetched.append(ref)
            super().fetch_disk(ref, dest, progress)

    store = ImageStore(tmp_path / "state", container_disks=Counting())
    ref = f"oci:{d.oci_layout}:{d.tag}"
    assert store.container_disks.manifest_digest(ref) == d.manifest_digest
    img = store.resolve(ref)
    assert img.digest == "sha256:" + hashlib.sha256(d.qcow2.read_bytes()).hexdigest()
    assert img.format == "qcow2"
    assert list(store.tmp.iterdir()) == []
    assert store.resolve(ref).path == img.path
    assert fetched == [ref]  # the second resolve found the manifest digest in the cache
    with pytest.raises(ImageError, match=r"skopeo copy .* failed"):
        store.resolve(f"oci:{tmp_path}/no-layout:1")
    assert list(store.tmp.iterdir()) == []


@pytest.fixture
def registry(tmp_path):
    """A private docker-registry (distribution) on 127.0.0.1:<free port>, storage in tmp_path."""
    exe = shutil.which("docker-registry")
    if exe is None:
        pytest.skip("needs docker-registry (Debian package docker-registry)")
    port = free_port()
    cfg = tmp_path / "registry.yml"
    cfg.write_text(
        "version: 0.1\nlog: {level: error}\n"
        f"storage: {{filesystem: {{rootdirectory: {tmp_path / 'regdata'}}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
    )
    proc = subprocess.Popen([exe, "serve", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def answers() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode()
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    try:
        wait_for(f"the registry on 127.0.0.1:{port}", answers, 20, 0.1, retry_on=(OSError,))
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_container_disk_pushed_to_local_registry_and_pulled(tmp_path, vm_disk_oci, registry):
    if shutil.which("skopeo") is None:
        pytest.skip("needs skopeo")
    build_vm_disk, d = vm_disk_oci
    ref = f"{registry}/vm/test-disk:1"
    build_vm_disk.push(d, ref)
    store = ImageStore(tmp_path / "state", container_disks=SkopeoSource(insecure_registries=[registry]))
    img = store.resolve(ref)
    assert img.digest == "sha256:" + hashlib.sha256(d.qcow2.read_bytes()).hexdigest()
    assert store.container_disks.manifest_digest(ref) is not None  # skopeo inspect, no TLS to loopback
    with pytest.raises(ImageError, match=r"skopeo copy docker://.*/vm/missing:1 failed"):
        store.resolve(f"{registry}/vm/missing:1")
