"""DomainManager: the one owner of every libvirt domain operation of edgevirt VMs.

Both users go through it: the CRI kvm handler (create/start/stop/remove/state/stats of a pod VM)
and the VirtualMachine controller's node mode (hotplug attach/detach, pause/resume, facts).
Operations on one domain are serialised by a per-name lock; libvirt is reached only through
:class:`.connection.Connection`.

``create`` resolves the image, makes the overlay, volumes and seed (:mod:`.build`), defines the
domain and starts it. If any step fails, everything this call made is undone in reverse order
(domain destroyed and undefined, files it created deleted) and the error is raised: nothing leaks.
``remove`` is idempotent and cleans up from the domain's own metadata, so it works in a process
that did not create the domain. Hot-plug lives in :mod:`.hotplug`; the guest agent and the
virtio-serial channels of exec and port-forward sessions in :mod:`.agent` and :mod:`.channels`.

Node mode finds a VM's domains by (namespace, uid) (:meth:`DomainManager.vm_domains`) and removes a
deleted VM with :meth:`DomainManager.remove_vm`.

Files: ``<state>/domains/<uuid>/`` (seed ISO, default console log; 0700), ``<state>/disks/ns/<namespace>/
{vm,pod}/<key>/`` (see :mod:`.disks`), ``<state>/images/`` (see :mod:`.images`), ``<state>/bin/edgevirt-qemu``
(``wrapper_dir``; libvirt keeps a capability cache file per emulator path: keep it stable).
"""

from __future__ import annotations

import contextlib
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from ..keyed_locks import KeyedLocks
from . import channels, domain_xml, hotplug
from .agent import GuestAgent
from .build import BuildContext, Undo, build_domain_spec, run_dir, run_undo
from .connection import Connection
from .disks import DiskManager, DiskOwner
from .domain_events import StopWatch
from .errors import DomainExists, DomainNotFound, ValidationError, VMError
from .images import ImageStore
from .model import DomainState, DomainStats, VMSpec, VolumeSpec
from .spec import HOTPLUG_BUSES
from .states import map_state


def _destroy_quiet(dom: libvirt.virDomain) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()


