"""The VM pod contract: the pod annotations through which a VirtualMachine tells the kvm handler
what to boot.

The kvm handler reads them (kubelet passes a pod's annotations to ``RunPodSandbox`` in
``PodSandboxConfig.annotations``), so they are defined, parsed and validated here, on the reading
side; the VirtualMachine controller (``vmcrd.podspec``) imports these names to write them. Nothing
in ``cri_shim`` imports ``vmcrd``.

=====================================  ===============================================================
annotation                             value
=====================================  ===============================================================
``edgevirt.io/vm-uid``                 the VirtualMachine's UID: the key of its writable disks
                                       (overlay, emptyDisks), which survive stop/start of the VM
``edgevirt.io/vm-name``                the VirtualMachine's name (namespace = the pod's)
``edgevirt.io/image``                  the VM's boot image, exactly ``spec.image`` (OCI ref, file:///,
                                       https://...#sha256=); authoritative over the container image
``edgevirt.io/mac``                    MAC of the VM's NIC (``spec.networks[0].mac``); absent -> the
                                       handler picks one
``edgevirt.io/cloud-init-user-data``   NoCloud user-data (``spec.cloudInit.userData``); absent -> none
``edgevirt.io/kernel-boot``            JSON ``{"kernel":..,"initrd":..,"cmdline":..}``; absent -> disk
                                       boot
``edgevirt.io/volumes``                JSON list of ``spec.volumes[]`` items as in the VM spec (name,
                                       hotpluggable, one of emptyDisk/image/hostDisk, bus, readOnly,
                                       cdrom); always present (``[]`` when none)
=====================================  ===============================================================

Cloud-init user data that is secret does not travel in an annotation: a VirtualMachine's
``spec.cloudInit.userDataSecretRef`` becomes a ``secret`` volume of the VM pod (items: key
:data:`CLOUD_INIT_SECRET_KEY` -> path :data:`CLOUD_INIT_SECRET_KEY`, mode 0400) mounted read-only into
the ``compute`` container at :data:`CLOUD_INIT_SECRET_PATH`; the kvm handler finds it among the CRI
container's mounts by that container path and reads the file ``userdata`` in it. kubelet fetches the
Secret (the node authorizer lets it read exactly the Secrets of its pods); the controller never reads it.

The kvm handler reads a pod's annotations once, at ``RunPodSandbox`` (:func:`parse_pod_contract`),
and keeps the parsed :class:`PodContract` in the sandbox's record; ``edgevirt.io/image`` and
``edgevirt.io/mac`` are honoured on any kvm pod, the rest only on a VirtualMachine's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

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


class ContractError(ValueError):
    """An annotation of the VM pod contract is malformed; the message names the annotation."""


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
    VirtualMachine's) and the two annotations honoured on any kvm pod, as written."""

    vm: PodVM | None = None
    image: str | None = None  # edgevirt.io/image
    mac: str | None = None  # edgevirt.io/mac (checked where the sandbox's MAC is chosen)


def parse_pod_contract(ann: Mapping[str, str]) -> PodContract:
    """Read the whole contract from ``PodSandboxConfig.annotations``; :class:`ContractError` when
    it is malformed."""
    return PodContract(
        vm=parse_pod_annotations(ann), image=ann.get(ANN_IMAGE) or None, mac=ann.get(ANN_MAC) or None
    )


def parse_pod_annotations(ann: Mapping[str, str]) -> PodVM | None:
    """Read the contract from ``PodSandboxConfig.annotations``: None for a pod that is not a
    VirtualMachine's (no ``edgevirt.io/vm-uid``); :class:`ContractError` when it is malformed."""
    uid = ann.get(ANN_VM_UID)
    if not uid:
        return None
    image = ann.get(ANN_IMAGE, "")
    if not image:
        raise ContractError(f"annotation {ANN_IMAGE}: missing or empty (the VM's boot image)")
    kb = None
    if ann.get(ANN_KERNEL_BOOT):
        try:
            kb = json.loads(ann[ANN_KERNEL_BOOT])
        except ValueError as e:
            raise ContractError(f"annotation {ANN_KERNEL_BOOT}: not JSON ({e})") from None
        if not isinstance(kb, dict) or not kb.get("kernel"):
            raise ContractError(f'annotation {ANN_KERNEL_BOOT}: needs an object with "kernel"')
    try:
        vols = json.loads(ann.get(ANN_VOLUMES) or "[]")
    except ValueError as e:
        raise ContractError(f"annotation {ANN_VOLUMES}: not JSON ({e})") from None
    if not isinstance(vols, list) or not all(isinstance(v, dict) and v.get("name") for v in vols):
        raise ContractError(f"annotation {ANN_VOLUMES}: needs a JSON list of objects with a name")
    return PodVM(
        vm_uid=uid,
        vm_name=ann.get(ANN_VM_NAME, ""),
        image=image,
        mac=ann.get(ANN_MAC) or None,
        user_data=ann.get(ANN_CLOUD_INIT_USER_DATA) or None,
        kernel_boot=kb,
        volumes=tuple(vols),
    )


def to_volume_spec(v: dict[str, Any]) -> VolumeSpec:
    """A ``spec.volumes[]`` item (as in the VM spec and the ``edgevirt.io/volumes`` annotation) ->
    the libvirt layer's :class:`VolumeSpec` (the kvm handler at boot, node mode for hotplug)."""
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
