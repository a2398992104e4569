"""DomainManager: the one owner of every libvirt domain operation of edgevirt VMs.

Both users go through it: the CRI kvm handler (create/start/stop/remove/state/stats of a pod VM)
and the VirtualMachine controller's node mode (hotplug attach/detach, pause/resume, facts).
Operations on one domain are serialised by a per-name lock.

``create`` resolves the image, makes the overlay, volumes and seed ISO, defines the domain and
starts it. If any step fails, everything this call made is undone in reverse order (domain
destroyed and undefined, files it created deleted) and the error is raised: nothing leaks.
``remove`` is idempotent and cleans up from the domain's own metadata, so it works in a process
that did not create the domain.

Files: ``<state>/domains/<uuid>/`` (seed ISO, default console log), ``<state>/disks/{vm,pod}/<key>/``
(see :mod:`.disks`), ``<state>/images/`` (see :mod:`.images`), ``<state>/bin/edgevirt-qemu``
(``wrapper_dir``; libvirt keeps a capability cache file per emulator path: keep it stable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from . import cloudinit, domain_xml
from .disks import DiskManager, parse_quantity
from .domain_xml import RESERVED_DISK_NAMES
from .errors import ValidationError, VMError
from .images import ImageStore
from .spec import HOTPLUG_BUSES, DiskSpec, DomainSpec, KernelBoot, NicSpec, check_name, next_target
from .wrapper_install import install_wrapper

# libvirt state -> (phase, {reason code: reason name})
_RUNNING_REASONS = dict(enumerate((
    "unknown", "booted", "migrated", "restored", "from-snapshot", "unpaused", "migration-canceled",
    "save-canceled", "wakeup", "crashed", "postcopy",
)))  # fmt: skip
_PAUSED_REASONS = dict(enumerate((
    "unknown", "user", "migration", "save", "dump", "ioerror", "watchdog", "from-snapshot", "shutting-down",
    "snapshot", "crashed", "starting-up", "postcopy", "postcopy-failed",
)))  # fmt: skip
_SHUTOFF_REASONS = dict(enumerate((
    "unknown", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from-snapshot", "daemon",
)))  # fmt: skip
_SHUTDOWN_REASONS = {0: "unknown", 1: "user"}
_CRASHED_REASONS = {0: "unknown", 1: "panicked"}
#: container-like exit codes for a stopped VM (CRI ContainerStatus.exit_code)
EXIT_CODES = {"shutdown": 0, "destroyed": 137, "crashed": 139, "failed": 1, "daemon": 137}


@dataclasses.dataclass(frozen=True)
class DomainState:
    """A domain's state as edgevirt reports it."""

    phase: str  # running | paused | shutting-down | shutoff | crashed | pmsuspended | unknown
    reason: str
    exit_code: int | None = None  # only for shutoff/crashed

    @property
    def running(self) -> bool:
        return self.phase in ("running", "paused", "shutting-down", "pmsuspended")


def map_state(state: int, reason: int) -> DomainState:
    """libvirt (state, reason) -> :class:`DomainState`."""
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return DomainState("running", _RUNNING_REASONS.get(reason, "unknown"))
    if state == libvirt.VIR_DOMAIN_PAUSED:
        return DomainState("paused", _PAUSED_REASONS.get(reason, "unknown"))
    if state == libvirt.VIR_DOMAIN_SHUTDOWN:
        return DomainState("shutting-down", _SHUTDOWN_REASONS.get(reason, "unknown"))
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        r = _SHUTOFF_REASONS.get(reason, "unknown")
        return DomainState("shutoff", r, EXIT_CODES.get(r, 0 if r == "unknown" else 1))
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return DomainState("crashed", _CRASHED_REASONS.get(reason, "unknown"), 139)
    if state == libvirt.VIR_DOMAIN_PMSUSPENDED:
        return DomainState("pmsuspended", "unknown")
    return DomainState("unknown", "unknown")


