"""A :class:`.model.VMSpec` -> the :class:`.spec.DomainSpec` that :mod:`.domain_xml` renders, making
the files the domain needs on the way: the root overlay on the resolved image, the data volumes
(emptyDisk, hostDisk, image), the NoCloud seed ISO, the run directory, the tap-fd wrapper.

Every file made registers its removal on the caller's undo list, so a failure later in
:meth:`.lifecycle.DomainManager.create` (or a hot-plug) leaves nothing behind. A disk that existed
before (a VM's overlay kept across stop/start) is never on the list.

The writable disks belong to the spec's :class:`~.disks.DiskOwner` (namespace, VM or pod, key), which
the domain's metadata records (``namespace``, ``diskScope``, ``diskKey``) so that hot-plug and
removal find them again; a hostDisk must lie in that namespace's folder. The run directory (seed ISO
with the user-data, console log) is 0700, its files 0600.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

from . import cloudinit
from .disks import DiskManager, DiskOwner
from .errors import ValidationError, VMError
from .images import ImageStore
from .model import VMSpec, VolumeSpec
from .private import private_dir
from .sizes import parse_quantity
from .spec import DiskSpec, DomainSpec
from .wrapper_install import install_wrapper

#: steps that undo what a half-done operation made, run in reverse order
Undo = list[Callable[[], None]]


def run_undo(undo: Undo) -> None:
    """Run every undo step, last first; a failing step does not stop the others."""
    for step in reversed(undo):
        with contextlib.suppress(Exception):
            step()


def run_dir(state_dir: Path, uuid: str) -> Path:
    """Where a domain's own files live (seed ISO, default console log)."""
    return state_dir / "domains" / uuid


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """Where files go and what the node runs (from the :class:`.lifecycle.DomainManager`)."""

    state_dir: Path
    images: ImageStore
    disks: DiskManager
    domain_type: str
    qemu_binary: Path
    wrapper_dir: Path
    tcg_tb_cache_mib: int | None = None


def build_domain_spec(spec: VMSpec, ctx: BuildContext, undo: Undo) -> DomainSpec:
    """Resolve ``spec`` into a :class:`DomainSpec`, making its files; register undo steps."""
    owner = DiskOwner(spec.disk_scope, spec.disk_key or spec.uid, spec.namespace)
    dspec = DomainSpec(
        name=spec.name,
        uuid=spec.uuid,
        vcpus=spec.cpu,
        memory_mib=spec.memory_mib,
        domain_type=ctx.domain_type,
        nics=list(spec.nics),
        kernel_boot=spec.kernel_boot,
        qemu_binary=ctx.qemu_binary,
        tcg_tb_cache_mib=ctx.tcg_tb_cache_mib,
    )
    dspec.validate()  # name, uuid (filled in), cpu, memory, nics, kernel boot: before any file is made
    disk_dir = ctx.disks.owner_dir(owner)  # validates scope, key and namespace
    if not disk_dir.exists():
        undo.append(lambda: ctx.disks.prune(owner.scope, owner.key, owner.namespace))
    if spec.image is None and spec.kernel_boot is None:
        raise ValidationError("image", "neither image nor kernelBoot is set", "give an image reference")
    for i, v in enumerate(spec.volumes):
        v.validate(f"volumes[{i}]")
    run = run_dir(ctx.state_dir, dspec.uuid)
    if run.exists():  # left by a crash between mkdir and define: no domain has this uuid (checked)
        shutil.rmtree(run)
    private_dir(run.parent)
    private_dir(run)
    undo.append(lambda: shutil.rmtree(run, ignore_errors=True))
    if spec.image is not None:
        dspec.disks.append(_root_disk(spec, ctx, owner, undo))
    for i, v in enumerate(spec.volumes):
        dspec.disks.append(volume_disk(v, f"volumes[{i}]", owner, ctx.images, ctx.disks, undo))
    if spec.cloud_init is not None or spec.cni_result is not None:
        seed = cloudinit.make_seed_iso(_cloud_init(spec), run / "seed.iso")
        dspec.disks.append(DiskSpec(name="cidata", path=seed, format="raw", bus="sata", cdrom=True))
    dspec.console_log = spec.console_log or run / "console.log"
    if dspec.nics:
        dspec.emulator = install_wrapper(ctx.wrapper_dir)
    dspec.metadata = {
        "uid": spec.uid,
        "namespace": owner.namespace,
        "diskScope": owner.scope,
        "diskKey": owner.key,
        "runDir": str(run),
        "consoleLog": str(dspec.console_log),
    }
    return dspec


def _root_disk(spec: VMSpec, ctx: BuildContext, owner: DiskOwner, undo: Undo) -> DiskSpec:
    """The boot disk: a qcow2 overlay (per VM or per pod) on the resolved image."""
    base = ctx.images.resolve(spec.image or "", "image")
    size = parse_quantity("rootSize", spec.root_size) if spec.root_size is not None else None
    path, created = ctx.disks.overlay(base, owner, size)
    if created:
        undo.append(lambda: path.unlink(missing_ok=True))
    return DiskSpec(name="root", path=path, format="qcow2", bus="virtio", boot_order=1)


def _cloud_init(spec: VMSpec) -> cloudinit.CloudInit:
    """The seed's content: the caller's, with network-config from the CNI result unless it has one."""
    ci = spec.cloud_init or cloudinit.CloudInit(instance_id=spec.uid)
    if spec.cni_result is not None and ci.network_config is None:
        ci = dataclasses.replace(
            ci, network_config=cloudinit.network_config_from_cni(spec.cni_result, [n.mac for n in spec.nics])
        )
    return ci


def owner_from_metadata(md: dict[str, str], domain: str) -> DiskOwner:
    """The disk owner a domain's metadata records; a domain defined before disks had namespaces
    (no ``namespace`` in its metadata) gets no new disks."""
    if "namespace" not in md or not md.get("diskScope") or not md.get("diskKey"):
        raise VMError(
            f"domain {domain!r} was defined by an older edgevirt that did not record whose disks it has: "
            "restart the VM (kubectl vm restart) before mounting volumes"
        )
    return DiskOwner(md["diskScope"], md["diskKey"], md["namespace"]).validate()


def volume_disk(
    v: VolumeSpec, field: str, owner: DiskOwner, images: ImageStore, disks: DiskManager, undo: Undo
) -> DiskSpec:
    """The disk of a data volume, made (or found) for ``owner``; at boot and for hot-plug."""
    if v.empty_disk is not None:
        path, created = disks.empty_disk(owner, v.name, v.empty_disk, v.format)
        fmt = v.format
    elif v.host_disk is not None:
        hd = v.host_disk
        path, created = disks.host_disk(owner.namespace, v.name, hd.path, hd.type, hd.capacity)
        fmt = "raw"
    else:
        base = images.resolve(v.image or "", f"{field}.image")
        if v.read_only or v.cdrom:
            path, created, fmt = base.path, False, base.format
        else:
            path, created = disks.overlay(base, owner, None, name=f"vol-{v.name}", field=f"{field}.image")
            fmt = "qcow2"
    if created:
        undo.append(lambda: Path(path).unlink(missing_ok=True))
    return DiskSpec(name=v.name, path=path, format=fmt, bus=v.bus, read_only=v.read_only, cdrom=v.cdrom)
