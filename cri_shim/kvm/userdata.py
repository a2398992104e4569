"""Secret cloud-init user data, from the Secret mounted into the VM pod's container.

The controller mounts the VM's Secret at :data:`~.contract.CLOUD_INIT_SECRET_PATH` in the VM pod's
container; kubelet passes the mount to ``CreateContainer`` (``ContainerConfig.mounts``) with the host
path of the volume it made, ``<kubelet root>/pods/<pod uid>/volumes/kubernetes.io~secret/<name>``.
The handler reads the user data from ``<host path>/userdata`` and never stores it in a record; it
goes only into the VM's seed ISO (0600).

The pod's author chooses its volumes, so the mount is not trusted either: its host path must lie,
after resolving symlinks, under kubelet's volume folder of *this* pod (a ``hostPath`` volume, a
``subPath`` or another pod's folder is refused), the file too (the ``..data`` symlinks kubelet makes
inside a Secret volume are fine), it must be a regular file, at most 64 KiB (cloud-init's NoCloud
practice) of UTF-8 text. The file is opened without following a last symlink and checked again
through the open descriptor, so a swap between check and open reads nothing outside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ..vm.errors import ValidationError
from .contract import CLOUD_INIT_SECRET_KEY, CLOUD_INIT_SECRET_PATH, MAX_USER_DATA, UID_RE

FIELD = f"config.mounts[{CLOUD_INIT_SECRET_PATH}]"
DEFAULT_KUBELET_ROOT = Path("/var/lib/kubelet")


@dataclasses.dataclass(frozen=True)
class Mount:
    """A CRI ``Mount`` as the handler uses it."""

    container_path: str
    host_path: str
    readonly: bool = False


def cloud_init_mount(mounts: Iterable[Mount]) -> Mount | None:
    """The mount of the cloud-init Secret, if the container has one (exactly one allowed)."""
    found = [m for m in mounts if m.container_path.rstrip("/") == CLOUD_INIT_SECRET_PATH]
    if len(found) > 1:
        raise ValidationError(FIELD, "is mounted twice", "mount the VM's cloud-init Secret once")
    return found[0] if found else None


def _refuse(problem: str, detail: str) -> ValidationError:
    return ValidationError(
        FIELD,
        problem,
        f"mount a Secret volume of the pod there, without subPath, with the key {CLOUD_INIT_SECRET_KEY}",
        detail=detail,
    )


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def read_user_data(mount: Mount, kubelet_root: Path, pod_uid: str, max_bytes: int = MAX_USER_DATA) -> str:
    """The user data of the Secret mounted by ``mount`` into a container of pod ``pod_uid``."""
    if not UID_RE.fullmatch(pod_uid):
        raise _refuse("the pod has no usable UID", f"pod uid {pod_uid!r}")
    allowed = os.path.realpath(kubelet_root / "pods" / pod_uid / "volumes")
    host = mount.host_path
    if not host.startswith("/") or not _inside(os.path.realpath(host), allowed):
        raise _refuse("is not a volume of this pod", f"host path {host!r}, allowed under {allowed}")
    wanted = os.path.realpath(os.path.join(host, CLOUD_INIT_SECRET_KEY))
    if not _inside(wanted, allowed):
        raise _refuse(
            f"the key {CLOUD_INIT_SECRET_KEY} leads out of the pod's volume",
            f"{host}/{CLOUD_INIT_SECRET_KEY} -> {wanted}",
        )
    try:
        fd = os.open(wanted, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ValidationError(
            FIELD,
            f"the Secret has no key {CLOUD_INIT_SECRET_KEY}",
            f"put the user data under the key {CLOUD_INIT_SECRET_KEY}",
        ) from None
    except OSError as e:
        raise _refuse(f"the key {CLOUD_INIT_SECRET_KEY} cannot be read", f"{wanted}: {e}") from None
    with contextlib.closing(os.fdopen(fd, "rb")) as f:
        opened = os.readlink(f"/proc/self/fd/{fd}")
        if not _inside(opened, allowed) or not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _refuse(
                f"the key {CLOUD_INIT_SECRET_KEY} is not a regular file of the pod's volume", opened
            )
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValidationError(FIELD, f"the user data is over {max_bytes} bytes", "shorten it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError(
            FIELD, "the user data is not UTF-8 text", "store it as text (not gzip)"
        ) from None
    if "\x00" in text:
        raise ValidationError(FIELD, "the user data contains NUL", "store it as text")
    return text


def secret_user_data(mounts: Iterable[Mount], kubelet_root: Path, pod_uid: str) -> str | None:
    """The user data of the cloud-init Secret mounted into a container of pod ``pod_uid``, if any."""
    mount = cloud_init_mount(mounts)
    return read_user_data(mount, kubelet_root, pod_uid) if mount is not None else None