@dataclasses.dataclass(frozen=True)
class DomainStats:
    """CPU and memory usage (CRI ContainerStats / node-mode facts)."""

    timestamp_ns: int
    cpu_time_ns: int
    memory_actual_kib: int
    memory_rss_kib: int
    memory_available_kib: int | None
    memory_unused_kib: int | None


@dataclasses.dataclass
class HostDisk:
    path: str
    type: str = "Disk"  # Disk | DiskOrCreate
    capacity: str | int | None = None


@dataclasses.dataclass
class VolumeSpec:
    """A data volume (DESIGN.md ``spec.volumes[]``): exactly one of empty_disk, host_disk, image."""

    name: str
    empty_disk: str | int | None = None  # capacity, e.g. "64Mi"
    host_disk: HostDisk | None = None
    image: str | None = None
    bus: str = "virtio"
    read_only: bool = False
    cdrom: bool = False
    format: str = "qcow2"

    def validate(self, field: str) -> None:
        check_name(f"{field}.name", self.name)
        if self.name in RESERVED_DISK_NAMES:
            raise ValidationError(f"{field}.name", f"{self.name!r} is reserved", "choose another volume name")
        srcs = [s for s in (self.empty_disk, self.host_disk, self.image) if s is not None]
        if len(srcs) != 1:
            raise ValidationError(
                field, f"has {len(srcs)} sources", "give exactly one of emptyDisk, hostDisk, image"
            )


@dataclasses.dataclass
class VMSpec:
    """What a caller asks for; :meth:`DomainManager.create` turns it into a running domain."""

    name: str
    uid: str
    cpu: int = 1
    memory_mib: int = 256
    image: str | None = None
    root_size: str | int | None = None
    kernel_boot: KernelBoot | None = None
    cloud_init: cloudinit.CloudInit | None = None
    cni_result: dict[str, Any] | None = None
    nics: list[NicSpec] = dataclasses.field(default_factory=list)
    volumes: list[VolumeSpec] = dataclasses.field(default_factory=list)
    console_log: Path | None = None
    disk_scope: str = "vm"  # "vm": disks kept across stop/start, keyed by uid; "pod": removed with it
    disk_key: str = ""  # defaults to uid
    uuid: str = ""


class DomainNotFound(VMError):
    """No such domain."""


class DomainExists(VMError):
    """A domain with this name is already defined."""


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    return None


def _lv_error_code(e: libvirt.libvirtError) -> int:
    return e.get_error_code() or 0


