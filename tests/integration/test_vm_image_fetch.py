"""Image store against real servers on 127.0.0.1: https download with sha256 verification (self-signed
certificate made here), no downgrade to http behind a redirect, the size cap; containerDisks from a
real containerd's image store (a private containerd pulling from a private registry): taken out of
containerd's content store, found again by tag with the registry stopped, an image name that
resolves only through containerd's hosts.toml mirror, a missing image naming the registry; every
other skopeo transport refused before any source is asked."""

from __future__ import annotations

import contextlib
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

from cri_shim.vm import ContainerdSource, ImageError, ImageStore, ValidationError

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


class Counting:
    """A containerDisk source, counting what reaches it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.inspected: list[str] = []
        self.fetched: list[str] = []

    def inspect(self, ref, timeout):
        self.inspected.append(str(ref))
        return self.inner.inspect(ref, timeout)

    def fetch_disk(self, ref, dest, max_bytes, timeout):
        self.fetched.append(str(ref))
        return self.inner.fetch_disk(ref, dest, max_bytes, timeout)


def test_local_skopeo_transports_are_refused_before_any_source_is_asked(tmp_path, vm_disk_oci):
    """Finding 4: an oci: layout outside the image roots booted; oci-archive:/etc/shadow was opened."""
    _, d = vm_disk_oci
    src = Counting(ContainerdSource(tmp_path / "no-containerd.sock", tmp_path))
    store = ImageStore(tmp_path / "state", container_disks=src)
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


@contextlib.contextmanager
def private_registry(tmp_path, port: int | None = None):
    """A private docker-registry (distribution) on 127.0.0.1:<port> (a free one), storage in tmp_path."""
    exe = shutil.which("docker-registry")
    if exe is None:
        pytest.skip("needs docker-registry (Debian package docker-registry)")
    port = port or free_port()
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


def hosts_toml(ctd, name: str, registry: str) -> None:
    """containerd's registry config for ``name``: pulled over plain http from ``registry``."""
    d = ctd.paths.etc / "containerd" / "certs.d" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(
        f'server = "http://{registry}"\n\n[host."http://{registry}"]\n'
        '  capabilities = ["pull", "resolve"]\n  skip_verify = true\n'
    )


@pytest.fixture
def containerd():
    """A private containerd (its own root, socket and content store), removed afterwards."""
    from helpers.containerd import PrivateContainerd
    from helpers.root import require_root

    require_root("runs a private containerd")
    if shutil.which("containerd") is None:
        pytest.skip("needs containerd")
    ctd = PrivateContainerd.create()
    try:
        yield ctd.start()
    finally:
        ctd.close()


def test_container_disks_come_from_containerds_store_and_boot_with_the_registry_gone(
    tmp_path, vm_disk_oci, containerd
):
    build_vm_disk, d = vm_disk_oci
    with private_registry(tmp_path) as reg:
        hosts_toml(containerd, reg, reg)
        hosts_toml(containerd, "mirror.edgevirt.invalid", reg)  # a name only containerd's config resolves
        ref = f"{reg}/vm/test-disk:1"
        build_vm_disk.push(d, ref)
        src = Counting(ContainerdSource(containerd.socket, containerd.paths.data / "containerd"))
        store = ImageStore(tmp_path / "state", container_disks=src)
        img = store.resolve(ref)  # not in containerd's store: containerd pulls it
        assert img.digest == "sha256:" + hashlib.sha256(d.qcow2.read_bytes()).hexdigest()
        assert len(src.fetched) == 1 and list(store.tmp.iterdir()) == []
        mirrored = store.resolve("mirror.edgevirt.invalid/vm/test-disk:1")
        assert mirrored.path == img.path  # the same disk, taken out again for that repository
        with pytest.raises(ImageError) as ei:
            store.resolve(f"{reg}/vm/missing:1")
        assert f"could not pull it from registry {reg}: the registry has no such image" in str(ei.value)
    # the registry is gone: the tag is found in containerd's store, the disk in the cache
    fetched = len(src.fetched)
    assert store.resolve(ref).path == img.path and len(src.fetched) == fetched
    with pytest.raises(ImageError) as ei:
        store.resolve(f"{reg}/vm/other:1")
    assert f"registry {reg}: the registry cannot be reached from this node" in str(ei.value), str(ei.value)
    # a containerd that lost the image (e.g. image GC) pulls it again once the registry is back;
    # a disk already cached is not taken out again
    assert containerd.ctr("images", "rm", ref).returncode == 0
    with private_registry(tmp_path, int(reg.rsplit(":", 1)[1])):
        assert store.resolve(ref).path == img.path and len(src.fetched) == fetched