def _undefine(dom: libvirt.virDomain) -> None:
    _destroy_quiet(dom)
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


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
        tcg_tb_cache_mib: int | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.uri = uri
        self._domain_type = domain_type
        self.images = images if images is not None else ImageStore(self.state_dir)
        self.disks = disks if disks is not None else DiskManager(self.state_dir)
        self.qemu_binary = qemu_binary
        # libvirt caches QEMU capabilities per emulator path: keep the wrapper at a stable path
        self.wrapper_dir = wrapper_dir if wrapper_dir is not None else self.state_dir / "bin"
        self.tcg_tb_cache_mib = tcg_tb_cache_mib
        self._conn = Connection(uri)
        self._lock = KeyedLocks()

    # ------------------------------------------------------------ plumbing
    @property
    def domain_type(self) -> str:
        """``kvm`` or ``qemu``: from the constructor, else from :func:`runtimeclass.probe.probe`."""
        if self._domain_type is None:
            from runtimeclass.probe import DEFAULT_CACHE, probe

            self._domain_type = probe(cache_file=DEFAULT_CACHE).domain_type
        return self._domain_type

    def connect(self) -> None:
        """Open the libvirt connection now; raises :class:`VMError` when libvirt is not there."""
        self._conn.get()

    def lib_version(self) -> int:
        """libvirt's version; raises :class:`VMError` when libvirt does not answer."""
        return self._conn.lib_version()

    def close(self) -> None:
        self._conn.close()

    def watch_stops(self, on_stop: Callable[[str], None]) -> StopWatch:
        """Call ``on_stop(domain name)`` on the event loop's thread whenever a domain stops; the
        watch is its own connection (:mod:`.domain_events`); ``close()`` it when done."""
        return StopWatch(self.uri, on_stop).start()

    def run_dir(self, uuid: str) -> Path:
        return run_dir(self.state_dir, uuid)

    # ------------------------------------------------------------ create
    def create(self, spec: VMSpec, *, start: bool = True, paused: bool = False) -> str:
        """Define (and start) the domain for ``spec``; returns its UUID. All-or-nothing."""
        with self._lock(spec.name):
            if self.exists(spec.name):
                raise DomainExists(f"name: a domain named {spec.name!r} exists; remove it first")
            if spec.uuid:
                other = self._conn.lookup_uuid(spec.uuid)
                if other is not None:
                    raise DomainExists(
                        f"uuid: domain {other.name()!r} already has uuid {spec.uuid}; use another"
                    )
            undo: Undo = []
            try:
                ctx = BuildContext(
                    self.state_dir,
                    self.images,
                    self.disks,
                    self.domain_type,
                    self.qemu_binary,
                    self.wrapper_dir,
                    self.tcg_tb_cache_mib,
                )
                dspec = build_domain_spec(spec, ctx, undo)
                dom = self._conn.define(domain_xml.build_domain_xml(dspec), spec.name)
                undo.append(lambda: _undefine(dom))
                if start:
                    flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
                    try:
                        dom.createWithFlags(flags)
                    except libvirt.libvirtError as e:
                        raise VMError(f"starting domain {spec.name!r} failed: {e}") from None
                    undo.append(lambda: _destroy_quiet(dom))
                return dspec.uuid
            except BaseException:
                run_undo(undo)
                raise

    # ------------------------------------------------------------ lifecycle
    def start(self, name: str, paused: bool = False) -> None:
        """Start a defined domain (no-op when it runs)."""
        with self._lock(name):
            dom = self._conn.lookup(name)
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
            dom = self._conn.lookup(name)
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
            _destroy_quiet(dom)
            return "destroyed" if not dom.isActive() else "shutdown"

    def destroy(self, name: str) -> None:
        """Hard stop (no-op when not running)."""
        with self._lock(name):
            _destroy_quiet(self._conn.lookup(name))

    def suspend(self, name: str) -> None:
        with self._lock(name):
            dom = self._conn.lookup(name)
            if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
                try:
                    dom.suspend()
                except libvirt.libvirtError as e:
                    raise VMError(f"pausing {name!r} failed: {e}") from None

    def resume(self, name: str) -> None:
        with self._lock(name):
            dom = self._conn.lookup(name)
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                try:
                    dom.resume()
                except libvirt.libvirtError as e:
                    raise VMError(f"resuming {name!r} failed: {e}") from None

    def remove(self, name: str, delete_disks: bool = False) -> bool:
        """Destroy and undefine the domain and delete what create() made: the run dir (seed ISO,
        default console log); its disks with ``delete_disks``, and unscoped pod disks always
        (a namespace's pod disks live as long as the pod: :meth:`remove_pod_disks`). Idempotent:
        returns False when there was no such domain."""
        with self._lock(name):
            try:
                dom = self._conn.lookup(name)
            except DomainNotFound:
                return False
            md = domain_xml.read_metadata(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            _undefine(dom)
            run = md.get("runDir")
            if run and Path(run).parent == self.state_dir / "domains":
                shutil.rmtree(run, ignore_errors=True)
            scope, key, ns = md.get("diskScope"), md.get("diskKey"), md.get("namespace", "")
            if scope and key and (delete_disks or (scope == "pod" and not ns)):
                with contextlib.suppress(ValidationError):
                    self.disks.remove_owner(DiskOwner(scope, key, ns))
            return True

    # ------------------------------------------------------------ per VM and pod (node mode, handler)
    def vm_domains(self, namespace: str, uid: str) -> list[str]:
        """Names of the domains of VM (``namespace``, ``uid``): the metadata names both (a domain
        defined before disks had namespaces: the uid alone)."""
        out = []
        for name in self.list_managed():
            with contextlib.suppress(VMError):
                md = self.metadata(name)
                if md.get("uid") == uid and md.get("namespace", namespace) == namespace:
                    out.append(name)
        return out

    def remove_vm(self, namespace: str, uid: str) -> None:
        """Remove the deleted VM's domains and all its disks (also those of the unscoped layout).
        Idempotent; the disks go even when libvirt does not answer (the error is raised after)."""
        try:
            for name in self.vm_domains(namespace, uid):
                self.remove(name, delete_disks=True)
        finally:
            self.disks.remove_vm_disks(namespace, uid)

    def remove_pod_disks(self, namespace: str, pod_uid: str) -> None:
        """Delete the disks of the removed kvm pod (``namespace``, ``pod_uid``). Idempotent."""
        self.disks.remove_owner(DiskOwner("pod", pod_uid, namespace))

    def has_legacy_vm_disks(self, uid: str) -> bool:
        return self.disks.has_legacy_vm_disks(uid)

    def adopt_legacy_vm_disks(self, namespace: str, uid: str) -> bool:
        return self.disks.adopt_legacy_vm_disks(namespace, uid)

    # ------------------------------------------------------------ facts
    def exists(self, name: str) -> bool:
        try:
            self._conn.lookup(name)
        except DomainNotFound:
            return False
        return True

    def state(self, name: str) -> DomainState:
        st, reason = self._conn.lookup(name).state()
        return map_state(st, reason)

    def metadata(self, name: str) -> dict[str, str]:
        return domain_xml.read_metadata(self.xml(name))

    def xml(self, name: str, inactive: bool = False) -> str:
        return str(self._conn.lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0))

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
        dom = self._conn.lookup(name)
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
        dom = self._conn.lookup(name)
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

    def list_managed(self) -> list[str]:
        """Names of all domains that carry edgevirt metadata."""
        out = []
        for dom in self._conn.list_all():
            with contextlib.suppress(libvirt.libvirtError):
                if domain_xml.read_metadata(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
                    out.append(str(dom.name()))
        return out

    # ------------------------------------------------------------ hotplug
    def attach_volume(self, name: str, volume: VolumeSpec, persist: bool = False) -> str:
        """Hot-plug ``volume`` into the running domain; returns the guest target (e.g. ``vdb``).
        ``persist`` also adds it to the persistent definition. Idempotent per volume name."""
        volume.validate("volume")
        if volume.bus not in HOTPLUG_BUSES:
            raise ValidationError("volume.bus", f"{volume.bus!r} cannot be hot-plugged", "use virtio or scsi")
        with self._lock(name):
            dom = self._conn.lookup(name)
            return hotplug.attach_volume(name, dom, volume, persist, self.images, self.disks)

    def detach_volume(self, name: str, volume_name: str, timeout: float = 30.0) -> bool:
        """Hot-unplug a volume and wait until the guest released it; also drop it from the persistent
        definition when it was attached with ``persist``. False if it was not attached."""
        with self._lock(name):
            return hotplug.detach_volume(name, self._conn.lookup(name), volume_name, timeout)

    # ------------------------------------------------------------ the guest (exec, port-forward)
    def guest_agent(self, name: str) -> GuestAgent:
        """The QEMU guest agent of domain ``name`` (:mod:`.agent`)."""
        return GuestAgent(lambda cmd, timeout: self._conn.agent_command(name, cmd, timeout), name)

    def plug_channel(self, name: str, port_name: str) -> str:
        """Hot-plug virtio-serial channel ``port_name`` into the running domain; its host socket."""
        return channels.plug(name, self._conn.lookup(name), port_name)

    def unplug_channel(self, name: str, port_name: str) -> bool:
        """Hot-unplug channel ``port_name``; False when it (or the domain) is gone already."""
        try:
            dom = self._conn.lookup(name)
        except DomainNotFound:
            return False
        return channels.unplug(name, dom, port_name)

    def session_channels(self, name: str) -> list[str]:
        """The channels sessions plugged into the running domain (to sweep a crashed process's)."""
        return channels.session_channels(self.xml(name))
