"""Test images built on this machine and pushed to the local registry, so that pulls are real pulls:
busybox (from Debian's busybox-static) and the pod sandbox "pause" image (compiled from the
pause.c of the pinned Kubernetes module). Each is a proper OCI image made with umoci and pushed with
skopeo; an image already in the registry is not pushed again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from .paths import REGISTRY_ADDR, VERSIONS, Paths

BUSYBOX = "/bin/busybox"


def _say(msg: str) -> None:
    print(f"[up] {msg}", flush=True)


def in_registry(repo: str, tag: str) -> bool:
    req = urllib.request.Request(
        f"http://{REGISTRY_ADDR}/v2/{repo}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def build_oci(rootfs: Path, layout: Path, tag: str, config: list[str]) -> None:
    """An OCI image layout at `layout` with one layer holding `rootfs`, tagged `tag`."""
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", f"{layout}:{tag}")
    _run("umoci", "insert", "--image", f"{layout}:{tag}", str(rootfs), "/")
    _run(
        "umoci",
        "config",
        "--image",
        f"{layout}:{tag}",
        "--os",
        "linux",
        "--architecture",
        "amd64",
        "--author",
        "edgevirt deploy/local",
        *config,
    )
    _run("umoci", "gc", "--layout", str(layout))


def push(layout: Path, tag: str, repo: str, tags: list[str]) -> None:
    for t in tags:
        _run(
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"oci:{layout}:{tag}",
            f"docker://{REGISTRY_ADDR}/{repo}:{t}",
        )


def busybox_version() -> str:
    out = subprocess.run([BUSYBOX], capture_output=True, text=True).stdout
    # "BusyBox v1.35.0 (Debian 1:1.35.0-4+b3) multi-call binary."
    word = out.split()[1] if out.startswith("BusyBox v") else "v0"
    return word.lstrip("v")


def _busybox_rootfs(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox":
            os.symlink("busybox", root / "bin" / a)
    for d in ("etc", "tmp", "proc", "sys", "dev", "root", "var"):
        (root / d).mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")


def _pause_source() -> Path:
    k8s = VERSIONS["K8S_VERSION"]
    modcache = subprocess.run(
        ["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True
    ).stdout.strip()
    src = Path(modcache) / f"k8s.io/kubernetes@{k8s}" / "build/pause/linux/pause.c"
    if not src.exists():
        with tempfile.TemporaryDirectory() as d:
            subprocess.run(
                ["go", "mod", "download", f"k8s.io/kubernetes@{k8s}"],
                cwd=d,
                check=True,
                capture_output=True,
                env={**os.environ, "GOFLAGS": "-mod=mod"},
            )
    return src


def _pause_rootfs(root: Path) -> None:
    root.mkdir(parents=True)
    _run(
        "gcc",
        "-Os",
        "-static",
        "-Wall",
        "-DVERSION=v3.10-edgevirt",
        "-o",
        str(root / "pause"),
        str(_pause_source()),
    )
    _run("strip", str(root / "pause"))


IMAGES = {
    # repo: (tags, rootfs builder, umoci config args)
    "library/busybox": (
        lambda: [busybox_version(), "latest"],
        _busybox_rootfs,
        ["--config.cmd", "sh", "--config.env", "PATH=/bin"],
    ),
    "pause": (lambda: ["3.10"], _pause_rootfs, ["--config.entrypoint", "/pause"]),
}


def ensure_images(paths: Paths) -> None:
    """Build and push every test image the registry does not have yet."""
    for repo, (tags_of, make_rootfs, config) in IMAGES.items():
        tags = tags_of()
        if all(in_registry(repo, t) for t in tags):
            continue
        _say(f"building image {REGISTRY_ADDR}/{repo}:{tags[0]} (OCI, umoci) and pushing it")
        with tempfile.TemporaryDirectory(prefix="edgevirt-img-") as d:
            rootfs, layout = Path(d) / "rootfs", Path(d) / "layout"
            make_rootfs(rootfs)
            build_oci(rootfs, layout, tags[0], config)
            push(layout, tags[0], repo, tags)


def describe() -> str:
    return json.dumps({repo: tags_of() for repo, (tags_of, _, _) in IMAGES.items()})
