"""The edgevirt image built by deploy/images/build-edgevirt-image: reproducible (a second, fully cold
build in another cache gives the same digest), configured as promised (user 65532, OCI labels, no
entrypoint), deterministic layers, a rootfs whose components really run (chroot as uid 65532, with
/dev and /proc), and a push to a private docker-registry on a free loopback port.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
BUILDER = REPO / "deploy" / "images" / "build-edgevirt-image"
NONROOT = "65532:65532"


def build(*args: str, cache: Path | None = None) -> dict:
    env = {**os.environ, "PYTHON": sys.executable}
    if cache is not None:
        env["EDGEVIRT_CACHE"] = str(cache)
    r = subprocess.run([str(BUILDER), "--json", *args], capture_output=True, text=True, env=env, timeout=1500)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "[image 5/" in r.stderr  # progress is shown step by step
    return json.loads(r.stdout)


def blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def manifest_and_config(image: dict) -> tuple[dict, dict]:
    layout = Path(image["layout"])
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == image["tag"]
    manifest = json.loads(blob(layout, entry["digest"]))
    return manifest, json.loads(blob(layout, manifest["config"]["digest"]))


@pytest.fixture(scope="module")
def image() -> dict:
    return build()


@pytest.fixture(scope="module")
def rootfs(image: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    bundle = tmp_path_factory.mktemp("edgevirt-image") / "bundle"
    r = subprocess.run(
        ["umoci", "unpack", "--image", f"{image['layout']}:{image['tag']}", str(bundle)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    yield bundle / "rootfs"
    shutil.rmtree(bundle, ignore_errors=True)


def in_image(root: Path, *argv: str, user: str = NONROOT, env: dict[str, str] | None = None):
    """Run argv in `root` as `user`, in private mount and pid namespaces with /dev and /proc."""
    script = 'mount --rbind /dev "$0/dev" && mount -t proc proc "$0/proc" && exec "$@"'
    environ = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/home/nonroot", **(env or {})}
    chroot = [
        "env",
        "-i",
        *[f"{k}={v}" for k, v in environ.items()],
        "chroot",
        f"--userspec={user}",
        str(root),
    ]
    cmd = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "sh", "-c", script, str(root)]
    return subprocess.run([*cmd, *chroot, *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(1800)
def test_same_inputs_same_digest(image: dict, tmp_path: Path) -> None:
    assert build()["digest"] == image["digest"]  # from the cache
    # Twice from nothing (wheel, mmdebstrap rootfs, layers, layout), in two caches, one after the other
    # (not against the cached image: the Debian mirror moves on between an old cache and today).
    digests, layouts = [], []
    try:
        for name in ("cold-a", "cold-b"):
            cold = build("--no-cache", cache=tmp_path / name)
            digests.append(cold["digest"])
            layouts.append(cold["layout"])
    finally:
        for name in ("cold-a", "cold-b"):
            shutil.rmtree(tmp_path / name, ignore_errors=True)
    assert layouts[0] != layouts[1]
    assert digests[0] == digests[1]


@pytest.mark.timeout(1500)
def test_config_user_labels_and_layers(image: dict) -> None:
    manifest, config = manifest_and_config(image)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    labels = config["config"]["Labels"]
    assert config["config"]["User"] == NONROOT
    assert "Entrypoint" not in config["config"]
    assert (
        labels["org.opencontainers.image.version"] == image["tag"] == Path(image["wheel"]).name.split("-")[1]
    )
    assert labels["org.opencontainers.image.revision"].split("-")[0] == head.stdout.strip()
    assert labels["org.opencontainers.image.source"]
    assert [la["digest"] for la in manifest["layers"]] == [la["digest"] for la in image["layers"]]
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"]) == 3
    assert all(la["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip" for la in manifest["layers"])


@pytest.mark.timeout(1500)
def test_layers_are_normalised(image: dict) -> None:
    layout = Path(image["layout"])
    _, config = manifest_and_config(image)
    pyc = 0
    for layer in image["layers"]:
        data = blob(layout, layer["digest"])
        assert data[4:8] == b"\0\0\0\0", "gzip header mtime must be 0"
        with tarfile.open(fileobj=gzip.GzipFile(fileobj=io.BytesIO(data)), mode="r|") as tar:
            names, mtimes, unames, timestamped = [], set(), set(), []
            for m in tar:
                names.append(m.name)
                mtimes.add(m.mtime)
                unames.add((m.uname, m.gname))
                if m.name.endswith(".pyc"):
                    f = tar.extractfile(m)
                    assert f is not None
                    # PEP 552 flags: 0b01 = hash-based, source not checked (no timestamp in it)
                    if int.from_bytes(f.read(8)[4:8], "little") != 0b01:
                        timestamped.append(m.name)
        assert names == sorted(names)
        assert len(mtimes) == 1 and unames == {("", "")}
        assert not timestamped, f"byte-code with timestamps: {timestamped[:5]}"
        pyc += sum(n.endswith(".pyc") for n in names)
    assert pyc, "the image ships byte-code (its pods run with a read-only root and cannot write it)"
    assert config["created"].endswith("Z")


@pytest.mark.timeout(1500)
def test_rootfs_is_slim(rootfs: Path) -> None:
    docs = [p for p in (rootfs / "usr/share/doc").rglob("*") if p.is_file() and p.name != "copyright"]
    assert not docs
    for empty in ("usr/share/man", "usr/share/locale", "var/lib/apt/lists", "var/cache/apt"):
        assert not any(p.is_file() for p in (rootfs / empty).rglob("*")), empty
    assert (rootfs / "etc/ssl/certs/ca-certificates.crt").stat().st_size > 100_000
    status = (rootfs / "var/lib/dpkg/status").read_text()
    assert "Package: python3-libvirt\nStatus: install ok installed" in status
    assert "nonroot:x:65532:65532:" in (rootfs / "etc/passwd").read_text()


@pytest.mark.timeout(1500)
def test_components_run_in_the_rootfs(rootfs: Path, image: dict) -> None:
    code = (
        "import cri_shim, vmcrd, cni_macvtap, runtimeclass, libvirt; "
        "from cri_shim import protos, runtime_status"
    )
    r = in_image(
        rootfs,
        "python3",
        "-c",
        code + "; print(protos.api().VersionResponse().DESCRIPTOR.name, runtime_status.VERSION)",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["VersionResponse", image["tag"]]
    for argv, expect in [
        (["edgevirt-controller", "--help"], "usage: edgevirt-controller"),
        (["kubectl-vm", "--help"], "usage: kubectl vm"),
        (["edgevirt-cri", "--help"], "usage: edgevirt-cri"),
        (["qemu-img", "--version"], "qemu-img version"),
        (["ip", "-V"], "ip utility"),
        (["qemu-system-x86_64", "--version"], "QEMU emulator"),
    ]:
        r = in_image(rootfs, *argv)
        assert r.returncode == 0 and r.stdout.startswith(expect), (argv, r.stdout, r.stderr)
    r = in_image(rootfs, "macvtap", env={"CNI_COMMAND": "VERSION"})
    assert r.returncode == 0 and "supportedVersions" in json.loads(r.stdout), r.stderr
    r = in_image(rootfs, "python3", "-m", "runtimeclass.probe", "--no-cache", "--timeout", "20")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tcg"]["ok"], r.stdout  # QEMU and its firmware work in the image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A private docker-registry on a free loopback port with its own storage; stopped afterwards."""
    addr = f"127.0.0.1:{free_port()}"
    cfg = tmp_path / "registry.yml"
    cfg.write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'storage'}\n"
        f"http:\n  addr: {addr}\nlog:\n  level: warn\n"
    )
    log = (tmp_path / "registry.log").open("w")
    proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{addr}/v2/", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "registry.log"
                ).read_text()
                time.sleep(0.2)
        yield addr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.timeout(1500)
def test_push_to_a_registry(image: dict, registry: str) -> None:
    pushed = build("--push", registry)
    assert pushed["digest"] == image["digest"]
    assert pushed["pushed"] == {
        "target": f"{registry}/edgevirt/edgevirt:{image['tag']}",
        "digest": image["digest"],
    }
    r = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{registry}/edgevirt/edgevirt:{image['tag']}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["Digest"] == image["digest"]
    assert info["Labels"]["org.opencontainers.image.version"] == image["tag"]
    assert len(info["Layers"]) == 3
