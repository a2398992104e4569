"""Secret user data from the cloud-init mount: read only from a volume of this very pod under kubelet's
root (as kubelet lays out a Secret volume, with its ``..data`` symlinks), bounded, text; a hostPath,
another pod's volume, a subPath or a symlink out of the volume is refused naming the mount, with the
host paths only in the detail for the node's log."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cri_shim.kvm.contract import CLOUD_INIT_SECRET_PATH
from cri_shim.kvm.userdata import Mount, cloud_init_mount, read_user_data
from cri_shim.vm.errors import ValidationError

UID = "6f1c2d4e-0000-4000-8000-000000000001"
OTHER = "6f1c2d4e-0000-4000-8000-000000000002"


def secret_volume(
    kubelet: Path, uid: str, name: str = "cloud-init", data: bytes = b"#cloud-config\n{}\n"
) -> Path:
    """A Secret volume as kubelet's atomic writer makes it: files behind ``..data`` symlinks."""
    vol = kubelet / "pods" / uid / "volumes" / "kubernetes.io~secret" / name
    ts = vol / "..2026_01_01_00_00_00.000000001"
    ts.mkdir(parents=True)
    (ts / "userdata").write_bytes(data)
    (vol / "..data").symlink_to(ts.name)
    (vol / "userdata").symlink_to("..data/userdata")
    return vol


def mount(host: Path | str) -> Mount:
    return Mount(CLOUD_INIT_SECRET_PATH, str(host), readonly=True)


def test_the_secret_of_this_pod_is_read(tmp_path):
    vol = secret_volume(tmp_path, UID, data="#cloud-config\npassword: s3cr3t ✓\n".encode())
    assert read_user_data(mount(vol), tmp_path, UID) == "#cloud-config\npassword: s3cr3t ✓\n"
    assert cloud_init_mount([Mount("/data", "/x"), mount(vol)]) == mount(vol)
    assert cloud_init_mount([Mount("/data", "/x")]) is None
    with pytest.raises(ValidationError, match="is mounted twice"):
        cloud_init_mount([mount(vol), mount(vol)])


@pytest.mark.parametrize(
    "where",
    ["another pod", "host path", "subpath", "pod dir itself", "relative"],
)
def test_a_mount_that_is_not_a_volume_of_this_pod_is_refused(tmp_path, where):
    other = secret_volume(tmp_path, OTHER)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "userdata").write_text("root:x:0:0\n")
    subpath = tmp_path / "pods" / UID / "volume-subpaths" / "cloud-init" / "compute" / "0"
    subpath.mkdir(parents=True)
    (subpath / "userdata").write_text("x")
    host = {
        "another pod": other,
        "host path": tmp_path / "etc",
        "subpath": subpath,
        "pod dir itself": tmp_path / "pods" / UID,
        "relative": "pods/" + UID + "/volumes/x",
    }[where]
    with pytest.raises(ValidationError) as ei:
        read_user_data(mount(host), tmp_path, UID)
    msg = str(ei.value)
    assert msg.startswith(
        f"config.mounts[{CLOUD_INIT_SECRET_PATH}]: is not a volume of this pod; mount a Secret"
    )
    assert str(tmp_path) not in msg and str(host) in ei.value.detail


def test_a_symlink_out_of_the_volume_is_refused(tmp_path):
    vol = tmp_path / "pods" / UID / "volumes" / "kubernetes.io~empty-dir" / "x"
    vol.mkdir(parents=True)
    (tmp_path / "shadow").write_text("secret of the node")
    (vol / "userdata").symlink_to(tmp_path / "shadow")
    with pytest.raises(ValidationError, match=r"the key userdata leads out of the pod's volume") as ei:
        read_user_data(mount(vol), tmp_path, UID)
    assert "secret of the node" not in str(ei.value) and str(tmp_path / "shadow") not in str(ei.value)


def test_size_type_and_encoding(tmp_path):
    vol = secret_volume(tmp_path, UID, data=b"x" * (64 * 1024 + 1))
    with pytest.raises(ValidationError, match=r"the user data is over 65536 bytes; shorten it"):
        read_user_data(mount(vol), tmp_path, UID)
    assert len(read_user_data(mount(vol), tmp_path, UID, max_bytes=70000)) == 64 * 1024 + 1
    vol2 = secret_volume(tmp_path, UID, name="gz", data=b"\x1f\x8b\x08\x00\xff")
    with pytest.raises(ValidationError, match=r"is not UTF-8 text"):
        read_user_data(mount(vol2), tmp_path, UID)
    fifo_vol = tmp_path / "pods" / UID / "volumes" / "kubernetes.io~empty-dir" / "f"
    fifo_vol.mkdir(parents=True)
    os.mkfifo(fifo_vol / "userdata")
    with pytest.raises(ValidationError, match=r"is not a regular file"):
        read_user_data(mount(fifo_vol), tmp_path, UID)  # never blocks on a FIFO
    empty = tmp_path / "pods" / UID / "volumes" / "kubernetes.io~secret" / "empty"
    empty.mkdir(parents=True)
    with pytest.raises(ValidationError, match=r"the Secret has no key userdata; put the user data under"):
        read_user_data(mount(empty), tmp_path, UID)
