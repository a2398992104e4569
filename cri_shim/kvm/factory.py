"""The kvm handler from edgevirt-cri's config: ``backends.<name>.options`` -> :class:`.handler.KvmHandler`.

=======================  ========  ==============================================================
option                   default   meaning
=======================  ========  ==============================================================
``state_dir``            required  the handler's records (must survive a restart of the shim)
``cni_conflist``         required  the VM network's ``.conflist`` (the ``macvtap`` plugin)
``vm_state_dir``         ``/var/lib/edgevirt/vm``  images, disks, domain files of the libvirt layer
``cni_bin_dirs``         ``/opt/cni/bin``, ``/usr/lib/cni``  where the CNI plugins are
``libvirt_uri``          ``qemu:///system``
``image_roots``          none      where ``file://`` images and kernel-boot files may lie
``containerd_socket``    ``/run/containerd/containerd.sock``  containerd's socket: OCI images
                                   (containerDisks) come from its image store (CRI ImageService)
``containerd_root``      ``/var/lib/containerd``  containerd's ``root``: the layers are read from its
                                   content store (``io.containerd.content.v1.content``)
``insecure_registries``  none      ignored (containerd's ``hosts.toml`` decides how its registries
                                   are reached); kept so older configs still load
``domain_type``          probed    ``kvm`` or ``qemu`` (TCG)
``tcg_tb_cache_mib``     16        TCG's translation cache per VM in MiB (``-accel tcg,tb-size``);
                                   0: QEMU's default (1 GiB). Not used under KVM
``default_memory_mib``   256       a VM's memory when its container has no memory limit
``streaming_address``    ``127.0.0.1:0``  where Attach's streaming server listens
``host_disk_root``       ``/var/lib/edgevirt/hostdisks``  hostDisk files: ``<root>/<namespace>/...``
                                   ("" disables hostDisk)
``kubelet_root_dir``     ``/var/lib/kubelet``  kubelet's ``--root-dir`` (the pods' volume folders)
``max_disk_bytes``       256Gi     the largest virtual size of one disk (emptyDisk, hostDisk,
                                   an overlay, so also an image's)
``min_free_bytes``       2Gi       no new disk or download while less is free on ``vm_state_dir``
``max_volumes``          32        data volumes of one VM
``max_image_bytes``      20Gi      the largest image download (https, OCI layers, the disk in it)
``image_fetch_timeout_s``  1800    deadline of one image download, a pull through containerd,
                                   taking a disk out of an image
=======================  ========  ==============================================================

Sizes are Kubernetes quantities (``256Gi``) or byte counts.

A handler whose network or libvirt is not usable on this node is still made: it reports why
(:meth:`~.handler.KvmHandler.unavailable_reason`) and edgevirt-cri does not register it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..vm.containerd_images import DEFAULT_SOCKET as DEFAULT_CONTAINERD_SOCKET
from ..vm.containerd_source import DEFAULT_ROOT as DEFAULT_CONTAINERD_ROOT
from ..vm.containerd_source import ContainerdSource
from ..vm.disks import DiskManager
from ..vm.errors import ValidationError, VMError
from ..vm.images import DEFAULT_FETCH_TIMEOUT, DEFAULT_MAX_IMAGE_BYTES, ImageStore
from ..vm.lifecycle import DomainManager
from ..vm.nics import DEFAULT_DEVICE_DIR
from ..vm.sizes import DiskLimits, parse_quantity
from . import cni_exec
from .containers import Domains
from .handler import KvmHandler
from .sandbox_net import IpNetns, Netns, SandboxNetwork
from .translate import Limits
from .userdata import DEFAULT_KUBELET_ROOT

if TYPE_CHECKING:  # the guest sessions are imported on the first exec
    from ..vm.guest_session import Guests

REQUIRED = ("state_dir", "cni_conflist")
#: TCG's translation cache per VM (MiB); 0: QEMU's default (1 GiB). bench/RESULTS.md "Per-VM
#: overhead": 16 saves ~54 MiB per VM against the default at no measured cost in boot time and a few
#: per cent of guest CPU speed; 8 makes boots 1.65x and CPU-bound work 2.7x slower
TB_CACHE_MIB = 16
log = logging.getLogger("edgevirt-cri.kvm")


@dataclasses.dataclass(frozen=True)
class KvmOptions:
    """The handler's options, checked and with their defaults."""

    state_dir: Path
    cni_conflist: Path
    vm_state_dir: Path = Path("/var/lib/edgevirt/vm")
    cni_bin_dirs: tuple[Path, ...] = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
    libvirt_uri: str = "qemu:///system"
    image_roots: tuple[Path, ...] = ()
    containerd_socket: Path = DEFAULT_CONTAINERD_SOCKET
    containerd_root: Path = DEFAULT_CONTAINERD_ROOT
    insecure_registries: tuple[str, ...] = ()  # ignored: containerd's hosts.toml decides
    domain_type: str | None = None
    tcg_tb_cache_mib: int = TB_CACHE_MIB
    default_memory_mib: int = 256
    streaming_address: str = "127.0.0.1:0"
    host_disk_root: Path | None = Path("/var/lib/edgevirt/hostdisks")
    kubelet_root_dir: Path = DEFAULT_KUBELET_ROOT
    max_disk_bytes: int = DiskLimits.max_disk_bytes
    min_free_bytes: int = DiskLimits.min_free_bytes
    max_volumes: int = 32
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    image_fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT

    @property
    def disk_limits(self) -> DiskLimits:
        return DiskLimits(max_disk_bytes=self.max_disk_bytes, min_free_bytes=self.min_free_bytes)


