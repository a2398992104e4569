"""hostDisk volumes: a file on the node, confined to the VM's namespace's folder of an allowed root.

The one rule: a hostDisk path is relative to the VM namespace's folder ``<root>/<namespace>/`` of the
node's hostDisk root (``spec.volumes[].hostDisk.path`` of the VirtualMachine, e.g. ``disks/data.img``),
written without ``..``, ``.`` or ``//``, and it stays inside that folder after resolving symlinks (a
symlink the node's administrator made may lead elsewhere inside the folder, never out of it). So a VM
of namespace ``team-a`` may use ``/var/lib/edgevirt/hostdisks/team-a/data.img`` (``path: data.img``)
and nothing of ``team-b``'s. The namespace is the
VM pod's, as kubelet gave it (never from an annotation); it is checked wherever a hostDisk is
opened: at boot (the kvm handler) and at hot-plug (node mode, from the domain's metadata).

``Disk`` needs the file to exist; ``DiskOrCreate`` makes a sparse raw file of ``capacity`` (within the
node's :class:`~.sizes.DiskLimits`) when it is missing, with the folders on the way (0700).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from .errors import ValidationError
from .private import FILE_MODE, private_dir
from .sizes import DiskLimits, parse_quantity
from .spec import CONTROL_RE

NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
HOST_DISK_TYPES = ("Disk", "DiskOrCreate")


def check_namespace(field: str, namespace: str) -> str:
    """A Kubernetes namespace name (a DNS label)."""
    if not isinstance(namespace, str) or not NAMESPACE_RE.fullmatch(namespace):
        raise ValidationError(
            field, f"{namespace!r} is not a namespace name", "use a DNS label such as team-a"
        )
    return namespace


def _inside(path: Path, folder: Path) -> bool:
    return folder in path.parents


def _clean_path(field: str, path: object) -> Path:
    if not isinstance(path, str) or not path or path.startswith("/") or CONTROL_RE.search(path):
        raise ValidationError(
            field,
            f"{path!r} is not a path relative to the namespace's folder",
            "write it relative to your namespace's hostDisk folder, such as disks/data.img",
        )
    if any(p in ("", ".", "..") for p in path.split("/")):
        raise ValidationError(
            field, f"{path!r} is not a clean path", "write it without '..', '.' or '//' components"
        )
    return Path(path)


def host_disk_path(roots: Sequence[Path], namespace: str, field: str, path: object) -> Path:
    """The real path of hostDisk ``path`` of a VM in ``namespace``: ``<root>/<namespace>/<path>`` of
    the node's hostDisk root, inside that folder also after resolving symlinks. Nothing is made."""
    rel = _clean_path(field, path)
    if not roots:
        raise ValidationError(
            field, "hostDisk is disabled on this node", "ask its administrator (kvm option host_disk_root)"
        )
    if not namespace:
        raise ValidationError(field, "a hostDisk needs the VM's namespace", "give the VM's namespace")
    check_namespace(f"{field}.namespace", namespace)
    folder = Path(roots[0]) / namespace
    real = Path(os.path.realpath(folder / rel))
    if not _inside(real, Path(os.path.realpath(folder))):
        raise ValidationError(
            field,
            f"{str(rel)!r} leads out of the folder of namespace {namespace!r} (through a symlink)",
            "use a regular file in your namespace's hostDisk folder",
            detail=f"{folder / rel} resolves to {real}",
        )
    return real


def open_host_disk(
    roots: Sequence[Path],
    namespace: str,
    field: str,
    path: object,
    type_: str,
    capacity: str | int | None,
    limits: DiskLimits,
) -> tuple[Path, bool]:
    """The hostDisk file for a VM of ``namespace`` (created for ``DiskOrCreate`` when missing).
    Returns (real path, created)."""
    if type_ not in HOST_DISK_TYPES:
        raise ValidationError(
            f"{field}.type", f"{type_!r} is not a hostDisk type", "use Disk or DiskOrCreate"
        )
    real = host_disk_path(roots, namespace, f"{field}.path", path)
    if os.path.lexists(real):
        if not real.is_file():
            raise ValidationError(f"{field}.path", f"{path!r} is not a regular file", "point at a disk file")
        return real, False  # its size is the administrator's choice
    if type_ == "Disk":
        raise ValidationError(f"{field}.path", f"{path!r} does not exist", "create it or use DiskOrCreate")
    if capacity is None:
        raise ValidationError(f"{field}.capacity", "is required for DiskOrCreate", "give e.g. capacity: 1Gi")
    size = limits.check_size(f"{field}.capacity", parse_quantity(f"{field}.capacity", capacity))
    limits.check_free(f"{field}.capacity", real.parent)
    private_dir(real.parent, chmod_existing=False)
    fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.ftruncate(fd, size)  # a sparse raw disk of that size
    except OSError:
        os.close(fd)
        real.unlink(missing_ok=True)
        raise
    os.close(fd)
    return real, True
