"""hostDisk volumes: a file on the node, confined to the VM's namespace's folder of an allowed root.

The one rule: a hostDisk path is absolute and lies under ``<root>/<namespace>/`` of an allowed root,
both as written and after resolving symlinks (a symlink the node's administrator made may lead
elsewhere inside that namespace's folder, never out of it). So a VM of namespace ``team-a`` may use
``/var/lib/edgevirt/hostdisks/team-a/data.img`` and nothing of ``team-b``'s. The namespace is the
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
    if not isinstance(path, str) or not path.startswith("/") or CONTROL_RE.search(path):
        raise ValidationError(
            field, f"{path!r} is not an absolute path", "use /var/lib/edgevirt/hostdisks/..."
        )
    parts = path.split("/")[1:]
    if any(p in ("", ".", "..") for p in parts):
        raise ValidationError(
            field, f"{path!r} is not a clean path", "write it without '..', '.' or '//' components"
        )
    return Path(path)


def host_disk_path(roots: Sequence[Path], namespace: str, field: str, path: object) -> Path:
    """The real path of hostDisk ``path`` of a VM in ``namespace``: under ``<root>/<namespace>/`` of
    one of ``roots`` as written and after resolving symlinks. Nothing is made."""
    p = _clean_path(field, path)
    if not roots:
        raise ValidationError(
            field, "hostDisk is disabled on this node", "ask its administrator (kvm option host_disk_root)"
        )
    if not namespace:
        raise ValidationError(field, "a hostDisk needs the VM's namespace", "give the VM's namespace")
    check_namespace(f"{field}.namespace", namespace)
    folders = [Path(r) / namespace for r in roots]
    folder = next((f for f in folders if _inside(p, f)), None)
    if folder is None:
        raise ValidationError(
            field,
            f"{str(p)!r} is not in the folder of namespace {namespace!r}",
            f"use a file under {folders[0]}/ (each namespace has its own folder)",
        )
    real = Path(os.path.realpath(p))
    if not _inside(real, Path(os.path.realpath(folder))):
        raise ValidationError(
            field,
            f"{str(p)!r} leads out of the folder of namespace {namespace!r} (through a symlink)",
            f"use a regular file under {folder}/",
            detail=f"{p} resolves to {real}",
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
