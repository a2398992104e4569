"""A private containerd for the macvtap CNI test: temp root/state/socket, our CNI bin and conf dirs, and a
locally built sandbox ("pause") image imported from an OCI layout (nothing is pulled from outside)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

PAUSE_IMAGE = "docker.io/edgevirt/cni-test-pause:1"


def _blob(out: tarfile.TarFile, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    out.addfile(info, io.BytesIO(data))
    return f"sha256:{digest}"


def build_pause_image(path: Path) -> None:
    """An OCI image archive whose only file is busybox-static, running `sleep` as the sandbox process."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer:
        for d in ("bin", "dev", "proc", "sys", "etc"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            layer.addfile(info)
        layer.add("/bin/busybox", arcname="bin/busybox")
    raw = layer_buf.getvalue()
    gz = gzip.compress(raw, mtime=0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(raw).hexdigest()}"]},
    }
    with tarfile.open(path, "w") as out:
        layer_digest = _blob(out, gz)
        cfg = json.dumps(config).encode()
        cfg_digest = _blob(out, cfg)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest,
                           "size": len(cfg)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": layer_digest, "size": len(gz)}],
            }
        ).encode()  # fmt: skip
        man_digest = _blob(out, manifest)
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": man_digest,
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": PAUSE_IMAGE,
                        "org.opencontainers.image.ref.name": "1",
                    },
                }
            ],
        }
        for name, data in (
            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
            ("index.json", json.dumps(index).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


class Containerd:
    """containerd started in a given network namespace with everything under one temp dir."""

    def __init__(self, tmp: Path, netns: str, bin_dir: Path, conf_dir: Path) -> None:
        self.tmp = tmp
        self.netns = netns
        self.socket = tmp / "containerd.sock"
        self.config = tmp / "containerd.toml"
        self.config.write_text(
            f"""version = 2
root = "{tmp / "root"}"
state = "{tmp / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{tmp / "containerd-ttrpc.sock"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # root lacks CAP_SYS_RESOURCE on these machines: negative oom_score_adj fails inside runc
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin_dir}"
    conf_dir = "{conf_dir}"
    max_conf_num = 1
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.tmp / "containerd.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "containerd", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while self.ctr("version").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("containerd did not come up:\n" + self.log()[-3000:])
            time.sleep(0.2)

    def log(self) -> str:
        return (self.tmp / "containerd.log").read_text(errors="replace")

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", str(self.socket), "-n", "k8s.io", *args], capture_output=True, text=True
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