def _bytes(name: str, key: str, value: Any, default: int, *, zero: bool = False) -> int:
    if value is None:
        return default
    if zero and value in (0, "0"):
        return 0
    try:
        return parse_quantity(f"backends.{name}.options.{key}", value)
    except ValidationError as e:
        raise ValueError(str(e)) from None


def _positive(name: str, key: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"backends.{name}.options.{key}: {value!r} is not a positive number")
    return float(value)


def _tb_cache(name: str, value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2048:
        raise ValueError(
            f"backends.{name}.options.tcg_tb_cache_mib: {value!r}: use a whole number of MiB from 1 to 2048, "
            "or 0 for QEMU's default"
        )
    return value


def _limits(name: str, options: Mapping[str, Any], d: KvmOptions) -> dict[str, Any]:
    root = options.get("host_disk_root", d.host_disk_root)
    return {
        "host_disk_root": Path(root) if root else None,
        "kubelet_root_dir": Path(options.get("kubelet_root_dir") or d.kubelet_root_dir),
        "max_disk_bytes": _bytes(name, "max_disk_bytes", options.get("max_disk_bytes"), d.max_disk_bytes),
        "min_free_bytes": _bytes(
            name, "min_free_bytes", options.get("min_free_bytes"), d.min_free_bytes, zero=True
        ),
        "max_volumes": int(_positive(name, "max_volumes", options.get("max_volumes"), d.max_volumes)),
        "max_image_bytes": _bytes(name, "max_image_bytes", options.get("max_image_bytes"), d.max_image_bytes),
        "image_fetch_timeout_s": _positive(
            name, "image_fetch_timeout_s", options.get("image_fetch_timeout_s"), d.image_fetch_timeout_s
        ),
    }


def parse_options(name: str, options: Mapping[str, Any]) -> KvmOptions:
    """``backends.<name>.options`` -> :class:`KvmOptions`; ValueError naming an unknown or missing key."""
    known = {f.name for f in dataclasses.fields(KvmOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"backends.{name}.options: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in REQUIRED:
        if not options.get(key):
            raise ValueError(f"backends.{name}.options.{key} is required")
    d = KvmOptions(state_dir=Path(options["state_dir"]), cni_conflist=Path(options["cni_conflist"]))
    return dataclasses.replace(
        d,
        vm_state_dir=Path(options.get("vm_state_dir") or d.vm_state_dir),
        cni_bin_dirs=tuple(Path(p) for p in options.get("cni_bin_dirs") or d.cni_bin_dirs),
        libvirt_uri=str(options.get("libvirt_uri") or d.libvirt_uri),
        image_roots=tuple(Path(r) for r in options.get("image_roots") or ()),
        containerd_socket=Path(options.get("containerd_socket") or d.containerd_socket),
        containerd_root=Path(options.get("containerd_root") or d.containerd_root),
        insecure_registries=tuple(str(r) for r in options.get("insecure_registries") or ()),
        domain_type=options.get("domain_type"),
        tcg_tb_cache_mib=_tb_cache(name, options.get("tcg_tb_cache_mib"), d.tcg_tb_cache_mib),
        default_memory_mib=int(options.get("default_memory_mib") or d.default_memory_mib),
        streaming_address=str(options.get("streaming_address") or d.streaming_address),
        **_limits(name, options, d),
    )


def create(name: str, options: dict[str, Any]) -> KvmHandler:
    """The factory named in edgevirt-cri's config (``cri_shim.kvm:create``)."""
    return build_handler(name, parse_options(name, options))


def domain_manager(opts: KvmOptions) -> DomainManager:
    """The libvirt layer as the handler uses it (images under ``vm_state_dir``, file:// roots, OCI
    images from containerd's store, hostDisks under ``host_disk_root``, the node's size limits)."""
    limits = opts.disk_limits
    return DomainManager(
        opts.vm_state_dir,
        uri=opts.libvirt_uri,
        domain_type=opts.domain_type,
        tcg_tb_cache_mib=opts.tcg_tb_cache_mib or None,
        images=ImageStore(
            opts.vm_state_dir,
            file_roots=opts.image_roots,
            container_disks=ContainerdSource(opts.containerd_socket, opts.containerd_root),
            max_image_bytes=opts.max_image_bytes,
            fetch_timeout=opts.image_fetch_timeout_s,
            limits=limits,
        ),
        disks=DiskManager(
            opts.vm_state_dir,
            host_disk_roots=[opts.host_disk_root] if opts.host_disk_root else [],
            limits=limits,
        ),
    )


def build_handler(
    name: str,
    opts: KvmOptions,
    *,
    domains: Domains | None = None,
    netns: Netns | None = None,
    guests: Guests | None = None,
) -> KvmHandler:
    """The handler for ``opts``; ``domains``, ``netns`` and ``guests`` replace the real libvirt
    layer, ``ip netns`` and the guests' agents and channels (tests)."""
    reason: str | None = None
    network: SandboxNetwork | None = None
    if opts.insecure_registries:
        log.info(
            "kvm option insecure_registries (%s) is ignored: OCI images come from containerd's image "
            "store, and containerd's hosts.toml decides how a registry is reached",
            ", ".join(opts.insecure_registries),
        )
    try:
        network = SandboxNetwork.load(opts.cni_conflist, list(opts.cni_bin_dirs), netns or IpNetns())
        missing = network.missing_plugins()
        if missing:
            reason = (
                f"CNI plugin(s) {', '.join(missing)} of {opts.cni_conflist} not found in "
                f"{', '.join(map(str, opts.cni_bin_dirs))}"
            )
    except cni_exec.CNIError as e:
        reason = str(e)
    domains = domains if domains is not None else domain_manager(opts)
    if guests is None and isinstance(domains, DomainManager):
        guests = domains
    if reason is None:
        try:
            domains.connect()  # now: a node without libvirt has no kvm handler
        except VMError as e:
            reason = str(e)
    limits = Limits(
        image_roots=tuple(Path(os.path.realpath(r)) for r in opts.image_roots),
        default_memory_mib=opts.default_memory_mib,
        device_dir=network.device_dir if network is not None else DEFAULT_DEVICE_DIR,
        disks=opts.disk_limits,
        max_volumes=opts.max_volumes,
    )
    return KvmHandler(
        name,
        state_dir=opts.state_dir,
        kubelet_root=opts.kubelet_root_dir,
        private_roots=(opts.state_dir, opts.vm_state_dir, opts.kubelet_root_dir, limits.device_dir),
        network=network,
        domains=domains,
        limits=limits,
        streaming_address=opts.streaming_address,
        unavailable=reason,
        guests=guests,
    )
