"""The kvm runtime handler of edgevirt-cri: a CRI pod is a network namespace with a macvtap NIC, and
its one container is a libvirt/QEMU virtual machine.

* RunPodSandbox: a netns ``cni-kvm-<id[:12]>``, CNI ADD of the VM network's conflist (the ``macvtap``
  plugin; ``K8S_POD_*`` args; the MAC from ``edgevirt.io/mac``, or one derived from the VM's UID so
  a VirtualMachine keeps its MAC); the pod IP comes from the CNI result.
* CreateContainer: the libvirt domain (defined, not started) through :class:`DomainManager`: the
  image (``edgevirt.io/image``, else the container image: OCI containerDisk, ``file://`` under an
  allowed root, ``https://...#sha256=``), a qcow2 overlay kept per VM identity (``edgevirt.io/vm-uid``)
  or per container otherwise, a NoCloud seed (user-data annotation, network config from the CNI
  result), the tap-fd NIC, vCPUs/memory from the container's resources, the serial console into
  the container's CRI log (converted by :class:`ConsoleLogConverter`).
* Start/Stop/Remove/Status/Stats map to the domain; StopContainer is ACPI shutdown, destroy after
  the timeout. Attach bridges to the serial console through the shim's streaming server
  (:mod:`cri_shim.streaming`); Exec and PortForward answer UNIMPLEMENTED naming what to use instead.

Everything the handler made is recorded on disk (:mod:`.pod_records`) before it is made, so a
restarted shim reports the same IDs and states and a failure halfway is rolled back (also one left
by a kill -9: records still in their ``setup`` phase are torn down at start).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from .. import protos
from ..backends.base import TypedBackend
from ..errors import BackendError, invalid, unimplemented
from ..kvm.contract import ANN_IMAGE, ANN_MAC, ContractError, parse_pod_annotations, to_volume_spec
from ..streaming import StreamingServer, open_pty
from . import cni_exec
from .cloudinit import CloudInit
from .console_log import ConsoleLogConverter
from .disks import DiskManager
from .errors import DomainNotFound, ImageError, ValidationError, VMError
from .images import ImageStore, SkopeoSource
from .lifecycle import DomainManager
from .model import VMSpec
from .nics import DEFAULT_DEVICE_DIR, nics_from_cni_result
from .pod_records import Records
from .spec import KernelBoot, check_mac

log = logging.getLogger("edgevirt-cri.kvm")

HANDLER = "kvm"
NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "cni-kvm-"
DOMAIN_PREFIX = "edgevirt-"
_K8S_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?$")
_IMAGE_ID = re.compile(r"^(sha256:)?[0-9a-f]{64}$")
NOT_SUPPORTED = (
    "{what} is not supported for VM pods (runtime handler kvm): the guest runs its own OS with no "
    "agent; use `kubectl logs` for the serial console output, `kubectl attach -it POD` (or "
    "`kubectl vm console NAME`) for an interactive console, and the VM's IP for its services"
)


def _now() -> int:
    return time.time_ns()


def _check_name(field: str, value: str) -> str:
    if not _K8S_NAME.match(value or ""):
        raise invalid(field, f"{value!r} is not a Kubernetes name", "use letters, digits, '-', '.', '_'")
    return value


def derived_mac(uid: str) -> str:
    """A stable, locally administered unicast MAC for a VM identity."""
    h = hashlib.sha256(uid.encode()).hexdigest()
    return "02:" + ":".join(h[i : i + 2] for i in range(0, 10, 2))


def _under(path: Path, roots: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == r or r in real.parents for r in roots)


class KvmBackend(TypedBackend):
    """CRI sandboxes and containers as network namespaces and libvirt domains."""

    def __init__(
        self,
        name: str,
        *,
        state_dir: Path,
        vm_state_dir: Path,
        cni_conflist: Path,
        cni_bin_dirs: list[Path],
        libvirt_uri: str = "qemu:///system",
        image_roots: list[Path] | None = None,
        insecure_registries: list[str] | None = None,
        domain_type: str | None = None,
        default_memory_mib: int = 256,
        manager: DomainManager | None = None,
        streaming_address: str = "127.0.0.1:0",
    ) -> None:
        self.name = name
        self.streaming_address = streaming_address
        self._streaming: StreamingServer | None = None
        self.state_dir = Path(state_dir)
        self.image_roots = [Path(os.path.realpath(r)) for r in (image_roots or [])]
        self.default_memory_mib = default_memory_mib
        self._reason: str | None = None
        self.network: cni_exec.ConfList | None = None
        try:
            self.network = cni_exec.ConfList(Path(cni_conflist), [Path(d) for d in cni_bin_dirs])
            missing = self.network.missing_plugins()
            if missing:
                self._reason = (
                    f"CNI plugin(s) {', '.join(missing)} of {cni_conflist} not found in "
                    f"{', '.join(map(str, cni_bin_dirs))}"
                )
        except cni_exec.CNIError as e:
            self._reason = str(e)
        plugin0 = self.network.conf["plugins"][0] if self.network else {}
        self.device_dir = Path(plugin0.get("deviceDir") or DEFAULT_DEVICE_DIR)
        self.manager = manager or DomainManager(
            Path(vm_state_dir),
            uri=libvirt_uri,
            domain_type=domain_type,
            images=ImageStore(
                Path(vm_state_dir),
                file_roots=self.image_roots,
                container_disks=SkopeoSource(insecure_registries or ()),
            ),
            disks=DiskManager(Path(vm_state_dir)),
        )
        if self._reason is None:
            try:
                self.manager.connect()  # now: a node without libvirt has no kvm handler
            except VMError as e:
                self._reason = str(e)
        self.sandboxes = Records(self.state_dir, "sandboxes")
        self.containers = Records(self.state_dir, "containers")
        self._locks: dict[str, threading.RLock] = {}
        self._locks_lock = threading.Lock()
        self._converters: dict[str, tuple[ConsoleLogConverter, threading.Event]] = {}
        self.api = protos.api()
        if self._reason is None:
            self._recover()

    # ------------------------------------------------------------ backend interface
    def unavailable_reason(self) -> str | None:
        return self._reason

    def handler_works(self, handler: str) -> bool:
        try:
            return bool(self.manager.lib_version())
        except Exception:
            return False

    def close(self) -> None:
        for cid in list(self._converters):
            self._stop_console(cid, final=False)
        if self._streaming is not None:
            self._streaming.close()
        self.manager.close()

    def status(self, req: Any) -> Any:
        """RuntimeReady: libvirt answers; NetworkReady: the VM network's plugins are installed."""
        api = self.api
        out = api.StatusResponse()
        try:
            self.manager.lib_version()
            rt = (True, "", "")
        except Exception as e:
            rt = (False, "LibvirtUnavailable", str(e))
        missing = self.network.missing_plugins() if self.network else ["(no conflist)"]
        net = (not missing, "CNIPluginMissing" if missing else "", ", ".join(missing))
        for kind, (ok, reason, msg) in (("RuntimeReady", rt), ("NetworkReady", net)):
            out.status.conditions.add(type=kind, status=ok, reason=reason, message=msg)
        out.runtime_handlers.add(name=HANDLER)
        return out

    # ------------------------------------------------------------ plumbing
    def _lock(self, key: str) -> threading.RLock:
        with self._locks_lock:
            return self._locks.setdefault(key, threading.RLock())

    def _sandbox(self, id_: str) -> dict[str, Any]:
        rec = self.sandboxes.resolve(id_)
        if rec is None or rec.get("phase") == "setup":
            raise BackendError(grpc.StatusCode.NOT_FOUND, f"pod sandbox {id_!r} not found (kvm handler)")
        return rec

    def _container(self, id_: str) -> dict[str, Any]:
        rec = self.containers.resolve(id_)
        if rec is None or rec.get("phase") == "setup":
            raise BackendError(grpc.StatusCode.NOT_FOUND, f"container {id_!r} not found (kvm handler)")
        return rec

    @staticmethod
    def _vm_error(e: Exception) -> BackendError:
        if isinstance(e, ValidationError | ImageError):
            return BackendError(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if isinstance(e, DomainNotFound):
            return BackendError(grpc.StatusCode.NOT_FOUND, str(e))
        return BackendError(grpc.StatusCode.UNKNOWN, str(e))

    # ------------------------------------------------------------ netns
    @staticmethod
    def _netns_create(name: str) -> str:
        r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if r.returncode != 0:
            raise VMError(f"cannot create network namespace {name}: {r.stderr.strip()}")
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], capture_output=True, check=False)
        return str(NETNS_DIR / name)

    @staticmethod
    def _netns_delete(name: str) -> None:
        if name and (NETNS_DIR / name).exists():
            r = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)
            if r.returncode != 0 and (NETNS_DIR / name).exists():
                raise VMError(f"cannot delete network namespace {name}: {r.stderr.strip()}")

    def _attachment(self, sb: dict[str, Any]) -> cni_exec.Attachment:
        md = sb["metadata"]
        caps: tuple[tuple[str, Any], ...] = (("mac", sb["mac"]),) if sb.get("mac") else ()
        netns = str(NETNS_DIR / sb["netns"]) if (NETNS_DIR / sb["netns"]).exists() else ""
        return cni_exec.Attachment(
            container_id=sb["id"],
            netns=netns,
            args=(
                ("K8S_POD_NAMESPACE", md["namespace"]),
                ("K8S_POD_NAME", md["name"]),
                ("K8S_POD_INFRA_CONTAINER_ID", sb["id"]),
                ("K8S_POD_UID", md["uid"]),
            ),
            capabilities=caps,
        )

    def _teardown_network(self, sb: dict[str, Any]) -> None:
        """CNI DEL (with the cached result) and netns removal; raises if DEL failed."""
        assert self.network is not None
        err: Exception | None = None
        if sb.get("network_added"):
            try:
                self.network.delete(self._attachment(sb), sb.get("cni_result"))
            except cni_exec.CNIError as e:
                err = e
        with contextlib.suppress(VMError):
            self._netns_delete(sb.get("netns", ""))
        if err is not None:
            raise err

    # ------------------------------------------------------------ recovery
    def _recover(self) -> None:
        for sb in self.sandboxes.all():
            if sb.get("phase") == "setup":  # the shim died inside RunPodSandbox: undo it
                log.warning("pod sandbox %s was left half-made; removing what it made", sb["id"][:12])
                with contextlib.suppress(Exception):
                    self._teardown_network(sb)
                self.sandboxes.delete(sb["id"])
        for c in self.containers.all():
            if c.get("phase") == "setup":
                log.warning("container %s was left half-made; removing its domain", c["id"][:12])
                with contextlib.suppress(Exception):
                    self.manager.remove(c["domain"])
                self.containers.delete(c["id"])
            elif c.get("started_at") and not c.get("finished_at"):
                self._start_console(c)

    # ------------------------------------------------------------ console
    def _start_console(self, c: dict[str, Any]) -> None:
        if c["id"] in self._converters or not c.get("console_source"):
            return
        conv = ConsoleLogConverter(
            Path(c["console_source"]),
            Path(c["log_path"]),
            state_file=self.containers.dir / f"{c['id']}.console",
        )
        _thread, stop = conv.start_thread()
        self._converters[c["id"]] = (conv, stop)

    def _stop_console(self, cid: str, final: bool = True) -> None:
        entry = self._converters.pop(cid, None)
        if entry is None:
            return
        conv, stop = entry
        stop.set()
        with contextlib.suppress(Exception):
            conv.pump(final=final)
        conv.close()

    # ------------------------------------------------------------ sandboxes
    def run_pod_sandbox(self, req: Any) -> Any:
        api = self.api
        if req.runtime_handler != HANDLER:
            raise invalid("runtime_handler", f"{req.runtime_handler!r} is not served here", "use kvm")
        cfg = req.config
        md = cfg.metadata
        _check_name("config.metadata.name", md.name)
        _check_name("config.metadata.namespace", md.namespace)
        _check_name("config.metadata.uid", md.uid)
        ann = dict(cfg.annotations)
        try:
            vm = parse_pod_annotations(ann)
        except ContractError as e:
            raise invalid("config.annotations", str(e), "fix the VM pod's annotations") from None
        mac = ann.get(ANN_MAC) or (derived_mac(vm.vm_uid) if vm is not None else None)
        if mac:
            try:
                mac = check_mac(f"config.annotations[{ANN_MAC}]", mac)
            except ValidationError as e:
                raise invalid(e.field, e.problem, e.fix) from None
        sid = secrets.token_hex(32)
        sb: dict[str, Any] = {
            "id": sid,
            "phase": "setup",
            "metadata": {"name": md.name, "namespace": md.namespace, "uid": md.uid, "attempt": md.attempt},
            "labels": dict(cfg.labels),
            "annotations": ann,
            "log_directory": cfg.log_directory,
            "hostname": cfg.hostname,
            "created_at": _now(),
            "netns": NETNS_PREFIX + sid[:12],
            "mac": mac,
            "vm_uid": vm.vm_uid if vm else "",
            "network_added": False,
            "cni_result": None,
            "state": "NOTREADY",
        }
        with self._lock(sid):
            self.sandboxes.put(sb)
            try:
                self._netns_create(sb["netns"])
                assert self.network is not None
                sb["network_added"] = True  # DEL is due from here on, even if ADD fails halfway
                sb["cni_result"] = self.network.add(self._attachment(sb))
                sb.update(phase="ready", state="READY")
                self.sandboxes.put(sb)
            except BaseException as e:
                with contextlib.suppress(Exception):
                    self._teardown_network(sb)
                self.sandboxes.delete(sid)
                if isinstance(e, cni_exec.CNIError):
                    raise BackendError(
                        grpc.StatusCode.UNKNOWN,
                        f"setting up the VM network {self.network.name if self.network else ''} "
                        f"for pod {md.namespace}/{md.name} failed: {e}",
                    ) from None
                if isinstance(e, VMError):
                    raise self._vm_error(e) from None
                raise
        log.info("pod sandbox %s (%s/%s) ready", sid[:12], md.namespace, md.name)
        return api.RunPodSandboxResponse(pod_sandbox_id=sid)

    def _containers_of(self, sid: str) -> list[dict[str, Any]]:
        return [c for c in self.containers.all() if c["sandbox_id"] == sid]

    def stop_pod_sandbox(self, req: Any) -> Any:
        sb = self._sandbox(req.pod_sandbox_id)
        with self._lock(sb["id"]):
            for c in self._containers_of(sb["id"]):
                try:
                    self._stop_container(c, timeout=0)
                except VMError as e:
                    raise self._vm_error(e) from None
            if sb.get("network_added") or (NETNS_DIR / sb["netns"]).exists():
                try:
                    self._teardown_network(sb)
                except cni_exec.CNIError as e:
                    raise BackendError(
                        grpc.StatusCode.UNKNOWN, f"tearing down the pod network failed: {e}"
                    ) from None
                sb = self.sandboxes.update(sb["id"], network_added=False, state="NOTREADY")
            elif sb.get("state") != "NOTREADY":
                self.sandboxes.update(sb["id"], state="NOTREADY")
        return self.api.StopPodSandboxResponse()

    def remove_pod_sandbox(self, req: Any) -> Any:
        sb = self._sandbox(req.pod_sandbox_id)
        with self._lock(sb["id"]):
            self.stop_pod_sandbox(self.api.StopPodSandboxRequest(pod_sandbox_id=sb["id"]))
            for c in self._containers_of(sb["id"]):
                self._remove_container(c)
            self.sandboxes.delete(sb["id"])
        log.info("pod sandbox %s removed", sb["id"][:12])
        return self.api.RemovePodSandboxResponse()

    def _sandbox_message(self, sb: dict[str, Any], cls: Any) -> Any:
        api = self.api
        md = sb["metadata"]
        return cls(
            id=sb["id"],
            metadata=api.PodSandboxMetadata(
                name=md["name"], namespace=md["namespace"], uid=md["uid"], attempt=md["attempt"]
            ),
            state=api.SANDBOX_READY if sb["state"] == "READY" else api.SANDBOX_NOTREADY,
            created_at=sb["created_at"],
            labels=sb["labels"],
            annotations=sb["annotations"],
            runtime_handler=HANDLER,
        )

    def pod_sandbox_status(self, req: Any) -> Any:
        api = self.api
        sb = self._sandbox(req.pod_sandbox_id)
        status = self._sandbox_message(sb, api.PodSandboxStatus)
        ips = cni_exec.pod_ips(sb.get("cni_result")) if sb["state"] == "READY" else []
        if ips:
            status.network.ip = ips[0]
            status.network.additional_ips.extend(api.PodIP(ip=ip) for ip in ips[1:])
        status.linux.namespaces.options.network = api.POD
        info = {}
        if req.verbose:
            import json

            info["info"] = json.dumps(
                {
                    "netns": str(NETNS_DIR / sb["netns"]),
                    "cniResult": sb.get("cni_result"),
                    "mac": sb.get("mac"),
                }
            )
        return api.PodSandboxStatusResponse(status=status, info=info)

    def list_pod_sandbox(self, req: Any) -> Any:
        api = self.api
        f = req.filter
        out = []
        want_id = ""
        if f.id:
            hit = self.sandboxes.resolve(f.id)
            if hit is None:
                return api.ListPodSandboxResponse()
            want_id = hit["id"]
        for sb in self.sandboxes.all():
            if sb.get("phase") == "setup" or (want_id and sb["id"] != want_id):
                continue
            item = self._sandbox_message(sb, api.PodSandbox)
            if f.HasField("state") and item.state != f.state.state:
                continue
            if any(sb["labels"].get(k) != v for k, v in f.label_selector.items()):
                continue
            out.append(item)
        return api.ListPodSandboxResponse(items=out)

    # ------------------------------------------------------------ containers
    def _image_ref(self, sb: dict[str, Any], cfg: Any) -> str:
        ref = sb["annotations"].get(ANN_IMAGE) or cfg.image.user_specified_image or cfg.image.image
        if not ref:
            raise invalid("config.image.image", "is empty", "give the VM disk image reference")
        if _IMAGE_ID.match(ref):
            raise invalid(
                "config.image.image",
                f"{ref!r} is an image ID, not a reference the kvm handler can fetch",
                "pass the image reference (user_specified_image) or the edgevirt.io/image annotation",
            )
        return ref

    def _resources(self, cfg: Any) -> tuple[int, int]:
        res = cfg.linux.resources
        cpus = 1
        if res.cpu_quota > 0 and res.cpu_period > 0:
            cpus = max(1, math.ceil(res.cpu_quota / res.cpu_period))
        mem = self.default_memory_mib
        if res.memory_limit_in_bytes > 0:
            mem = max(64, res.memory_limit_in_bytes // (1024 * 1024))
        return cpus, mem

    def _kernel_boot(self, vm: Any) -> KernelBoot | None:
        if vm is None or not vm.kernel_boot:
            return None
        kb = vm.kernel_boot
        for key in ("kernel", "initrd"):
            if kb.get(key) and not _under(Path(kb[key]), self.image_roots):
                raise invalid(
                    f"annotations[edgevirt.io/kernel-boot].{key}",
                    f"{kb[key]!r} is outside the allowed image roots "
                    f"({', '.join(map(str, self.image_roots)) or 'none configured'})",
                    "put the kernel and initrd under an allowed image root",
                )
        return KernelBoot(
            kernel=Path(kb["kernel"]),
            initrd=Path(kb["initrd"]) if kb.get("initrd") else None,
            cmdline=str(kb.get("cmdline", "")),
        )

    def create_container(self, req: Any) -> Any:
        sb = self._sandbox(req.pod_sandbox_id)
        cfg = req.config
        _check_name("config.metadata.name", cfg.metadata.name)
        with self._lock(sb["id"]):
            if sb["state"] != "READY":
                raise BackendError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"pod sandbox {sb['id'][:12]} is not ready"
                )
            live = [c for c in self._containers_of(sb["id"]) if self._state(c)[0] != "EXITED"]
            if live:
                raise BackendError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"a VM pod has one container; {live[0]['metadata']['name']!r} "
                    f"({live[0]['id'][:12]}) still exists in pod sandbox {sb['id'][:12]}",
                )
            rel = cfg.log_path
            log_path = ""
            if sb.get("log_directory") and rel:
                log_dir = Path(sb["log_directory"])
                log_path = os.path.normpath(log_dir / rel)
                if not Path(log_path).is_relative_to(log_dir) or Path(rel).is_absolute():
                    raise invalid(
                        "config.log_path", f"{rel!r} leaves the pod's log directory", "use a relative path"
                    )
            vm = parse_pod_annotations(sb["annotations"])
            ref = self._image_ref(sb, cfg)
            cpus, mem = self._resources(cfg)
            cid = secrets.token_hex(32)
            uid = vm.vm_uid if vm else sb["metadata"]["uid"]
            spec = VMSpec(
                name=DOMAIN_PREFIX + cid[:20],
                uid=uid,
                cpu=cpus,
                memory_mib=mem,
                image=ref,
                kernel_boot=self._kernel_boot(vm),
                cloud_init=CloudInit(
                    instance_id=uid,
                    hostname=sb.get("hostname") or sb["metadata"]["name"],
                    **({"user_data": vm.user_data} if vm and vm.user_data else {}),
                ),
                cni_result=sb.get("cni_result"),
                nics=nics_from_cni_result(sb["cni_result"], sb["id"], self.device_dir)
                if sb.get("cni_result")
                else [],
                volumes=[to_volume_spec(v) for v in (vm.volumes if vm else ()) if not v.get("hotpluggable")],
                disk_scope="vm" if vm else "pod",
                disk_key=vm.vm_uid if vm else cid,
            )
            c: dict[str, Any] = {
                "id": cid,
                "phase": "setup",
                "sandbox_id": sb["id"],
                "metadata": {"name": cfg.metadata.name, "attempt": cfg.metadata.attempt},
                "image": ref,
                "image_spec": cfg.image.image,
                "labels": dict(cfg.labels),
                "annotations": dict(cfg.annotations),
                "log_path": log_path,
                "domain": spec.name,
                "created_at": _now(),
                "started_at": 0,
                "finished_at": 0,
                "exit_code": 0,
                "reason": "",
                "message": "",
            }
            self.containers.put(c)
            try:
                self.manager.create(spec, start=False)
                console = self.manager.metadata(spec.name).get("consoleLog", "")
            except BaseException as e:
                with contextlib.suppress(Exception):
                    self.manager.remove(spec.name)
                self.containers.delete(cid)
                if isinstance(e, VMError):
                    raise self._vm_error(e) from None
                raise
            if log_path:
                Path(log_path).parent.mkdir(parents=True, exist_ok=True)
                Path(log_path).touch()
            self.containers.update(cid, phase="created", console_source=console)
        log.info("container %s (domain %s) created in pod %s", cid[:12], spec.name, sb["id"][:12])
        return self.api.CreateContainerResponse(container_id=cid)

    def start_container(self, req: Any) -> Any:
        c = self._container(req.container_id)
        with self._lock(c["id"]):
            if c.get("started_at"):
                if self._state(c)[0] == "RUNNING":
                    return self.api.StartContainerResponse()
                raise BackendError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"container {c['id'][:12]} has already run; create a new one",
                )
            # the console log starts fresh for each boot (kubelet keeps the CRI log per container)
            with contextlib.suppress(OSError):
                Path(c["console_source"]).unlink(missing_ok=True)
            try:
                self.manager.start(c["domain"])
            except VMError as e:
                raise self._vm_error(e) from None
            c = self.containers.update(c["id"], started_at=_now())
            self._start_console(c)
        return self.api.StartContainerResponse()

    def _stop_container(self, c: dict[str, Any], timeout: float) -> None:
        with self._lock(c["id"]):
            if c.get("started_at") and not c.get("finished_at"):
                try:
                    how = (
                        self.manager.shutdown(c["domain"], timeout=timeout)
                        if timeout > 0
                        else (self.manager.destroy(c["domain"]) or "destroyed")
                    )
                except DomainNotFound:
                    how = "gone"
                log.info("container %s stopped (%s)", c["id"][:12], how)
            self._state(self.containers.get(c["id"]) or c)  # records finished_at and the exit code
            self._stop_console(c["id"])

    def stop_container(self, req: Any) -> Any:
        c = self._container(req.container_id)
        try:
            self._stop_container(c, float(req.timeout))
        except VMError as e:
            raise self._vm_error(e) from None
        return self.api.StopContainerResponse()

    def _remove_container(self, c: dict[str, Any]) -> None:
        with self._lock(c["id"]):
            self._stop_console(c["id"])
            try:
                self.manager.remove(c["domain"])
            except VMError as e:
                raise self._vm_error(e) from None
            (self.containers.dir / f"{c['id']}.console").unlink(missing_ok=True)
            self.containers.delete(c["id"])

    def remove_container(self, req: Any) -> Any:
        self._remove_container(self._container(req.container_id))
        return self.api.RemoveContainerResponse()

    def _state(self, c: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(CREATED | RUNNING | EXITED, the record); an observed end is recorded once, so the
        answer never flips back."""
        if c.get("finished_at"):
            return "EXITED", c
        if not c.get("started_at"):
            return "CREATED", c
        try:
            st = self.manager.state(c["domain"])
        except DomainNotFound:
            c = self.containers.update(
                c["id"],
                finished_at=_now(),
                exit_code=137,
                reason="DomainGone",
                message=f"libvirt domain {c['domain']} no longer exists",
            )
            return "EXITED", c
        except VMError:
            return "RUNNING", c  # libvirt away: the last known state (VMs run on without libvirtd)
        if st.running:
            return "RUNNING", c
        code = st.exit_code if st.exit_code is not None else 1
        c = self.containers.update(
            c["id"],
            finished_at=_now(),
            exit_code=code,
            reason="Completed" if code == 0 else "Error",
            message=f"domain {st.phase} ({st.reason})",
        )
        self._stop_console(c["id"])
        return "EXITED", c

    def _container_state_enum(self, state: str) -> int:
        return {
            "CREATED": self.api.CONTAINER_CREATED,
            "RUNNING": self.api.CONTAINER_RUNNING,
            "EXITED": self.api.CONTAINER_EXITED,
        }[state]

    def _container_message(self, c: dict[str, Any], state: str) -> Any:
        api = self.api
        return api.Container(
            id=c["id"],
            pod_sandbox_id=c["sandbox_id"],
            metadata=api.ContainerMetadata(name=c["metadata"]["name"], attempt=c["metadata"]["attempt"]),
            image=api.ImageSpec(image=c["image_spec"] or c["image"], user_specified_image=c["image"]),
            image_ref=c["image"],
            state=self._container_state_enum(state),
            created_at=c["created_at"],
            labels=c["labels"],
            annotations=c["annotations"],
        )

    def container_status(self, req: Any) -> Any:
        api = self.api
        c = self._container(req.container_id)
        state, c = self._state(c)
        status = api.ContainerStatus(
            id=c["id"],
            metadata=api.ContainerMetadata(name=c["metadata"]["name"], attempt=c["metadata"]["attempt"]),
            state=self._container_state_enum(state),
            created_at=c["created_at"],
            started_at=c.get("started_at") or 0,
            finished_at=c.get("finished_at") or 0,
            exit_code=c.get("exit_code", 0) if state == "EXITED" else 0,
            image=api.ImageSpec(image=c["image_spec"] or c["image"], user_specified_image=c["image"]),
            image_ref=c["image"],
            reason=c.get("reason", "") if state == "EXITED" else "",
            message=c.get("message", "") if state == "EXITED" else "",
            labels=c["labels"],
            annotations=c["annotations"],
            log_path=c["log_path"],
        )
        info = {}
        if req.verbose:
            import json

            info["info"] = json.dumps({"domain": c["domain"], "sandboxID": c["sandbox_id"]})
        return api.ContainerStatusResponse(status=status, info=info)

    def list_containers(self, req: Any) -> Any:
        api = self.api
        f = req.filter
        want_id = ""
        if f.id:
            hit = self.containers.resolve(f.id)
            if hit is None:
                return api.ListContainersResponse()
            want_id = hit["id"]
        want_sb = ""
        if f.pod_sandbox_id:
            sb = self.sandboxes.resolve(f.pod_sandbox_id)
            if sb is None:
                return api.ListContainersResponse()
            want_sb = sb["id"]
        out = []
        for c in self.containers.all():
            if c.get("phase") == "setup" or (want_id and c["id"] != want_id):
                continue
            if want_sb and c["sandbox_id"] != want_sb:
                continue
            if any(c["labels"].get(k) != v for k, v in f.label_selector.items()):
                continue
            state, c = self._state(c)
            item = self._container_message(c, state)
            if f.HasField("state") and item.state != f.state.state:
                continue
            out.append(item)
        return api.ListContainersResponse(containers=out)

    def _stats(self, c: dict[str, Any]) -> Any:
        api = self.api
        stats = api.ContainerStats(
            attributes=api.ContainerAttributes(
                id=c["id"],
                metadata=api.ContainerMetadata(name=c["metadata"]["name"], attempt=c["metadata"]["attempt"]),
                labels=c["labels"],
                annotations=c["annotations"],
            )
        )
        if self._state(c)[0] != "RUNNING":
            return stats
        try:
            s = self.manager.stats(c["domain"])
        except VMError:
            return stats
        stats.cpu.timestamp = s.timestamp_ns
        stats.cpu.usage_core_nano_seconds.value = s.cpu_time_ns
        stats.memory.timestamp = s.timestamp_ns
        stats.memory.working_set_bytes.value = s.memory_rss_kib * 1024
        stats.memory.rss_bytes.value = s.memory_rss_kib * 1024
        stats.memory.usage_bytes.value = s.memory_rss_kib * 1024
        return stats

    def container_stats(self, req: Any) -> Any:
        return self.api.ContainerStatsResponse(stats=self._stats(self._container(req.container_id)))

    def list_container_stats(self, req: Any) -> Any:
        f = req.filter
        out = []
        for c in self.containers.all():
            if c.get("phase") == "setup" or (f.id and not c["id"].startswith(f.id)):
                continue
            if f.pod_sandbox_id and not c["sandbox_id"].startswith(f.pod_sandbox_id):
                continue
            if any(c["labels"].get(k) != v for k, v in f.label_selector.items()):
                continue
            if self._state(c)[0] == "RUNNING":
                out.append(self._stats(c))
        return self.api.ListContainerStatsResponse(stats=out)

    def reopen_container_log(self, req: Any) -> Any:
        c = self._container(req.container_id)
        entry = self._converters.get(c["id"])
        if entry is None or self._state(c)[0] != "RUNNING":
            raise BackendError(
                grpc.StatusCode.FAILED_PRECONDITION, f"container {c['id'][:12]} is not running"
            )
        entry[0].reopen()
        return self.api.ReopenContainerLogResponse()

    # ------------------------------------------------------------ not for VMs
    def exec_sync(self, req: Any) -> Any:
        self._container(req.container_id)
        raise unimplemented(NOT_SUPPORTED.format(what="ExecSync (kubectl exec)"))

    def exec(self, req: Any) -> Any:
        self._container(req.container_id)
        raise unimplemented(NOT_SUPPORTED.format(what="Exec (kubectl exec)"))

    def attach(self, req: Any) -> Any:
        """A URL of the shim's streaming server that bridges the client to the VM's serial console
        (the pty QEMU made for it); ``kubectl attach -it POD`` is an interactive console."""
        c = self._container(req.container_id)
        if not (req.stdin or req.stdout or req.stderr):
            raise BackendError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "AttachRequest: one of stdin, stdout, or stderr must be set",
            )
        state, c = self._state(c)
        if state != "RUNNING":
            raise BackendError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"container {c['id']} is not running ({state.lower()}): start it (StartContainer) first",
            )
        domain = c["domain"]

        def open_console() -> int:
            return open_pty(self.manager.console_pty(domain))

        url = self.streaming.attach_url(
            open_console, domain, stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, tty=req.tty
        )
        return self.api.AttachResponse(url=url)

    @property
    def streaming(self) -> StreamingServer:
        """The streaming server for Attach, started on first use (loopback, ``streaming_address``)."""
        with self._locks_lock:
            if self._streaming is None:
                host, _, port = self.streaming_address.rpartition(":")
                self._streaming = StreamingServer(host or "127.0.0.1", int(port or 0))
            return self._streaming

    def port_forward(self, req: Any) -> Any:
        self._sandbox(req.pod_sandbox_id)
        raise unimplemented(NOT_SUPPORTED.format(what="PortForward (kubectl port-forward)"))

    def update_container_resources(self, req: Any) -> Any:
        self._container(req.container_id)
        raise unimplemented(
            "UpdateContainerResources: a VM's vCPUs and memory change with a restart of the VM "
            "(delete the pod; a VirtualMachine shows RestartRequired)"
        )


def create(name: str, options: dict[str, Any]) -> KvmBackend:
    """The factory named in edgevirt-cri's config (``cri_shim.vm.backend:create``)."""
    known = {
        "state_dir",
        "vm_state_dir",
        "libvirt_uri",
        "cni_conflist",
        "cni_bin_dirs",
        "image_roots",
        "insecure_registries",
        "domain_type",
        "default_memory_mib",
        "streaming_address",
    }
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"backends.{name}.options: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("state_dir", "cni_conflist"):
        if not options.get(key):
            raise ValueError(f"backends.{name}.options.{key} is required")
    return KvmBackend(
        name,
        state_dir=Path(options["state_dir"]),
        vm_state_dir=Path(options.get("vm_state_dir") or "/var/lib/edgevirt/vm"),
        cni_conflist=Path(options["cni_conflist"]),
        cni_bin_dirs=[Path(d) for d in options.get("cni_bin_dirs") or ["/opt/cni/bin", "/usr/lib/cni"]],
        libvirt_uri=options.get("libvirt_uri") or "qemu:///system",
        image_roots=[Path(r) for r in options.get("image_roots") or []],
        insecure_registries=list(options.get("insecure_registries") or []),
        domain_type=options.get("domain_type"),
        default_memory_mib=int(options.get("default_memory_mib") or 256),
        streaming_address=str(options.get("streaming_address") or "127.0.0.1:0"),
    )
