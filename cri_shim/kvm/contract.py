"""The VM pod contract: the pod annotations through which a VirtualMachine tells the kvm handler
what to boot, and the one mount through which it hands over secret cloud-init user data.

The kvm handler reads them (kubelet passes a pod's annotations to ``RunPodSandbox`` in
``PodSandboxConfig.annotations``, the container's mounts to ``CreateContainer``), so they are
defined, parsed and validated here, on the reading side; the VirtualMachine controller
(``vmcrd.podspec``) imports these names to write them. Nothing in ``cri_shim`` imports ``vmcrd``.

=====================================  ===============================================================
annotation                             value
=====================================  ===============================================================
``edgevirt.io/vm-uid``                 the VirtualMachine's UID: with the pod's namespace (kubelet's,
                                       never an annotation) the key of its writable disks (overlay,
                                       emptyDisks), which survive stop/start of the VM
``edgevirt.io/vm-name``                the VirtualMachine's name (namespace = the pod's)
``edgevirt.io/image``                  the VM's boot image, exactly ``spec.image`` (OCI ref, file:///,
                                       https://...#sha256=); authoritative over the container image
``edgevirt.io/mac``                    MAC of the VM's NIC (``spec.networks[0].mac``); absent -> the
                                       handler picks one
``edgevirt.io/cloud-init-user-data``   NoCloud user-data (``spec.cloudInit.userData``) that is not
                                       secret (anyone who may read the pod reads it); absent -> none
``edgevirt.io/kernel-boot``            JSON ``{"kernel":..,"initrd":..,"cmdline":..}``; absent -> disk
                                       boot
``edgevirt.io/volumes``                JSON list of ``spec.volumes[]`` items as in the VM spec (name,
                                       hotpluggable, one of emptyDisk/image/hostDisk, bus, readOnly,
                                       cdrom); always present (``[]`` when none)
=====================================  ===============================================================

Cloud-init user data that is secret travels in no pod metadata: a VirtualMachine's
``spec.cloudInit.userDataSecretRef`` becomes a ``secret`` volume of the VM pod (items: key
:data:`CLOUD_INIT_SECRET_KEY` -> path :data:`CLOUD_INIT_SECRET_KEY`, mode 0400) mounted read-only into
the ``compute`` container at :data:`CLOUD_INIT_SECRET_PATH`; the kvm handler finds it among the CRI
container's mounts by that container path and reads the file ``userdata`` in it (see
:mod:`.userdata`; the optional :data:`NETWORKDATA_KEY` is ignored: the network config comes from the
CNI result). kubelet fetches the Secret (the node authorizer lets it read exactly the Secrets of its
pods); the controller never reads it.

Every field is checked here with its type, as the CRD would (strings where strings are expected,
a list of objects with known keys, enums, DNS-label names, lengths), so a malformed annotation is
refused at ``RunPodSandbox`` naming it (:class:`ContractError`). The kvm handler reads a pod's
annotations once (:func:`parse_pod_contract`) and keeps the parsed :class:`PodContract` in the
sandbox's record; ``edgevirt.io/image`` and ``edgevirt.io/mac`` are honoured on any kvm pod, the rest
only on a VirtualMachine's.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from ..vm.errors import ValidationError
from ..vm.model import HostDisk, VolumeSpec

ANN_VM_UID = "edgevirt.io/vm-uid"
ANN_VM_NAME = "edgevirt.io/vm-name"
ANN_IMAGE = "edgevirt.io/image"
ANN_MAC = "edgevirt.io/mac"
ANN_CLOUD_INIT_USER_DATA = "edgevirt.io/cloud-init-user-data"
ANN_KERNEL_BOOT = "edgevirt.io/kernel-boot"
ANN_VOLUMES = "edgevirt.io/volumes"

#: Where the VM pod's ``compute`` container has the cloud-init Secret mounted (read-only): the CRI
#: mount with this ``container_path`` is the Secret's volume, its ``host_path`` the directory kubelet
#: made. Written by the controller (``vmcrd.podspec``), read by the kvm handler.
CLOUD_INIT_SECRET_PATH = "/run/edgevirt/cloud-init"
#: The key of the user data in the Secret named by ``spec.cloudInit.userDataSecretRef``, and the name
#: of the file at :data:`CLOUD_INIT_SECRET_PATH` (KubeVirt's key for cloudInitNoCloud Secrets).
CLOUD_INIT_SECRET_KEY = "userdata"
NETWORKDATA_KEY = "networkdata"

MAX_USER_DATA = 64 * 1024  # cloud-init's NoCloud practice, and the CRD's maxLength
MAX_VOLUMES = 32  # the CRD's maxItems
MAX_IMAGE = 1024
MAX_PATH = 1024
MAX_CMDLINE = 4096
MAX_QUANTITY = 32
UID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
VOLUME_KEYS = frozenset(
    {"name", "hotpluggable", "emptyDisk", "image", "hostDisk", "bus", "readOnly", "cdrom"}
)
SOURCES = ("emptyDisk", "image", "hostDisk")
BUSES = ("virtio", "scsi", "sata")
HOST_DISK_TYPES = ("Disk", "DiskOrCreate")
KERNEL_BOOT_KEYS = frozenset({"kernel", "initrd", "cmdline"})


class ContractError(ValidationError):
    """An annotation of the VM pod contract is malformed; ``field`` names the annotation (and the
    place inside its JSON)."""


def _ann(name: str) -> str:
    """The field name of annotation ``name`` (e.g. ``edgevirt.io/volumes[2].emptyDisk.capacity``)."""
    return name


@dataclasses.dataclass(frozen=True)
class PodVM:
    """What the kvm handler needs from a VM pod's annotations (the reader side of the contract)."""

    vm_uid: str
    vm_name: str
    image: str
    mac: str | None = None
    user_data: str | None = None
    kernel_boot: dict[str, str] | None = None
    volumes: tuple[dict[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class PodContract:
    """The contract as one pod's annotations carry it: the VM (None for a kvm pod that is not a
    VirtualMachine's) and the annotations honoured on any kvm pod, as written."""

    vm: PodVM | None = None
    image: str | None = None  # edgevirt.io/image
    mac: str | None = None  # edgevirt.io/mac (checked where the sandbox's MAC is chosen)
    # edgevirt.io/cloud-init-user-data of a plain kvm pod (a VM's is in ``vm``)
    user_data: str | None = None


# ---------------------------------------------------------------- field checks
def _string(field: str, value: object, max_len: int, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ContractError(
            field, f"must be a string, not {type(value).__name__}", "write it as a JSON string"
        )
    if not value and not empty:
        raise ContractError(field, "is empty", "give a value")
    if len(value) > max_len:
        raise ContractError(field, f"is {len(value)} characters long", f"use at most {max_len}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ContractError(field, "contains control characters", "use one line of printable text")
    return value


def _bool(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ContractError(field, f"must be true or false, not {value!r}", "write a JSON boolean")
    return value


def _object(field: str, value: object, keys: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ContractError(field, f"must be an object, not {type(value).__name__}", "write a JSON object")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise ContractError(field, f"has unknown keys {unknown}", f"use only {sorted(keys)}")
    return value


def _enum(field: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ContractError(
            field, f"{value!r} is not one of {list(allowed)}", f"use one of {', '.join(allowed)}"
        )
    return str(value)


def _quantity(field: str, value: object) -> str:
    from ..vm.sizes import parse_quantity  # the same parser the disks use

    s = _string(field, value, MAX_QUANTITY)
    try:
        parse_quantity(field, s)
    except ValidationError as e:
        raise ContractError(e.field, e.problem, e.fix) from None
    return s


def check_volume(v: object, field: str) -> dict[str, Any]:
    """One ``spec.volumes[]`` item, as the CRD's schema allows it (keys, types, enums, lengths)."""
    d = _object(field, v, VOLUME_KEYS)
    name = d.get("name")
    if not isinstance(name, str) or not DNS_LABEL_RE.fullmatch(name):
        raise ContractError(
            f"{field}.name", f"{name!r} is not a DNS label", "use e.g. data-1 (at most 63 characters)"
        )
    for key in ("hotpluggable", "readOnly", "cdrom"):
        if key in d:
            _bool(f"{field}.{key}", d[key])
    if "bus" in d:
        _enum(f"{field}.bus", d["bus"], BUSES)
    sources = [s for s in SOURCES if s in d]
    if len(sources) != 1:
        raise ContractError(
            field, f"has {len(sources)} sources", "give exactly one of emptyDisk, image, hostDisk"
        )
    if "emptyDisk" in d:
        ed = _object(f"{field}.emptyDisk", d["emptyDisk"], frozenset({"capacity"}))
        _quantity(f"{field}.emptyDisk.capacity", ed.get("capacity"))
    elif "image" in d:
        _string(f"{field}.image", d["image"], MAX_IMAGE)
    else:
        hd = _object(f"{field}.hostDisk", d["hostDisk"], frozenset({"path", "type", "capacity"}))
        _string(f"{field}.hostDisk.path", hd.get("path"), MAX_PATH)
        kind = _enum(f"{field}.hostDisk.type", hd.get("type", "Disk"), HOST_DISK_TYPES)
        if "capacity" in hd:
            _quantity(f"{field}.hostDisk.capacity", hd["capacity"])
        elif kind == "DiskOrCreate":
            raise ContractError(f"{field}.hostDisk.capacity", "is required for DiskOrCreate", "give e.g. 1Gi")
    return d


def _volumes(raw: str) -> tuple[dict[str, Any], ...]:
    field = _ann(ANN_VOLUMES)
    try:
        vols = json.loads(raw or "[]")
    except ValueError as e:
        raise ContractError(field, f"not JSON ({e})", "write a JSON list") from None
    if not isinstance(vols, list) or not all(isinstance(v, dict) and v.get("name") for v in vols):
        raise ContractError(field, "needs a JSON list of objects with a name", "name every volume")
    if len(vols) > MAX_VOLUMES:
        raise ContractError(field, f"lists {len(vols)} volumes", f"use at most {MAX_VOLUMES}")
    names = [check_volume(v, f"{field}[{i}]")["name"] for i, v in enumerate(vols)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ContractError(field, f"names volumes {dup} twice", "give every volume its own name")
    return tuple(vols)


def _kernel_boot(raw: str) -> dict[str, str]:
    field = _ann(ANN_KERNEL_BOOT)
    try:
        kb = json.loads(raw)
    except ValueError as e:
        raise ContractError(field, f"not JSON ({e})", "write a JSON object") from None
    if not isinstance(kb, dict) or "kernel" not in kb:
        raise ContractError(field, 'needs an object with "kernel"', "name the kernel")
    _object(field, kb, KERNEL_BOOT_KEYS)
    out = {"kernel": _string(f"{field}.kernel", kb["kernel"], MAX_PATH)}
    if "initrd" in kb:
        out["initrd"] = _string(f"{field}.initrd", kb["initrd"], MAX_PATH, empty=True)
    if "cmdline" in kb:  # control characters are refused where the domain is made, naming kernelBoot
        cmdline = kb["cmdline"]
        if not isinstance(cmdline, str) or len(cmdline) > MAX_CMDLINE:
            raise ContractError(
                f"{field}.cmdline", f"must be a string of at most {MAX_CMDLINE}", "fix the cmdline"
            )
        out["cmdline"] = cmdline
    return out


def _user_data(raw: str) -> str:
    if len(raw.encode()) > MAX_USER_DATA:
        raise ContractError(
            _ann(ANN_CLOUD_INIT_USER_DATA), f"is over {MAX_USER_DATA} bytes", "shorten it, or use a Secret"
        )
    return raw


# ---------------------------------------------------------------- reading the contract
def parse_pod_contract(ann: Mapping[str, str]) -> PodContract:
    """Read the whole contract from ``PodSandboxConfig.annotations``; :class:`ContractError` when
    it is malformed."""
    image = ann.get(ANN_IMAGE) or None
    if image is not None:
        _string(_ann(ANN_IMAGE), image, MAX_IMAGE)
    vm = parse_pod_annotations(ann)
    raw = ann.get(ANN_CLOUD_INIT_USER_DATA) or None
    user_data = _user_data(raw) if raw and vm is None else None
    return PodContract(vm=vm, image=image, mac=ann.get(ANN_MAC) or None, user_data=user_data)


def parse_pod_annotations(ann: Mapping[str, str]) -> PodVM | None:
    """Read the contract from ``PodSandboxConfig.annotations``: None for a pod that is not a
    VirtualMachine's (no ``edgevirt.io/vm-uid``); :class:`ContractError` when it is malformed."""
    uid = ann.get(ANN_VM_UID)
    if not uid:
        return None
    if not UID_RE.fullmatch(uid):
        raise ContractError(
            _ann(ANN_VM_UID), f"{uid!r} is not a UID", "use the VirtualMachine's metadata.uid"
        )
    image = ann.get(ANN_IMAGE, "")
    if not image:
        raise ContractError(_ann(ANN_IMAGE), "missing or empty (the VM's boot image)", "give spec.image")
    name = ann.get(ANN_VM_NAME, "")
    if name and (len(name) > 63 or not DNS_LABEL_RE.fullmatch(name.replace(".", "-"))):
        raise ContractError(
            _ann(ANN_VM_NAME), f"{name!r} is not a VirtualMachine name", "use the VM's metadata.name"
        )
    user_data = ann.get(ANN_CLOUD_INIT_USER_DATA) or None
    kb = ann.get(ANN_KERNEL_BOOT)
    return PodVM(
        vm_uid=uid,
        vm_name=name,
        image=_string(_ann(ANN_IMAGE), image, MAX_IMAGE),
        mac=ann.get(ANN_MAC) or None,
        user_data=_user_data(user_data) if user_data else None,
        kernel_boot=_kernel_boot(kb) if kb else None,
        volumes=_volumes(ann.get(ANN_VOLUMES) or "[]"),
    )


def to_volume_spec(v: dict[str, Any]) -> VolumeSpec:
    """A ``spec.volumes[]`` item (as in the VM spec and the ``edgevirt.io/volumes`` annotation) ->
    the libvirt layer's :class:`VolumeSpec` (the kvm handler at boot, node mode for hotplug);
    :class:`ContractError` naming the field when the item is malformed."""
    check_volume(v, f"volumes[{v.get('name', '?') if isinstance(v, dict) else '?'}]")
    hd = v.get("hostDisk")
    return VolumeSpec(
        name=v["name"],
        empty_disk=(v.get("emptyDisk") or {}).get("capacity"),
        host_disk=HostDisk(path=hd["path"], type=hd.get("type", "Disk"), capacity=hd.get("capacity"))
        if hd
        else None,
        image=v.get("image"),
        bus=v.get("bus", "virtio"),
        read_only=bool(v.get("readOnly")),
        cdrom=bool(v.get("cdrom")),
    )