class DomainManager:
    """Owns the libvirt domains of edgevirt VMs on one node."""

    def __init__(
        self,
        state_dir: Path,
        *,
        uri: str = "qemu:///system",
        domain_type: str | None = None,
        images: ImageStore | None = None,
        disks: DiskManager | None = None,
        qemu_binary: Path = Path("/usr/bin/qemu-system-x86_64"),
        wrapper_dir: Path | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.uri = uri
        self._domain_type = domain_type
        self.images = images if images is not None else ImageStore(self.state_dir)
        self.disks = disks if disks is not None else DiskManager(self.state_dir)
        self.qemu_binary = qemu_binary
        # libvirt caches QEMU capabilities per emulator path: keep the wrapper at a stable path
        self.wrapper_dir = wrapper_dir if wrapper_dir is not None else self.state_dir / "bin"
        self._conn: libvirt.virConnect | None = None
        self._conn_lock = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        # libvirt's default handler prints every error (also expected ones, like a lookup of a
        # domain that does not exist) to stderr; errors reach us as exceptions anyway.
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)

    # ------------------------------------------------------------ plumbing
    @property
    def domain_type(self) -> str:
        """``kvm`` or ``qemu``: from the constructor, else from :func:`runtimeclass.probe.probe`."""
        if self._domain_type is None:
            from runtimeclass.probe import DEFAULT_CACHE, probe

            self._domain_type = probe(cache_file=DEFAULT_CACHE).domain_type
        return self._domain_type

    @property
    def conn(self) -> libvirt.virConnect:
        with self._conn_lock:
            if self._conn is not None:
                try:  # a restarted libvirtd leaves a dead connection behind: notice it here
                    if not self._conn.isAlive():
                        raise libvirt.libvirtError("connection is not alive")
                    self._conn.getLibVersion()
                except libvirt.libvirtError:
                    with contextlib.suppress(libvirt.libvirtError):
                        self._conn.close()
                    self._conn = None
            if self._conn is None:
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as e:
                    raise VMError(f"cannot connect to libvirt at {self.uri}: {e}") from None
            return self._conn

    def close(self) -> None:
        with self._conn_lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None

    def _lock(self, name: str) -> threading.Lock:
        with self._conn_lock:
            return self._locks.setdefault(name, threading.Lock())

    def _dom(self, name: str) -> libvirt.virDomain:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if _lv_error_code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                raise DomainNotFound(f"no domain named {name!r}") from None
            raise VMError(f"libvirt lookup of {name!r} failed: {e}") from None

    def run_dir(self, uuid: str) -> Path:
        return self.state_dir / "domains" / uuid

    # ------------------------------------------------------------ create
    def build(self, spec: VMSpec, undo: list[Callable[[], None]]) -> DomainSpec:
        """Resolve ``spec`` into a :class:`DomainSpec`, making files; register undo steps."""
        check_name("name", spec.name)
        key = spec.disk_key or spec.uid
        dspec = DomainSpec(
            name=spec.name,
            uuid=spec.uuid,
            vcpus=spec.cpu,
            memory_mib=spec.memory_mib,
            domain_type=self.domain_type,
            nics=list(spec.nics),
            kernel_boot=spec.kernel_boot,
            qemu_binary=self.qemu_binary,
        )
        dspec.validate()  # fills uuid, checks cpu/memory/nics before any file is made
        disk_dir = self.disks.dir_for(spec.disk_scope, key)  # validates scope and key
        if not disk_dir.exists():
            undo.append(lambda: self.disks.prune(spec.disk_scope, key))
        if spec.image is None and spec.kernel_boot is None:
            raise ValidationError("image", "neither image nor kernelBoot is set", "give an image reference")
        for i, v in enumerate(spec.volumes):
            v.validate(f"volumes[{i}]")
        run = self.run_dir(dspec.uuid)
        if run.exists():  # left by a crash between mkdir and define: no domain has this uuid (checked)
            shutil.rmtree(run)
        run.mkdir(parents=True)
        undo.append(lambda: shutil.rmtree(run, ignore_errors=True))
        if spec.image is not None:
            base = self.images.resolve(spec.image, "image")
            size = None
            if spec.root_size is not None:
                size = parse_quantity("rootSize", spec.root_size)
            path, created = self.disks.overlay(base, spec.disk_scope, key, size)
            if created:
                undo.append(lambda: path.unlink(missing_ok=True))
            dspec.disks.append(DiskSpec(name="root", path=path, format="qcow2", bus="virtio", boot_order=1))
        for i, v in enumerate(spec.volumes):
            dspec.disks.append(self._volume_disk(v, f"volumes[{i}]", spec.disk_scope, key, undo))
        if spec.cloud_init is not None or spec.cni_result is not None:
            ci = spec.cloud_init or cloudinit.CloudInit(instance_id=spec.uid)
            if spec.cni_result is not None and ci.network_config is None:
                ci = dataclasses.replace(
                    ci,
                    network_config=cloudinit.network_config_from_cni(
                        spec.cni_result, [n.mac for n in spec.nics]
                    ),
                )
            seed = cloudinit.make_seed_iso(ci, run / "seed.iso")
            dspec.disks.append(DiskSpec(name="cidata", path=seed, format="raw", bus="sata", cdrom=True))
        dspec.console_log = spec.console_log or run / "console.log"
        if dspec.nics:
            dspec.emulator = install_wrapper(self.wrapper_dir)
        dspec.metadata = {
            "uid": spec.uid,
            "diskScope": spec.disk_scope,
            "diskKey": key,
            "runDir": str(run),
            "consoleLog": str(dspec.console_log),
        }
        return dspec

    def _volume_disk(self, v: VolumeSpec, field: str, scope: str, key: str, undo: list) -> DiskSpec:
        if v.empty_disk is not None:
            path, created = self.disks.empty_disk(scope, key, v.name, v.empty_disk, v.format)
            fmt = v.format
        elif v.host_disk is not None:
            hd = v.host_disk
            path, created = self.disks.host_disk(v.name, hd.path, hd.type, hd.capacity)
            fmt = "raw"
        else:
            base = self.images.resolve(v.image or "", f"{field}.image")
            if v.read_only or v.cdrom:
                path, created, fmt = base.path, False, base.format
            else:
                path, created = self.disks.overlay(base, scope, key, None, name=f"vol-{v.name}")
                fmt = "qcow2"
        if created:
            undo.append(lambda: Path(path).unlink(missing_ok=True))
        return DiskSpec(name=v.name, path=path, format=fmt, bus=v.bus, read_only=v.read_only, cdrom=v.cdrom)

    def create(self, spec: VMSpec, *, start: bool = True, paused: bool = False) -> str:
        """Define (and start) the domain for ``spec``; returns its UUID. All-or-nothing."""
        with self._lock(spec.name):
            try:
                self.conn.lookupByName(spec.name)
            except libvirt.libvirtError as e:
                if _lv_error_code(e) != libvirt.VIR_ERR_NO_DOMAIN:
                    raise VMError(f"libvirt lookup of {spec.name!r} failed: {e}") from None
            else:
                raise DomainExists(f"name: a domain named {spec.name!r} exists; remove it first")
            if spec.uuid:
                try:
                    other = self.conn.lookupByUUIDString(spec.uuid)
                except libvirt.libvirtError:
                    pass
                else:
                    raise DomainExists(
                        f"uuid: domain {other.name()!r} already has uuid {spec.uuid}; use another"
                    )
            undo: list[Callable[[], None]] = []
            try:
                dspec = self.build(spec, undo)
                xml = domain_xml.build_domain_xml(dspec)
                try:
                    dom = self.conn.defineXML(xml)
                except libvirt.libvirtError as e:
                    raise VMError(f"libvirt refused the domain definition of {spec.name!r}: {e}") from None
                undo.append(lambda: self._undefine(dom))
                if start:
                    flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
                    try:
                        dom.createWithFlags(flags)
                    except libvirt.libvirtError as e:
                        raise VMError(f"starting domain {spec.name!r} failed: {e}") from None
                    undo.append(lambda: self._destroy_quiet(dom))
                return dspec.uuid
            except BaseException:
                for step in reversed(undo):
                    with contextlib.suppress(Exception):
                        step()
                raise

    @staticmethod
    def _destroy_quiet(dom: libvirt.virDomain) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()

    def _undefine(self, dom: libvirt.virDomain) -> None:
        self._destroy_quiet(dom)
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

    # ------------------------------------------------------------ lifecycle
    def start(self, name: str, paused: bool = False) -> None:
        """Start a defined domain (no-op when it runs)."""
        with self._lock(name):
            dom = self._dom(name)
            if dom.isActive():
                return
            try:
                dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED if paused else 0)
            except libvirt.libvirtError as e:
                raise VMError(f"starting domain {name!r} failed: {e}") from None

    def shutdown(self, name: str, timeout: float = 30.0, poll: float = 0.2) -> str:
        """ACPI power button, wait up to ``timeout`` s, then destroy. Returns ``not-running``,
        ``shutdown`` (the guest powered off) or ``destroyed``."""
        with self._lock(name):
            dom = self._dom(name)
            if not dom.isActive():
                return "not-running"
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.resume()  # a paused guest cannot see the button
            with contextlib.suppress(libvirt.libvirtError):
                dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not dom.isActive():
                    return "shutdown"
                time.sleep(poll)
            self._destroy_quiet(dom)
            return "destroyed" if not dom.isActive() else "shutdown"

    def destroy(self, name: str) -> None:
        """Hard stop (no-op when not running)."""
        with self._lock(name):
            self._destroy_quiet(self._dom(name))

    def suspend(self, name: str) -> None:
        with self._lock(name):
            dom = self._dom(name)
            if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
                try:
                    dom.suspend()
                except libvirt.libvirtError as e:
                    raise VMError(f"pausing {name!r} failed: {e}") from None

    def resume(self, name: str) -> None:
        with self._lock(name):
            dom = self._dom(name)
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                try:
                    dom.resume()
                except libvirt.libvirtError as e:
                    raise VMError(f"resuming {name!r} failed: {e}") from None

    def remove(self, name: str, delete_disks: bool = False) -> bool:
        """Destroy and undefine the domain and delete what create() made: run dir (seed ISO,
        default console log), pod-scoped disks always, VM-scoped disks only with ``delete_disks``.
        Idempotent: returns False when there was no such domain."""
        with self._lock(name):
            try:
                dom = self._dom(name)
            except DomainNotFound:
                return False
            md = domain_xml.read_metadata(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            self._undefine(dom)
            run = md.get("runDir")
            if run and Path(run).parent == self.state_dir / "domains":
                shutil.rmtree(run, ignore_errors=True)
            scope, key = md.get("diskScope"), md.get("diskKey")
            if scope and key and (scope == "pod" or delete_disks):
                self.disks.remove(scope, key)
            return True

    # ------------------------------------------------------------ facts
    def exists(self, name: str) -> bool:
        try:
            self._dom(name)
        except DomainNotFound:
            return False
        return True

    def state(self, name: str) -> DomainState:
        st, reason = self._dom(name).state()
        return map_state(st, reason)

    def metadata(self, name: str) -> dict[str, str]:
        return domain_xml.read_metadata(self._dom(name).XMLDesc(0))

    def xml(self, name: str, inactive: bool = False) -> str:
        return self._dom(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)

    def console_pty(self, name: str) -> str:
        """The pty of the running domain's serial console (``/dev/pts/N``, chosen by QEMU at start)."""
        root = ET.fromstring(self.xml(name))
        for el in (*root.iterfind("devices/serial"), *root.iterfind("devices/console")):
            src = el.find("source")
            path = src.get("path") if src is not None else el.get("tty")
            if el.get("type") == "pty" and path:
                return path
        raise VMError(f"domain {name} has no pty console (is it running?)")

    def stats(self, name: str) -> DomainStats:
        dom = self._dom(name)
        if not dom.isActive():
            raise VMError(f"domain {name!r} is not running: no stats")
        try:
            try:
                cpu_ns = int(dom.getCPUStats(True)[0].get("cpu_time", 0))
            except libvirt.libvirtError:
                # no cpuacct cgroup (cgroup_controllers = [] on these nodes): libvirt then sums
                # the QEMU threads' times from /proc for virDomainGetInfo
                cpu_ns = int(dom.info()[4])
            mem = dom.memoryStats()
        except libvirt.libvirtError as e:
            raise VMError(f"stats of {name!r} failed: {e}") from None
        return DomainStats(
            timestamp_ns=time.time_ns(),
            cpu_time_ns=cpu_ns,
            memory_actual_kib=int(mem.get("actual", 0)),
            memory_rss_kib=int(mem.get("rss", 0)),
            memory_available_kib=mem.get("available"),
            memory_unused_kib=mem.get("unused"),
        )

    def facts(self, name: str) -> dict[str, Any]:
        """State, accel, vCPUs, memory, disks (target -> file) and the console pty, for node mode."""
        dom = self._dom(name)
        xml = dom.XMLDesc(0)
        root = ET.fromstring(xml)
        st = self.state(name)
        return {
            "name": name,
            "uuid": dom.UUIDString(),
            "phase": st.phase,
            "reason": st.reason,
            "exitCode": st.exit_code,
            "accel": "kvm" if root.get("type") == "kvm" else "tcg",
            "vcpus": int(root.findtext("vcpu") or 0),
            "memoryKiB": int(root.findtext("memory") or 0),
            "disks": domain_xml.disk_targets(xml),
            "console": pty.get("path") if (pty := root.find("devices/serial/source")) is not None else None,
            "metadata": domain_xml.read_metadata(xml),
        }

    # ------------------------------------------------------------ hotplug
    def attach_volume(self, name: str, volume: VolumeSpec, persist: bool = False) -> str:
        """Hot-plug ``volume`` into the running domain; returns the guest target (e.g. ``vdb``).
        ``persist`` also adds it to the persistent definition. Idempotent per volume name."""
        volume.validate("volume")
        if volume.bus not in HOTPLUG_BUSES:
            raise ValidationError("volume.bus", f"{volume.bus!r} cannot be hot-plugged", "use virtio or scsi")
        with self._lock(name):
            dom = self._dom(name)
            if not dom.isActive():
                raise VMError(f"domain {name!r} is not running: cannot hot-plug {volume.name!r}")
            live = dom.XMLDesc(0)
            existing = self._find_disk(live, volume.name)
            if existing is not None:
                return existing.find("target").get("dev", "")  # type: ignore[union-attr]
            md = domain_xml.read_metadata(live)
            undo: list[Callable[[], None]] = []
            disk = self._volume_disk(
                volume, "volume", md.get("diskScope", "vm"), md.get("diskKey", name), undo
            )
            disk.target = next_target(disk.bus, set(domain_xml.disk_targets(live)))
            disk.validate("volume")
            flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if persist else 0)
            try:
                dom.attachDeviceFlags(domain_xml.disk_xml(disk), flags)
            except libvirt.libvirtError as e:
                for step in reversed(undo):
                    with contextlib.suppress(Exception):
                        step()
                raise VMError(f"hot-plug of {volume.name!r} into {name!r} failed: {e}") from None
            return disk.target

    @staticmethod
    def _find_disk(xml: str, volume_name: str) -> ET.Element | None:
        alias = domain_xml.user_alias(volume_name)
        for d in ET.fromstring(xml).iterfind("devices/disk"):
            a = d.find("alias")
            if a is not None and a.get("name") == alias:
                return d
        return None

    def detach_volume(self, name: str, volume_name: str, timeout: float = 30.0) -> bool:
        """Hot-unplug a volume and wait until the guest released it; also drop it from the persistent
        definition when it was attached with ``persist``. False if it was not attached."""
        with self._lock(name):
            dom = self._dom(name)
            disk = self._find_disk(dom.XMLDesc(0), volume_name)
            if disk is None:
                return False
            cfg = self._find_disk(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), volume_name)
            try:
                dom.detachDeviceFlags(ET.tostring(disk, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as e:
                raise VMError(f"hot-unplug of {volume_name!r} from {name!r} failed: {e}") from None
            deadline = time.monotonic() + timeout
            while self._find_disk(dom.XMLDesc(0), volume_name) is not None:
                if time.monotonic() > deadline:
                    raise VMError(
                        f"the guest in {name!r} did not release {volume_name!r} within {timeout:.0f}s"
                    )
                time.sleep(0.2)
            if cfg is not None:
                # a separate call: libvirt 9.0 left the persistent definition alone when LIVE|CONFIG
                # were given together and the guest acknowledged the unplug asynchronously
                try:
                    dom.detachDeviceFlags(
                        ET.tostring(cfg, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_CONFIG
                    )
                except libvirt.libvirtError as e:
                    raise VMError(
                        f"removing {volume_name!r} from the definition of {name!r} failed: {e}"
                    ) from None
            return True

    def list_managed(self) -> list[str]:
        """Names of all domains that carry edgevirt metadata."""
        out = []
        for dom in self.conn.listAllDomains():
            with contextlib.suppress(libvirt.libvirtError):
                if domain_xml.read_metadata(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
                    out.append(dom.name())
        return out


def dump_spec(spec: VMSpec) -> str:
    """JSON of a VMSpec (for logs and debugging)."""
    return json.dumps(dataclasses.asdict(spec), default=str, sort_keys=True)
