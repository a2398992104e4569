"""Writable disks: qcow2 overlays on cached base images, emptyDisk volumes, hostDisk volumes.

Layout under ``<state>/disks``:

* ``vm/<key>/`` - disks keyed by a VM's identity (the VirtualMachine UID): kept across stop/start
  and removed only when the VM itself is deleted;
* ``pod/<key>/`` - disks keyed by a pod sandbox: removed with the pod.

Keys and volume names are validated (no '/', no '..'), so every path stays inside the state dir.
hostDisk paths must lie under an allowed root after resolving symlinks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from .errors import ValidationError, VMError
from .images import BaseImage, qemu_img_info

KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SCOPES = ("vm", "pod")
QUANTITY_RE = re.compile(r"([0-9]+)(Ki|Mi|Gi|Ti|k|M|G|T)?")
UNITS = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_quantity(field: str, value: str | int) -> int:
    """A Kubernetes-style byte quantity ('64Mi', '1Gi', 1048576) -> bytes (> 0, multiple of 512)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = QUANTITY_RE.fullmatch(str(value).strip())
        if not m:
            raise ValidationError(field, f"{value!r} is not a size", "use a quantity such as 64Mi or 1Gi")
        n = int(m.group(1)) * UNITS[m.group(2)]
    if n <= 0 or n > 16 * 2**40:
        raise ValidationError(field, f"{value!r} is out of range", "use a size between 1Mi and 16Ti")
    if n % 512:
        raise ValidationError(field, f"{value!r} is not a multiple of 512 bytes", "round it to Ki or Mi")
    return n


def _check_key(field: str, key: str) -> str:
    if not isinstance(key, str) or not KEY_RE.fullmatch(key) or key in (".", ".."):
        raise ValidationError(
            field, f"{key!r} is not a safe key", "use [A-Za-z0-9_.-], starting alphanumeric"
        )
    return key


def _qemu_img(*args: str) -> None:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise VMError(f"qemu-img {' '.join(args[:1])} failed: {r.stderr.strip()}")


class DiskManager:
    """Creates and removes the writable disks of VMs under ``<state>/disks``."""

    def __init__(self, state_dir: Path, host_disk_roots: list[Path] | tuple[Path, ...] = ()) -> None:
        self.root = Path(state_dir) / "disks"
        self.host_disk_roots = [Path(os.path.realpath(r)) for r in host_disk_roots]

    def dir_for(self, scope: str, key: str) -> Path:
        if scope not in SCOPES:
            raise ValidationError("overlayScope", f"{scope!r}", "use 'vm' (kept across restarts) or 'pod'")
        return self.root / scope / _check_key("uid" if scope == "vm" else "podUID", key)

    def overlay(
        self, base: BaseImage, scope: str, key: str, size: int | None = None, name: str = "root"
    ) -> tuple[Path, bool]:
        """The qcow2 overlay of ``base`` for (scope, key): created if missing. Returns (path, created).
        An existing overlay on another base is an error (the VM's image changed under its disk)."""
        _check_key("volumes[].name", name)
        d = self.dir_for(scope, key)
        path = d / f"{name}.qcow2"
        if path.exists():
            info = qemu_img_info(path)
            backing = info.get("full-backing-filename") or info.get("backing-filename")
            if backing != str(base.path):
                raise ValidationError(
                    "image",
                    f"the VM's disk {path} is an overlay of {backing}, not of {base.path} ({base.ref})",
                    "restore the original image, or delete the VM's disk to start from the new one",
                )
            return path, False
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{name}.qcow2.tmp"
        args = ["create", "-q", "-f", "qcow2", "-F", base.format, "-b", str(base.path), str(tmp)]
        if size and size > base.virtual_size:
            args.append(str(size))
        try:
            _qemu_img(*args)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path, True

    def empty_disk(
        self, scope: str, key: str, name: str, capacity: str | int, fmt: str = "qcow2"
    ) -> tuple[Path, bool]:
        """An emptyDisk volume: created with ``capacity`` if missing. Returns (path, created)."""
        _check_key("volumes[].name", name)
        if fmt not in ("qcow2", "raw"):
            raise ValidationError(f"volumes[{name}].format", f"{fmt!r}", "use qcow2 or raw")
        size = parse_quantity(f"volumes[{name}].emptyDisk.capacity", capacity)
        d = self.dir_for(scope, key)
        path = d / f"empty-{name}.{fmt}"
        if path.exists():
            return path, False
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".empty-{name}.{fmt}.tmp"
        try:
            _qemu_img("create", "-q", "-f", fmt, str(tmp), str(size))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path, True

    def host_disk(
        self, name: str, path: str, type_: str, capacity: str | int | None = None
    ) -> tuple[Path, bool]:
        """A hostDisk volume (raw file) confined to the allowed roots. ``type_`` is Disk (must exist)
        or DiskOrCreate (created with ``capacity`` if missing). Returns (path, created)."""
        field = f"volumes[{name}].hostDisk"
        if type_ not in ("Disk", "DiskOrCreate"):
            raise ValidationError(f"{field}.type", f"{type_!r}", "use Disk or DiskOrCreate")
        if (
            not isinstance(path, str)
            or not path.startswith("/")
            or ".." in Path(path).parts
            or "\x00" in path
        ):
            raise ValidationError(f"{field}.path", f"{path!r} is not a clean absolute path", "use /abs/path")
        if not self.host_disk_roots:
            raise ValidationError(field, "hostDisk is disabled on this node", "configure a hostDisk root")
        real = Path(os.path.realpath(path))
        if not any(r in real.parents for r in self.host_disk_roots):
            roots = ", ".join(map(str, self.host_disk_roots))
            raise ValidationError(
                f"{field}.path", f"{path!r} resolves outside the allowed roots", f"use {roots}"
            )
        if real.exists():
            if not real.is_file():
                raise ValidationError(
                    f"{field}.path", f"{path!r} is not a regular file", "point at a disk file"
                )
            return real, False
        if type_ == "Disk":
            raise ValidationError(
                f"{field}.path", f"{path!r} does not exist", "create it or use DiskOrCreate"
            )
        if capacity is None:
            raise ValidationError(
                f"{field}.capacity", "is required for DiskOrCreate", "give e.g. capacity: 1Gi"
            )
        size = parse_quantity(f"{field}.capacity", capacity)
        real.parent.mkdir(parents=True, exist_ok=True)
        _qemu_img("create", "-q", "-f", "raw", str(real), str(size))
        return real, True

    def remove(self, scope: str, key: str) -> None:
        """Delete every disk of (scope, key). Idempotent."""
        d = self.dir_for(scope, key)
        shutil.rmtree(d, ignore_errors=True)
        self.prune(scope, key)

    def prune(self, scope: str, key: str) -> None:
        """Remove the (scope, key) directory and its parents up to ``disks/`` if they are empty."""
        d = self.dir_for(scope, key)
        for p in (d, d.parent, self.root):
            try:
                p.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                return
