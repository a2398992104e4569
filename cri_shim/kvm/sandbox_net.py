"""A VM pod's network: its network namespace and the VM network's CNI ADD/DEL, as a container runtime
does for a pod.

The namespace is ``/run/netns/cni-kvm-<id[:12]>`` (made with ``ip netns``, loopback up); the
conflist runs through :mod:`.cni_exec` with the pod's ``K8S_POD_*`` CNI_ARGS and the sandbox's MAC
as the ``mac`` capability. The macvtap plugin leaves the tap device node of the pod's NIC under its
``deviceDir``, where the VM's QEMU opens it (:mod:`cri_shim.vm.nics`).
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Any, Protocol

from ..vm.errors import VMError
from ..vm.nics import DEFAULT_DEVICE_DIR
from . import cni_exec
from .records import SandboxRecord


class Netns(Protocol):
    """Named network namespaces (``ip netns``)."""

    def create(self, name: str) -> str: ...

    def delete(self, name: str) -> None: ...

    def path(self, name: str) -> Path: ...


class IpNetns:
    """Network namespaces made and removed with iproute2's ``ip netns`` under ``/run/netns``."""

    def __init__(self, root: Path = Path("/run/netns")) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / name

    def create(self, name: str) -> str:
        r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if r.returncode != 0:
            raise VMError(f"cannot create network namespace {name}: {r.stderr.strip()}")
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], capture_output=True, check=False)
        return str(self.path(name))

    def delete(self, name: str) -> None:
        if name and self.path(name).exists():
            r = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)
            if r.returncode != 0 and self.path(name).exists():
                raise VMError(f"cannot delete network namespace {name}: {r.stderr.strip()}")


class SandboxNetwork:
    """The VM network (one loaded conflist) attached to pod sandboxes."""

    def __init__(self, conflist: cni_exec.ConfList, netns: Netns) -> None:
        self.conflist = conflist
        self.netns = netns
        plugin0 = conflist.conf["plugins"][0]
        self.device_dir = Path(plugin0.get("deviceDir") or DEFAULT_DEVICE_DIR)

    @classmethod
    def load(cls, conflist: Path, bin_dirs: list[Path], netns: Netns) -> SandboxNetwork:
        """Load the conflist; :class:`~.cni_exec.CNIError` when it cannot be read or is malformed."""
        return cls(cni_exec.ConfList(conflist, bin_dirs), netns)

    @property
    def name(self) -> str:
        return self.conflist.name

    def missing_plugins(self) -> list[str]:
        return self.conflist.missing_plugins()

    def netns_path(self, sb: SandboxRecord) -> Path:
        return self.netns.path(sb.netns)

    def has_namespace(self, sb: SandboxRecord) -> bool:
        return self.netns_path(sb).exists()

    def attachment(self, sb: SandboxRecord) -> cni_exec.Attachment:
        md = sb.metadata
        caps: tuple[tuple[str, Any], ...] = (("mac", sb.mac),) if sb.mac else ()
        netns = str(self.netns_path(sb)) if self.has_namespace(sb) else ""
        return cni_exec.Attachment(
            container_id=sb.id,
            netns=netns,
            args=(
                ("K8S_POD_NAMESPACE", md.namespace),
                ("K8S_POD_NAME", md.name),
                ("K8S_POD_INFRA_CONTAINER_ID", sb.id),
                ("K8S_POD_UID", md.uid),
            ),
            capabilities=caps,
        )

    def create_namespace(self, sb: SandboxRecord) -> None:
        self.netns.create(sb.netns)

    def add(self, sb: SandboxRecord) -> dict[str, Any]:
        """CNI ADD; the result (a half-done ADD is deleted again by :mod:`.cni_exec`)."""
        return self.conflist.add(self.attachment(sb))

    def teardown(self, sb: SandboxRecord) -> None:
        """CNI DEL (with the cached result) when it is due, and removal of the namespace; raises
        :class:`~.cni_exec.CNIError` if DEL failed (the namespace is removed anyway)."""
        err: cni_exec.CNIError | None = None
        if sb.network_added:
            try:
                self.conflist.delete(self.attachment(sb), sb.cni_result)
            except cni_exec.CNIError as e:
                err = e
        with contextlib.suppress(VMError):
            self.netns.delete(sb.netns)
        if err is not None:
            raise err
