"""Writable disks: qcow2 overlays on cached base images and emptyDisk volumes, each owned by one
namespace's VM or pod (hostDisk volumes: :mod:`.hostdisks`).

Layout under ``<state>/disks`` (folders 0700, disks 0600):

* ``ns/<namespace>/vm/<VM uid>/`` - a VirtualMachine's disks: kept across stop/start, removed when
  the VM is deleted (node mode);
* ``ns/<namespace>/pod/<pod uid>/`` - a plain kvm pod's disks: they live as long as the pod (a new
  container of the pod boots the same root disk, as an emptyDir outlives its containers);
* ``vm/<key>/``, ``pod/<key>/`` - *unscoped* disks (``namespace`` ""): the layout of edgevirt before
  disks were keyed by namespace, and what callers serving one tenant (tests, benches) still get.

The owner (:class:`DiskOwner`) comes from what the caller trusts: the kvm handler takes the namespace
and pod UID from kubelet's ``PodSandboxConfig.metadata``, so a pod that copies another namespace's VM
UID into its annotations gets disks of its own, never that VM's. Keys and names are validated (no
'/', no '..'), so every path stays inside the state dir.

Disks of the unscoped layout that belong to a VM (``vm/<uid>/``) are moved to the VM's namespace by
:meth:`DiskManager.adopt_legacy_vm_disks`, called by whoever knows the VM's namespace for sure (the
kvm handler for the VM pods it ran before the upgrade, node mode from the API server).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

from .errors import ValidationError, VMError
from .hostdisks import check_namespace, open_host_disk
from .images import BaseImage, qemu_img_info
from .private import FILE_MODE, private_dir
from .sizes import DiskLimits, parse_quantity

KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SCOPES = ("vm", "pod")
DISK_FORMATS = ("qcow2", "raw")
QEMU_IMG_TIMEOUT = 300


def check_key(field: str, key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.fullmatch(key) or key in (".", ".."):
        raise ValidationError(
            field, f"{key!r} is not a safe key", "use [A-Za-z0-9_.-], starting alphanumeric"
        )
    return key


@dataclasses.dataclass(frozen=True)
class DiskOwner:
    """Whose writable disks: a VM (``scope`` vm, ``key`` its UID) or a pod (``pod``, its UID) of
    ``namespace``; ``namespace`` "" is the unscoped layout."""

    scope: str
    key: str
    namespace: str = ""

    def validate(self) -> DiskOwner:
        if self.scope not in SCOPES:
            raise ValidationError("diskScope", f"{self.scope!r}", "use 'vm' (kept across restarts) or 'pod'")
        check_key("uid" if self.scope == "vm" else "podUID", self.key)
        if self.namespace:
            check_namespace("namespace", self.namespace)
        return self


def _qemu_img(*args: str) -> None:
    try:
        r = subprocess.run(
            ["qemu-img", *args], capture_output=True, text=True, check=False, timeout=QEMU_IMG_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise VMError(f"qemu-img {args[0]} took over {QEMU_IMG_TIMEOUT}s") from None
    if r.returncode != 0:
        raise VMError(f"qemu-img {args[0]} failed", detail=f"qemu-img {' '.join(args)}: {r.stderr.strip()}")


class DiskManager:
    """Creates and removes the writable disks of VMs under ``<state>/disks``; hostDisk files under
    ``<root>/<namespace>/`` of ``host_disk_roots``."""

    def __init__(
        self,
        state_dir: Path,
        host_disk_roots: list[Path] | tuple[Path, ...] = (),
        limits: DiskLimits | None = None,
    ) -> None:
        self.root = Path(state_dir) / "disks"
        self.host_disk_roots = [Path(r) for r in host_disk_roots]
        self.limits = limits if limits is not None else DiskLimits()

    # ------------------------------------------------------------ layout
    def owner_dir(self, owner: DiskOwner) -> Path:
        o = owner.validate()
        base = self.root / "ns" / o.namespace if o.namespace else self.root
        return base / o.scope / o.key

    def dir_for(self, scope: str, key: str, namespace: str = "") -> Path:
        return self.owner_dir(DiskOwner(scope, key, namespace))

    def _new_disk_dir(self, owner: DiskOwner, field: str) -> Path:
        d = self.owner_dir(owner)
        self.limits.check_free(field, self.root)
        private_dir(d)
        return d

    # ------------------------------------------------------------ disks
    def overlay(
        self,
        base: BaseImage,
        owner: DiskOwner,
        size: int | None = None,
        name: str = "root",
        field: str = "image",
    ) -> tuple[Path, bool]:
        """The qcow2 overlay of ``base`` for ``owner``: created if missing. Returns (path, created).

        An existing overlay on another base: a VM's disk is refused (its image changed under its
        data); a pod's root disk starts again from the new image (a pod's container image changed)."""
        check_key("volumes[].name", name)
        path = self.owner_dir(owner) / f"{name}.qcow2"
        if path.exists():
            info = qemu_img_info(path)
            backing = info.get("full-backing-filename") or info.get("backing-filename")
            if backing == str(base.path):
                return path, False
            if owner.scope == "vm":
                raise ValidationError(
                    field,
                    "the VM's disk was made from another image than the one it names now",
                    "give the VM its original image again, or delete and re-create the VM "
                    "to start from the new image",
                    detail=f"{path} is an overlay of {backing}, not of {base.path} ({base.ref})",
                )
            path.unlink()
        virtual = max(size or 0, base.virtual_size)
        self.limits.check_size(field, virtual)
        d = self._new_disk_dir(owner, field)
        tmp = d / f".{name}.qcow2.tmp"
        args = ["create", "-q", "-f", "qcow2", "-F", base.format, "-b", str(base.path), str(tmp)]
        if size and size > base.virtual_size:
            args.append(str(size))
        try:
            _qemu_img(*args)
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path, True

    def empty_disk(
        self, owner: DiskOwner, name: str, capacity: str | int, fmt: str = "qcow2"
    ) -> tuple[Path, bool]:
        """An emptyDisk volume: created with ``capacity`` if missing. Returns (path, created)."""
        check_key("volumes[].name", name)
        field = f"volumes[{name}].emptyDisk.capacity"
        if fmt not in DISK_FORMATS:
            raise ValidationError(f"volumes[{name}].format", f"{fmt!r}", "use qcow2 or raw")
        size = self.limits.check_size(field, parse_quantity(field, capacity))
        path = self.owner_dir(owner) / f"empty-{name}.{fmt}"
        if path.exists():
            return path, False
        d = self._new_disk_dir(owner, field)
        tmp = d / f".empty-{name}.{fmt}.tmp"
        try:
            _qemu_img("create", "-q", "-f", fmt, str(tmp), str(size))
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path, True

    def host_disk(
        self, namespace: str, name: str, path: str, type_: str, capacity: str | int | None = None
    ) -> tuple[Path, bool]:
        """A hostDisk volume of a VM in ``namespace`` (raw file under ``<root>/<namespace>/``).
        Returns (path, created)."""
        field = f"volumes[{name}].hostDisk"
        return open_host_disk(self.host_disk_roots, namespace, field, path, type_, capacity, self.limits)

    # ------------------------------------------------------------ removal
    def remove_owner(self, owner: DiskOwner) -> None:
        """Delete every disk of ``owner`` (exactly that folder). Idempotent."""
        o = owner.validate()
        shutil.rmtree(self.owner_dir(o), ignore_errors=True)
        self.prune(o.scope, o.key, o.namespace)

    def remove(self, scope: str, key: str, namespace: str = "") -> None:
        """Delete every disk of (scope, key) in ``namespace`` (unscoped when ""). Idempotent.

        ``remove("vm", uid)`` without a namespace (node mode before it passed one) removes the VM's
        disks in every namespace and in the unscoped layout: it is called for a deleted VM, and VM
        UIDs are unique in a cluster, so any other folder of that UID was made by a pod that copied
        it."""
        if scope == "vm" and not namespace:
            for ns in self.namespaces():
                self.remove_vm_disks(ns, key)
        shutil.rmtree(self.dir_for(scope, key, namespace), ignore_errors=True)
        self.prune(scope, key, namespace)

    def remove_vm_disks(self, namespace: str, uid: str) -> None:
        """Delete the disks of the deleted VM (``namespace``, ``uid``), also those still in the unscoped
        layout. Idempotent."""
        check_namespace("namespace", namespace)
        for ns in (namespace, ""):
            shutil.rmtree(self.dir_for("vm", uid, ns), ignore_errors=True)
            self.prune("vm", uid, ns)

    def prune(self, scope: str, key: str, namespace: str = "") -> None:
        """Remove the (scope, key) folder and its parents up to ``disks/`` if they are empty."""
        d = self.dir_for(scope, key, namespace)
        while d != self.root.parent:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                return
            d = d.parent

    # ------------------------------------------------------------ the unscoped layout
    def namespaces(self) -> list[str]:
        """Namespaces that have disks here."""
        try:
            return sorted(p.name for p in (self.root / "ns").iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def vm_disk_owners(self) -> list[tuple[str, str]]:
        """(namespace, VM uid) of every VM that has disks in the namespaced layout (node mode removes
        those of VMs that do not exist: a pod that named a made-up VM UID left them)."""
        out = []
        for ns in self.namespaces():
            with_vms = self.root / "ns" / ns / "vm"
            if with_vms.is_dir():
                out += [(ns, p.name) for p in sorted(with_vms.iterdir()) if p.is_dir()]
        return out

    def has_legacy_vm_disks(self, uid: str) -> bool:
        """Whether VM ``uid`` has disks in the unscoped layout (made before disks had namespaces)."""
        return self.dir_for("vm", uid).is_dir()

    def adopt_legacy_vm_disks(self, namespace: str, uid: str) -> bool:
        """Move VM ``uid``'s unscoped disks to its namespace ``namespace``, if it has some and none
        there yet; True when moved. Only for callers that know the VM's namespace for sure."""
        check_namespace("namespace", namespace)
        old, new = self.dir_for("vm", uid), self.dir_for("vm", uid, namespace)
        if not old.is_dir() or new.exists():
            return False
        private_dir(new.parent)
        os.rename(old, new)  # overlays name their base by its absolute path: unchanged
        os.chmod(new, 0o700)
        self.prune("vm", uid)
        return True
