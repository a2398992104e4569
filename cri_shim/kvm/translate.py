"""CRI requests -> the kvm handler's records and the libvirt layer's :class:`~cri_shim.vm.model.VMSpec`.

Pure: no libvirt, no CNI, no writes (the one look at the file system is resolving symlinks of a
kernel-boot path to check it lies under an allowed image root). Bad input raises
:class:`~cri_shim.vm.errors.ValidationError` naming the CRI field and the fix, which the handler
answers as INVALID_ARGUMENT.

* RunPodSandbox: :class:`PodRequest` (the fields of ``PodSandboxConfig`` the handler uses) + the
  parsed VM pod contract -> a :class:`~.records.SandboxRecord` in its ``setup`` phase, with the VM
  NIC's MAC: ``edgevirt.io/mac``, else one derived from the VM's namespace and UID (a VirtualMachine
  keeps its MAC across pods), else none (the CNI plugin picks one).
* CreateContainer: :class:`ContainerRequest` (the fields of ``ContainerConfig``) + the sandbox's
  record (with its parsed contract) -> a :class:`~.records.ContainerRecord` and the VMSpec: the
  image (``edgevirt.io/image``, else the container image; never an image ID), vCPUs from the CPU
  quota (rounded up), memory from the memory limit (default otherwise), kernel boot under the image
  roots, NICs from the sandbox's CNI result, boot volumes (their count and sizes within the node's
  limits), the user data (the Secret's, read by the handler, or the annotation's), and whose disks:
  the pod's namespace as kubelet gave it with the VM's UID for a VirtualMachine's pod, with the pod's
  UID otherwise. An annotation never chooses the namespace, so a pod that copies another
  namespace's VM UID gets disks of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

from ..vm.cloudinit import CloudInit
from ..vm.disks import check_key
from ..vm.errors import ValidationError
from ..vm.hostdisks import check_namespace
from ..vm.model import VMSpec, VolumeSpec
from ..vm.nics import nics_from_cni_result
from ..vm.sizes import DiskLimits, parse_quantity
from ..vm.spec import KernelBoot, check_mac
from .contract import (
    ANN_CLOUD_INIT_USER_DATA,
    ANN_KERNEL_BOOT,
    ANN_MAC,
    ANN_VOLUMES,
    CLOUD_INIT_SECRET_PATH,
    MAX_VOLUMES,
    PodContract,
    PodVM,
    parse_pod_contract,
    to_volume_spec,
)
from .records import ContainerMetadata, ContainerRecord, PodMetadata, SandboxRecord
from .userdata import Mount

NETNS_PREFIX = "cni-kvm-"
DOMAIN_PREFIX = "edgevirt-"
K8S_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?")
IMAGE_ID = re.compile(r"(sha256:)?[0-9a-f]{64}")


def check_name(field: str, value: str) -> str:
    if not K8S_NAME.fullmatch(value or ""):
        raise ValidationError(
            field, f"{value!r} is not a Kubernetes name", "use letters, digits, '-', '.', '_'"
        )
    return value


def derived_mac(namespace: str, uid: str) -> str:
    """A stable, locally administered unicast MAC for a VM identity: its namespace (kubelet's) and
    UID, so a pod that copies another namespace's VM UID does not get that VM's MAC."""
    h = hashlib.sha256(f"{namespace}/{uid}".encode()).hexdigest()
    return "02:" + ":".join(h[i : i + 2] for i in range(0, 10, 2))


def sandbox_mac(contract: PodContract, namespace: str) -> str | None:
    """The VM NIC's MAC: the annotation's (checked), else derived from the VM's namespace and UID,
    else None."""
    vm = contract.vm
    mac = contract.mac or (derived_mac(namespace, vm.vm_uid) if vm is not None else None)
    return check_mac(f"config.annotations[{ANN_MAC}]", mac) if mac else None


@dataclasses.dataclass(frozen=True)
class PodRequest:
    """What RunPodSandbox asks for (from ``PodSandboxConfig``)."""

    metadata: PodMetadata
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    log_directory: str = ""
    hostname: str = ""

    @classmethod
    def from_cri(cls, config: Any) -> PodRequest:
        """Read a protobuf ``runtime.v1.PodSandboxConfig``."""
        md = config.metadata
        return cls(
            metadata=PodMetadata(str(md.name), str(md.namespace), str(md.uid), int(md.attempt)),
            labels=dict(config.labels),
            annotations=dict(config.annotations),
            log_directory=str(config.log_directory),
            hostname=str(config.hostname),
        )


def new_sandbox(req: PodRequest, sandbox_id: str, now: int) -> SandboxRecord:
    """The record of a new sandbox (phase ``setup``); reads the VM pod contract once.
    Raises ValidationError, or :class:`~.contract.ContractError` for malformed annotations."""
    md = req.metadata
    check_name("config.metadata.name", md.name)
    check_name("config.metadata.namespace", md.namespace)
    check_namespace("config.metadata.namespace", md.namespace)  # it keys the pod's disks
    check_name("config.metadata.uid", md.uid)
    check_key("config.metadata.uid", md.uid)
    contract = parse_pod_contract(req.annotations)
    return SandboxRecord(
        id=sandbox_id,
        metadata=md,
        netns=NETNS_PREFIX + sandbox_id[:12],
        created_at=now,
        contract=contract,
        labels=req.labels,
        annotations=req.annotations,
        log_directory=req.log_directory,
        hostname=req.hostname,
        mac=sandbox_mac(contract, md.namespace),
    )


@dataclasses.dataclass(frozen=True)
class ContainerRequest:
    """What CreateContainer asks for (from ``ContainerConfig``)."""

    metadata: ContainerMetadata
    image: str = ""  # image.image
    user_specified_image: str = ""  # image.user_specified_image
    log_path: str = ""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    cpu_quota: int = 0
    cpu_period: int = 0
    memory_limit_in_bytes: int = 0
    mounts: tuple[Mount, ...] = ()

    @classmethod
    def from_cri(cls, config: Any) -> ContainerRequest:
        """Read a protobuf ``runtime.v1.ContainerConfig``."""
        res = config.linux.resources
        mounts = tuple(
            Mount(str(m.container_path), str(m.host_path), bool(m.readonly)) for m in config.mounts
        )
        return cls(
            metadata=ContainerMetadata(str(config.metadata.name), int(config.metadata.attempt)),
            image=str(config.image.image),
            user_specified_image=str(config.image.user_specified_image),
            log_path=str(config.log_path),
            labels=dict(config.labels),
            annotations=dict(config.annotations),
            cpu_quota=int(res.cpu_quota),
            cpu_period=int(res.cpu_period),
            memory_limit_in_bytes=int(res.memory_limit_in_bytes),
            mounts=mounts,
        )


@dataclasses.dataclass(frozen=True)
class Limits:
    """The handler's settings that shape a VM."""

    image_roots: tuple[Path, ...] = ()  # resolved (realpath) roots kernel-boot files must lie under
    default_memory_mib: int = 256  # when the container has no memory limit
    device_dir: Path = Path("/run/edgevirt/macvtap")  # the macvtap plugin's tap device nodes
    disks: DiskLimits = dataclasses.field(default_factory=DiskLimits)  # per disk, free space kept
    max_volumes: int = MAX_VOLUMES  # data volumes of one VM


def image_ref(contract: PodContract, req: ContainerRequest) -> str:
    ref = contract.image or req.user_specified_image or req.image
    if not ref:
        raise ValidationError("config.image.image", "is empty", "give the VM disk image reference")
    if IMAGE_ID.fullmatch(ref):
        raise ValidationError(
            "config.image.image",
            f"{ref!r} is an image ID, not a reference the kvm handler can fetch",
            "pass the image reference (user_specified_image) or the edgevirt.io/image annotation",
        )
    return ref


def resources(req: ContainerRequest, default_memory_mib: int) -> tuple[int, int]:
    """(vCPUs, memory MiB): the CPU quota rounded up to whole CPUs; the memory limit, at least 64."""
    cpus = 1
    if req.cpu_quota > 0 and req.cpu_period > 0:
        cpus = max(1, math.ceil(req.cpu_quota / req.cpu_period))
    mem = default_memory_mib
    if req.memory_limit_in_bytes > 0:
        mem = max(64, req.memory_limit_in_bytes // (1024 * 1024))
    return cpus, mem


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in roots)


def kernel_boot(vm: PodVM | None, image_roots: tuple[Path, ...]) -> KernelBoot | None:
    """The VM's direct kernel boot; kernel and initrd must lie under an allowed image root."""
    if vm is None or not vm.kernel_boot:
        return None
    kb = vm.kernel_boot
    for key in ("kernel", "initrd"):
        if kb.get(key) and not _under(Path(kb[key]), image_roots):
            raise ValidationError(
                f"config.annotations[{ANN_KERNEL_BOOT}].{key}",
                f"{kb[key]!r} is outside the node's image roots (after resolving symlinks)",
                "put the kernel and initrd under an image root of the node (kvm option image_roots)",
                detail=f"{kb[key]} resolves to {os.path.realpath(kb[key])}; roots: "
                f"{', '.join(map(str, image_roots)) or 'none configured'}",
            )
    return KernelBoot(
        kernel=Path(kb["kernel"]),
        initrd=Path(kb["initrd"]) if kb.get("initrd") else None,
        cmdline=str(kb.get("cmdline", "")),
    )


def log_path(log_directory: str, rel: str) -> str:
    """The container's CRI log file: ``rel`` inside the pod's log directory ("" without one)."""
    if not (log_directory and rel):
        return ""
    log_dir = Path(log_directory)
    path = os.path.normpath(log_dir / rel)
    if not Path(path).is_relative_to(log_dir) or Path(rel).is_absolute():
        raise ValidationError(
            "config.log_path", f"{rel!r} leaves the pod's log directory", "use a relative path"
        )
    return path


def boot_volumes(vm: PodVM | None, limits: Limits) -> list[VolumeSpec]:
    """The VM's volumes attached at boot (hotpluggable ones are node mode's), within the node's
    limits: how many, and how large each new disk may be."""
    vols = list(vm.volumes) if vm is not None else []
    field = f"config.annotations[{ANN_VOLUMES}]"
    if len(vols) > limits.max_volumes:
        raise ValidationError(
            field,
            f"lists {len(vols)} volumes, over this node's limit of {limits.max_volumes}",
            "use fewer volumes (the node's kvm option max_volumes)",
        )
    out = []
    for v in vols:
        spec = to_volume_spec(v)
        cap = (
            spec.empty_disk
            if spec.empty_disk is not None
            else (spec.host_disk.capacity if spec.host_disk else None)
        )
        if cap is not None:
            sub = "emptyDisk" if spec.empty_disk is not None else "hostDisk"
            f = f"{field}[{spec.name}].{sub}.capacity"
            limits.disks.check_size(f, parse_quantity(f, cap))
        if not v.get("hotpluggable"):
            out.append(spec)
    return out


def user_data(contract: PodContract, from_secret: str | None) -> str | None:
    """The VM's user data: the Secret's (mounted at the cloud-init path) or the annotation's (a
    VirtualMachine's or a plain kvm pod's), not both."""
    inline = contract.vm.user_data if contract.vm is not None else contract.user_data
    if inline is not None and from_secret is not None:
        raise ValidationError(
            f"config.annotations[{ANN_CLOUD_INIT_USER_DATA}]",
            f"is set while a Secret is mounted at {CLOUD_INIT_SECRET_PATH} too",
            "give the user data one way: the Secret (for secrets) or the annotation",
        )
    return from_secret if from_secret is not None else inline


def new_container(
    req: ContainerRequest,
    sb: SandboxRecord,
    limits: Limits,
    container_id: str,
    now: int,
    secret_user_data: str | None = None,
) -> tuple[ContainerRecord, VMSpec]:
    """The record of a new container (phase ``setup``) and the VM to define for it;
    ``secret_user_data``: what the handler read from the cloud-init Secret's mount."""
    path = log_path(sb.log_directory, req.log_path)
    vm = sb.contract.vm
    ref = image_ref(sb.contract, req)
    cpus, mem = resources(req, limits.default_memory_mib)
    uid = vm.vm_uid if vm is not None else sb.metadata.uid
    cloud_init = CloudInit(instance_id=uid, hostname=sb.hostname or sb.metadata.name)
    data = user_data(sb.contract, secret_user_data)
    if data is not None:
        cloud_init = dataclasses.replace(cloud_init, user_data=data)
    spec = VMSpec(
        name=DOMAIN_PREFIX + container_id[:20],
        uid=uid,
        cpu=cpus,
        memory_mib=mem,
        image=ref,
        kernel_boot=kernel_boot(vm, limits.image_roots),
        cloud_init=cloud_init,
        cni_result=sb.cni_result,
        nics=nics_from_cni_result(sb.cni_result, sb.id, limits.device_dir) if sb.cni_result else [],
        volumes=boot_volumes(vm, limits),
        # whose disks: the namespace is kubelet's (PodSandboxConfig.metadata), never an annotation's
        namespace=sb.metadata.namespace,
        disk_scope="vm" if vm is not None else "pod",
        disk_key=uid,
    )
    rec = ContainerRecord(
        id=container_id,
        sandbox_id=sb.id,
        metadata=req.metadata,
        image=ref,
        image_spec=req.image,
        domain=spec.name,
        created_at=now,
        log_path=path,
        labels=req.labels,
        annotations=req.annotations,
    )
    return rec, spec
