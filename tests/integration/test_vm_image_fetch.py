"""Image store against real servers on 127.0.0.1: https download with sha256 verification (self-signed
certificate made here), no downgrade to http behind a redirect, the size cap; containerDisks from a
local registry via skopeo, every other skopeo transport refused before skopeo runs, and nothing
left in /var/tmp by a failed fetch."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers.waiting import wait_for

from cri_shim.vm import ImageError, ImageStore, SkopeoSource, ValidationError
from cri_shim.vm.oci import parse_reference

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(180)]
#: temporary folders containers/image (skopeo) makes in /var/tmp when TMPDIR does not say otherwise
SKOPEO_TMP = re.compile(r"^(oci|docker-tarfile-blob|container_images_|storage|docker-archive|dir)")


def skopeo_tmp() -> set[str]:
    return {n for n in os.listdir("/var/tmp") if SKOPEO_TMP.match(n)}


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
def http_server(disk):
    """A plain-http server on 127.0.0.1 serving the same files (the target of a downgrade)."""
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(disk.parent), **kw)

        def log_message(self, *a):
            hits.append(self.path)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def https_server(tmp_path, disk):
    """A TLS server on 127.0.0.1 serving tmp_path/www with a fresh self-signed certificate;
    ``/redirect?to=<url>`` answers 302 to that URL."""
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

        def do_GET(self):
            if self.path.startswith("/redirect?to="):
                self.send_response(302)
                self.send_header("Location", self.path.split("=", 1)[1])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

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
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()
    store = ImageStore(tmp_path / "state", ssl_context=ctx)
    with pytest.raises(ImageError, match=r"does not match the sha256 digest in its reference") as ei:
        store.resolve(f"{base}/disk.qcow2#sha256={'0' * 64}")
    assert digest not in str(ei.value) and digest in ei.value.detail  # the content's digest: the log only
    strict = ImageStore(tmp_path / "state2")  # system CAs only: the self-signed cert is refused
    with pytest.raises(ImageError, match=r"the image server cannot be reached") as ei:
        strict.resolve(f"{base}/disk.qcow2#sha256={'1' * 64}")
    assert "CERTIFICATE_VERIFY_FAILED" in ei.value.detail
    with pytest.raises(ImageError, match=r"the image server answered 404"):
        store.resolve(f"{base}/nope.qcow2#sha256={'2' * 64}")
    for s in (store, strict):
        assert list(s.blobs.iterdir()) == [] and list(s.tmp.iterdir()) == []


def test_https_redirects_stay_on_https_and_the_size_cap_holds(tmp_path, disk, https_server, http_server):
    """Finding 5: an https download followed a redirect to http (a downgrade)."""
    base, ctx, _ = https_server
    plain, plain_hits = http_server
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()
    store = ImageStore(tmp_path / "state", ssl_context=ctx)
    with pytest.raises(ImageError, match=r"redirected the download away from https"):
        store.resolve(f"{base}/redirect?to={plain}/disk.qcow2#sha256={digest}")
    assert plain_hits == []  # the http server was never asked
    img = store.resolve(f"{base}/redirect?to={base}/disk.qcow2#sha256={digest}")  # https -> https: fine
    assert img.digest == f"sha256:{digest}"
    small = ImageStore(tmp_path / "small", ssl_context=ctx, max_image_bytes=64 * 1024)
    with pytest.raises(ImageError, match=r"over this node's limit of 64Ki per image"):
        small.resolve(f"{base}/disk.qcow2#sha256={digest}")
    assert list(small.blobs.iterdir()) == [] and list(small.tmp.iterdir()) == []


@pytest.fixture(scope="module")
def vm_disk_oci():
    sys.path.insert(0, str(REPO / "deploy/images"))
    import build_vm_disk

    return build_vm_disk, build_vm_disk.build_vm_disk()


class Counting(SkopeoSource):
    """skopeo, counting what reaches it."""

    def __init__(self, insecure_registries=()):
        super().__init__(insecure_registries)
        self.inspected: list[str] = []
        self.fetched: list[str] = []

    def inspect(self, ref, timeout=60.0):
        self.inspected.append(str(ref))
        return super().inspect(ref, timeout)

    def fetch_disk(self, ref, dest, max_bytes, timeout):
        self.fetched.append(str(ref))
        super().fetch_disk(ref, dest, max_bytes, timeout)


def test_local_skopeo_transports_are_refused_before_skopeo_runs(tmp_path, vm_disk_oci):
    """Finding 4: an oci: layout outside the image roots booted; oci-archive:/etc/shadow was opened."""
    if shutil.which("skopeo") is None:
        pytest.skip("needs skopeo")
    _, d = vm_disk_oci
    src = Counting()
    store = ImageStore(tmp_path / "state", container_disks=src)
    before = skopeo_tmp()
    for ref in (
        f"oci:{d.oci_layout}:{d.tag}",
        "oci-archive:/etc/shadow",
        "docker-archive:/etc/shadow",
        "dir:/etc",
        "containers-storage:alpine",
        "docker-daemon:alpine:latest",
    ):
        with pytest.raises(
            ValidationError, match=r"uses skopeo transport .* which the kvm handler does not allow"
        ):
            store.resolve(ref)
    assert src.inspected == [] and src.fetched == []
    assert list(store.tmp.iterdir()) == [] and list(store.blobs.iterdir()) == []
    assert skopeo_tmp() <= before


@contextlib.contextmanager
def private_registry(tmp_path):
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


@pytest.fixture
def registry(tmp_path):
    with private_registry(tmp_path) as reg:
        yield reg


def test_container_disk_pushed_to_local_registry_and_pulled(tmp_path, vm_disk_oci, registry):
    if shutil.which("skopeo") is None:
        pytest.skip("needs skopeo")
    build_vm_disk, d = vm_disk_oci
    ref = f"{registry}/vm/test-disk:1"
    build_vm_disk.push(d, ref)
    src = Counting(insecure_registries=[registry])
    store = ImageStore(tmp_path / "state", container_disks=src)
    img = store.resolve(ref)
    assert img.digest == "sha256:" + hashlib.sha256(d.qcow2.read_bytes()).hexdigest()
    assert store.resolve(ref).path == img.path and len(src.fetched) == 1  # the tag did not move
    assert list(store.tmp.iterdir()) == []
    before = skopeo_tmp()
    with pytest.raises(ImageError, match=r"cannot fetch .*/vm/missing:1 from its registry") as ei:
        store.resolve(f"{registry}/vm/missing:1")
    assert "/var/tmp" not in str(ei.value)
    assert list(store.tmp.iterdir()) == [] and skopeo_tmp() <= before  # skopeo's TMPDIR was ours


def test_a_pinned_container_disk_boots_with_the_registry_gone(tmp_path, vm_disk_oci):
    if shutil.which("skopeo") is None or shutil.which("docker-registry") is None:
        pytest.skip("needs skopeo and docker-registry")
    build_vm_disk, d = vm_disk_oci
    with private_registry(tmp_path) as reg:
        build_vm_disk.push(d, f"{reg}/vm/test-disk:1")
        src = Counting(insecure_registries=[reg])
        store = ImageStore(tmp_path / "state", container_disks=src)
        pinned = f"{reg}/vm/test-disk@{src.inspect(parse_reference(f'{reg}/vm/test-disk:1')).digest}"
        img = store.resolve(pinned)
    asked = len(src.inspected)
    assert store.resolve(pinned).path == img.path and len(src.inspected) == asked  # registry gone: cached
