"""Builds the images critest (cri-tools v1.34) pulls, from Debian's busybox-static, and pushes them to
the local registry under their upstream names (containerd mirrors registry.k8s.io and gcr.io to
127.0.0.1:5000/<path>), so critest's pulls are real pulls with no internet.

Built: registry.k8s.io/e2e-test-images/busybox:1.29-2 (default test image), e2e-test-images/nginx:1.14-2
and gcr.io/k8s-staging-cri-tools/hostnet-nginx-amd64 (busybox httpd on :80 / :12003 serving a page),
and gcr.io/k8s-staging-cri-tools/test-image-* (tags, three distinct images, USER variants, a user with
a predefined supplementary group). Not buildable: test-image-digest@sha256:9700f9a2... (a digest of
upstream bytes); critest's "digest" tests are skipped for both endpoints.

Usage: python deploy/cri/critest_images.py [--force]  (an image already in the registry is kept)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy" / "local"))

from localcluster import images  # noqa: E402

E2E = "e2e-test-images"
STAGING = "k8s-staging-cri-tools"
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "www-data:x:33:33:www-data:/var/www:/bin/false\n"
    "user1000:x:1000:1000::/home:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/:/bin/false\n"
)
GROUP = "root:x:0:\nwww-data:x:33:\nuser1000:x:1000:\ngroup50000:x:50000:user1000\nnogroup:x:65534:\n"


def _rootfs(root: Path, www: str | None = None) -> None:
    images._busybox_rootfs(root)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    if www is not None:
        (root / "www").mkdir()
        (root / "www" / "index.html").write_text(www)


def _web(port: int) -> list[str]:
    script = f"mkdir -p /var/run && echo $$ > /var/run/nginx.pid && exec httpd -f -p {port} -h /www"
    return [
        "--config.entrypoint",
        "sh",
        "--config.entrypoint",
        "-c",
        "--config.entrypoint",
        script,
        "--config.exposedports",
        f"{port}/tcp",
    ]


# repo -> (tags, umoci config args, page served or None)
IMAGES: dict[str, tuple[list[str], list[str], str | None]] = {
    f"{E2E}/busybox": (["1.29-2"], ["--config.cmd", "sh"], None),
    # nginx stand-ins: busybox httpd, pid written where nginx writes it (critest's HostPID test reads it).
    f"{E2E}/nginx": (["1.14-2"], _web(80), "<html><body>edgevirt test web server</body></html>\n"),
    f"{STAGING}/hostnet-nginx-amd64": (
        ["latest"],
        _web(12003),
        "<html><body>edgevirt hostnet</body></html>\n",
    ),
    f"{STAGING}/test-image-latest": (["latest"], ["--config.cmd", "sh"], None),
    f"{STAGING}/test-image-tag": (["test", "all"], ["--config.cmd", "sh"], None),
    f"{STAGING}/test-image-tags": (["1", "2", "3"], ["--config.cmd", "sh"], None),
    f"{STAGING}/test-image-1": (
        ["latest"],
        ["--config.cmd", "sh", "--config.label", "edgevirt.test=1"],
        None,
    ),
    f"{STAGING}/test-image-2": (
        ["latest"],
        ["--config.cmd", "sh", "--config.label", "edgevirt.test=2"],
        None,
    ),
    f"{STAGING}/test-image-3": (
        ["latest"],
        ["--config.cmd", "sh", "--config.label", "edgevirt.test=3"],
        None,
    ),
    f"{STAGING}/test-image-user-uid": (["latest"], ["--config.cmd", "sh", "--config.user", "1002"], None),
    f"{STAGING}/test-image-user-username": (
        ["latest"],
        ["--config.cmd", "sh", "--config.user", "www-data"],
        None,
    ),
    f"{STAGING}/test-image-user-uid-group": (
        ["latest"],
        ["--config.cmd", "sh", "--config.user", "1003:1003"],
        None,
    ),
    f"{STAGING}/test-image-user-username-group": (
        ["latest"],
        ["--config.cmd", "sh", "--config.user", "www-data:www-data"],
        None,
    ),
    f"{STAGING}/test-image-predefined-group": (
        ["latest"],
        ["--config.cmd", "sh", "--config.user", "1000"],
        None,
    ),
}


PATH_ENV = ["--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


def ensure(force: bool = False) -> list[str]:
    """Build and push what is missing (everything with force); returns the repos pushed."""
    pushed = []
    for repo, (tags, config, www) in IMAGES.items():
        if not force and all(images.in_registry(repo, t) for t in tags):
            continue
        config = PATH_ENV + config
        with tempfile.TemporaryDirectory(prefix="critest-img-") as d:
            root, layout = Path(d) / "rootfs", Path(d) / "layout"
            _rootfs(root, www)
            images.build_oci(root, layout, "img", config)
            images.push(layout, "img", repo, tags)
        print(f"[critest-images] pushed {repo}:{','.join(tags)}", flush=True)
        pushed.append(repo)
    return pushed


if __name__ == "__main__":
    ensure(force="--force" in sys.argv)
    print("[critest-images] all critest images are in the local registry")
