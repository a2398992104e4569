"""The CRI methods of the kvm runtime handler: a CRI pod is a network namespace with a macvtap NIC,
and its one container is a libvirt/QEMU virtual machine.

Each method is thin: find the record, take its lock, delegate, answer.

* RunPodSandbox: the request and the VM pod contract become a sandbox record (:mod:`.translate`);
  :mod:`.sandboxes` makes its namespace and attaches the VM network (:mod:`.sandbox_net`).
* CreateContainer: the request and the sandbox's record become the container's record and the VM
  (:mod:`.translate`); :mod:`.containers` defines the domain (not started) through the libvirt layer.
* Start/Stop/Remove/Status/Stats map to the domain; StopContainer is ACPI shutdown, destroy after
  the timeout. The serial console goes into the container's CRI log and Attach bridges to it
  (:mod:`.console`); ExecSync, Exec and PortForward go through the guest's QEMU guest agent
  (:mod:`.exec`, :mod:`.portforward`).
* GetContainerEvents streams what happens to sandboxes and containers, a VM that ended on its own
  included (libvirt's lifecycle events), as kubelet's evented PLEG expects (:mod:`.events`).

Everything the handler makes is recorded on disk (:mod:`.records`) before it is made, so a
restarted shim reports the same IDs and states and a failure halfway is rolled back (also one left
by a kill -9: records still in their ``setup`` phase are undone at start).

The handler trusts nothing it is told by the pod's author: the annotations are checked field by
field (:mod:`.contract`), disks belong to the pod's namespace as kubelet gave it (:mod:`.pod_disks`),
secret user data comes only from this pod's own volume (:mod:`.userdata`), and every error a client
sees is stripped of the node's paths and of digests (:mod:`.public_errors`; details go to the log).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client.registry import Collector

from .. import protos
from ..backends.base import TypedBackend
from ..errors import BackendError, invalid, unimplemented
from ..keyed_locks import KeyedLocks
from ..vm import image_metrics
from ..vm.errors import ValidationError, VMError
from . import pod_disks, replies, translate, userdata
from .cni_exec import CNIError
from .console import ConsoleAttach, ConsoleLogs
from .containers import AlreadyRan, ContainerLifecycle, Domains, now
from .events import ContainerEvents
from .exec import GuestExec
from .portforward import portforward_url
from .public_errors import Redactor, vm_error
from .records import ContainerRecord, SandboxRecord, container_store, sandbox_store
from .sandbox_net import SandboxNetwork
from .sandboxes import SandboxLifecycle

if TYPE_CHECKING:  # the guest sessions are imported on the first exec
    from ..vm.guest_session import Guests

log = logging.getLogger("edgevirt-cri.kvm")

HANDLER = replies.HANDLER


class KvmHandler(TypedBackend):
    """CRI sandboxes and containers as network namespaces and libvirt domains."""

    def __init__(
        self,
        name: str,
        *,
        state_dir: Path,
        network: SandboxNetwork | None,
        domains: Domains,
        limits: translate.Limits,
        kubelet_root: Path = userdata.DEFAULT_KUBELET_ROOT,
        private_roots: tuple[Path, ...] = (),
        streaming_address: str = "127.0.0.1:0",
        unavailable: str | None = None,
        guests: Guests | None = None,
    ) -> None:
        self.name = name
        self.kubelet_root = kubelet_root
        self.redact = Redactor((state_dir, kubelet_root, *private_roots))
        self.network = network
        self.domains = domains
        self.limits = limits
        self._reason = unavailable
        self._lock = KeyedLocks(reentrant=True)
        self.sandboxes = SandboxLifecycle(sandbox_store(state_dir), network)
        store = container_store(state_dir)
        self.consoles = ConsoleLogs(store.dir)
        self.containers = ContainerLifecycle(store, domains, self.consoles)
        self.attach_urls = ConsoleAttach(streaming_address, domains.console_pty)
        self.guest = GuestExec(guests, lambda: self.attach_urls.server)
        self.api = protos.api()
        self.events_hub = ContainerEvents(self._watch_domains)
        self._stopped_domains: queue.Queue[str | None] = queue.Queue()
        self._stop_watch: Any = None
        if unavailable is None:
            self.sandboxes.recover()
            self.containers.recover()
            pod_disks.adopt_legacy_disks(domains, self.sandboxes.store)

    # ------------------------------------------------------------ backend interface
    def invoke(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        """Every CRI call; what the client reads of a failure holds no node paths and no digests."""
        try:
            return super().invoke(method, request, timeout)
        except BackendError as e:
            public = self.redact(e.message)
            if public != e.message:
                log.warning("%s failed: %s", method, e.message)
            raise BackendError(e.code, public) from None
        except Exception as e:
            log.exception("%s failed", method)
            raise BackendError(grpc.StatusCode.UNKNOWN, self.redact(f"kvm handler, {method}: {e}")) from None

    def unavailable_reason(self) -> str | None:
        return self._reason

    def handler_works(self, handler: str) -> bool:
        try:
            return bool(self.domains.lib_version())
        except Exception:
            return False

    def collectors(self) -> list[Collector]:
        """This backend's Prometheus collectors, for edgevirt-cri's registry: the image store's
        (:mod:`cri_shim.vm.image_metrics`: disks taken out of images, bytes and seconds)."""
        return image_metrics.collectors()

    def close(self) -> None:
        self.events_hub.close()
        if self._stop_watch is not None:
            self._stop_watch.close()
            self._stopped_domains.put(None)
        self.consoles.close()
        self.attach_urls.close()
        self.domains.close()

    # ------------------------------------------------------------ container events
    def events(self, request: bytes) -> Iterator[bytes]:
        """GetContainerEvents: this handler's events from now on (:mod:`.events`)."""
        if self._reason is not None:
            raise unimplemented(f"kvm handler unavailable: {self._reason}")
        return iter(self.events_hub.subscribe())

    def _watch_domains(self) -> None:
        """On the first event stream: watch libvirt for VMs that end on their own."""
        self._stop_watch = self.domains.watch_stops(self._stopped_domains.put)
        threading.Thread(target=self._domains_stopped, name="kvm-domain-stops", daemon=True).start()

    def _domains_stopped(self) -> None:
        while (name := self._stopped_domains.get()) is not None:
            try:
                self._domain_stopped(name)
            except Exception:  # the next stop must still be reported
                log.exception("reporting the stop of domain %s", name)

    def _domain_stopped(self, name: str) -> None:
        for c in self.containers.store.all():
            if c.domain != name or c.phase == "setup" or not c.started_at or c.finished_at:
                continue
            with self._lock(c.id):
                c = self.containers.observe(c)
            if c.finished_at:
                self._publish("CONTAINER_STOPPED_EVENT", c.id, c.sandbox_id)

    def _publish(self, kind: str, id_: str, sandbox_id: str) -> None:
        self.events_hub.publish(lambda: self._event(kind, id_, sandbox_id))

    def _event(self, kind: str, id_: str, sandbox_id: str) -> bytes | None:
        """A ContainerEventResponse: the pod's sandbox status and all its containers' statuses now."""
        sb = self.sandboxes.store.get(sandbox_id)
        if sb is None or sb.phase == "setup":
            return None
        netns = self.network.netns_path(sb) if self.network else Path("/run/netns") / sb.netns
        api = self.api
        statuses = [
            replies.container_status(api, self.containers.observe(c), False).status
            for c in self.containers.of_sandbox(sb.id)
            if c.phase != "setup"
        ]
        event: bytes = api.ContainerEventResponse(
            container_id=id_,
            container_event_type=api.ContainerEventType.Value(kind),
            created_at=time.time_ns(),
            pod_sandbox_status=replies.pod_sandbox_status(api, sb, netns, False).status,
            containers_statuses=statuses,
        ).SerializeToString()
        return event

    def status(self, req: Any) -> Any:
        try:
            self.domains.lib_version()
            libvirt_error = None
        except Exception as e:
            libvirt_error = str(e)
        missing = self.network.missing_plugins() if self.network else ["(no conflist)"]
        return replies.runtime_status(self.api, libvirt_error, missing)

    # ------------------------------------------------------------ lookups
    def _sandbox(self, id_: str) -> SandboxRecord:
        sb = self.sandboxes.store.resolve(id_)
        if sb is None or sb.phase == "setup":
            raise BackendError(grpc.StatusCode.NOT_FOUND, f"pod sandbox {id_!r} not found (kvm handler)")
        return sb

    def _container(self, id_: str) -> ContainerRecord:
        c = self.containers.store.resolve(id_)
        if c is None or c.phase == "setup":
            raise BackendError(grpc.StatusCode.NOT_FOUND, f"container {id_!r} not found (kvm handler)")
        return c

    # ------------------------------------------------------------ sandboxes
    def run_pod_sandbox(self, req: Any) -> Any:
        if req.runtime_handler != HANDLER:
            raise invalid("runtime_handler", f"{req.runtime_handler!r} is not served here", "use kvm")
        try:
            sb = translate.new_sandbox(
                translate.PodRequest.from_cri(req.config), secrets.token_hex(32), now()
            )
        except ValidationError as e:  # ContractError too
            raise vm_error(e) from None
        md = sb.metadata
        with self._lock(sb.id):
            try:
                self.sandboxes.setup(sb)
            except CNIError as e:
                network = self.network.name if self.network else ""
                raise BackendError(
                    grpc.StatusCode.UNKNOWN,
                    f"setting up the VM network {network} for pod {md.namespace}/{md.name} failed: {e}",
                ) from None
            except VMError as e:
                raise vm_error(e) from None
        log.info("pod sandbox %s (%s/%s) ready", sb.id[:12], md.namespace, md.name)
        self._publish("CONTAINER_CREATED_EVENT", sb.id, sb.id)
        self._publish("CONTAINER_STARTED_EVENT", sb.id, sb.id)
        return self.api.RunPodSandboxResponse(pod_sandbox_id=sb.id)

    def stop_pod_sandbox(self, req: Any) -> Any:
        sb = self._sandbox(req.pod_sandbox_id)
        with self._lock(sb.id):
            for c in self.containers.of_sandbox(sb.id):
                self._stop_container(c, timeout=0)
            try:
                self.sandboxes.stop(sb)
            except CNIError as e:
                raise BackendError(
                    grpc.StatusCode.UNKNOWN, f"tearing down the pod network failed: {e}"
                ) from None
            except VMError as e:
                raise vm_error(e) from None
        self._publish("CONTAINER_STOPPED_EVENT", sb.id, sb.id)
        return self.api.StopPodSandboxResponse()

    def remove_pod_sandbox(self, req: Any) -> Any:
        sb = self._sandbox(req.pod_sandbox_id)
        with self._lock(sb.id):
            self.stop_pod_sandbox(self.api.StopPodSandboxRequest(pod_sandbox_id=sb.id))
            for c in self.containers.of_sandbox(sb.id):
                self._remove_container(c)
            try:
                pod_disks.release_pod_disks(self.domains, self.sandboxes.store, sb)
            except VMError as e:
                raise vm_error(e) from None
            # built while the sandbox still exists: kubelet drops the pod from its cache on it
            gone = self._event("CONTAINER_DELETED_EVENT", sb.id, sb.id) if self.events_hub.listening else None
            self.sandboxes.remove(sb)
        if gone is not None:
            self.events_hub.send(gone)
        log.info("pod sandbox %s removed", sb.id[:12])
        return self.api.RemovePodSandboxResponse()

    def pod_sandbox_status(self, req: Any) -> Any:
        sb = self._sandbox(req.pod_sandbox_id)
        netns = self.network.netns_path(sb) if self.network else Path("/run/netns") / sb.netns
        return replies.pod_sandbox_status(self.api, sb, netns, bool(req.verbose))

    def list_pod_sandbox(self, req: Any) -> Any:
        api, f = self.api, req.filter
        want_id = ""
        if f.id:
            hit = self.sandboxes.store.resolve(f.id)
            if hit is None:
                return api.ListPodSandboxResponse()
            want_id = hit.id
        out = []
        for sb in self.sandboxes.store.all():
            if sb.phase == "setup" or (want_id and sb.id != want_id):
                continue
            item = replies.sandbox_message(api, sb, api.PodSandbox)
            if f.HasField("state") and item.state != f.state.state:
                continue
            if replies.labels_match(sb.labels, f.label_selector):
                out.append(item)
        return api.ListPodSandboxResponse(items=out)

    # ------------------------------------------------------------ containers
    def create_container(self, req: Any) -> Any:
        sb = self._sandbox(req.pod_sandbox_id)
        request = translate.ContainerRequest.from_cri(req.config)
        try:
            translate.check_name("config.metadata.name", request.metadata.name)
        except ValidationError as e:
            raise vm_error(e) from None
        with self._lock(sb.id):
            try:
                self._check_room_for_a_vm(sb)
                pod_disks.refuse_unclaimed_legacy_disks(self.domains, sb)
                secret = userdata.secret_user_data(request.mounts, self.kubelet_root, sb.metadata.uid)
                cid = secrets.token_hex(32)
                c, spec = translate.new_container(request, sb, self.limits, cid, now(), secret)
                self.containers.create(c, spec)
            except VMError as e:
                raise vm_error(e) from None
        log.info("container %s (domain %s) created in pod %s", c.id[:12], c.domain, sb.id[:12])
        self._publish("CONTAINER_CREATED_EVENT", c.id, sb.id)
        return self.api.CreateContainerResponse(container_id=c.id)

    def _check_room_for_a_vm(self, sb: SandboxRecord) -> None:
        """A ready sandbox without a container that has not exited (a VM pod has one container)."""
        if sb.state != "READY":
            raise BackendError(grpc.StatusCode.FAILED_PRECONDITION, f"pod sandbox {sb.id[:12]} is not ready")
        live = [c for c in self.containers.of_sandbox(sb.id) if self.containers.observe(c).state != "EXITED"]
        if live:
            raise BackendError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"a VM pod has one container; {live[0].metadata.name!r} "
                f"({live[0].id[:12]}) still exists in pod sandbox {sb.id[:12]}",
            )

    def start_container(self, req: Any) -> Any:
        c = self._container(req.container_id)
        with self._lock(c.id):
            try:
                self.containers.start(c)
            except AlreadyRan:
                raise BackendError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"container {c.id[:12]} has already run; create a new one",
                ) from None
            except VMError as e:
                err = vm_error(e)
                self.containers.start_failed(c, self.redact(err.message))
                self._publish("CONTAINER_STOPPED_EVENT", c.id, c.sandbox_id)
                raise err from None
        self._publish("CONTAINER_STARTED_EVENT", c.id, c.sandbox_id)
        return self.api.StartContainerResponse()

    def _stop_container(self, c: ContainerRecord, timeout: float) -> None:
        with self._lock(c.id):
            try:
                self.containers.stop(c, timeout)
            except VMError as e:
                raise vm_error(e) from None
        self._publish("CONTAINER_STOPPED_EVENT", c.id, c.sandbox_id)

    def stop_container(self, req: Any) -> Any:
        self._stop_container(self._container(req.container_id), float(req.timeout))
        return self.api.StopContainerResponse()

    def _remove_container(self, c: ContainerRecord) -> None:
        with self._lock(c.id):
            try:
                self.containers.remove(c)
            except VMError as e:
                raise vm_error(e) from None
        self._publish("CONTAINER_DELETED_EVENT", c.id, c.sandbox_id)

    def remove_container(self, req: Any) -> Any:
        self._remove_container(self._container(req.container_id))
        return self.api.RemoveContainerResponse()

    def container_status(self, req: Any) -> Any:
        c = self.containers.observe(self._container(req.container_id))
        return replies.container_status(self.api, c, bool(req.verbose))

    def list_containers(self, req: Any) -> Any:
        api, f = self.api, req.filter
        want_id = want_sb = ""
        if f.id:
            hit = self.containers.store.resolve(f.id)
            if hit is None:
                return api.ListContainersResponse()
            want_id = hit.id
        if f.pod_sandbox_id:
            sb = self.sandboxes.store.resolve(f.pod_sandbox_id)
            if sb is None:
                return api.ListContainersResponse()
            want_sb = sb.id
        out = []
        for c in self.containers.store.all():
            if c.phase == "setup" or (want_id and c.id != want_id) or (want_sb and c.sandbox_id != want_sb):
                continue
            if not replies.labels_match(c.labels, f.label_selector):
                continue
            item = replies.container_message(api, self.containers.observe(c))
            if not f.HasField("state") or item.state == f.state.state:
                out.append(item)
        return api.ListContainersResponse(containers=out)

    def container_stats(self, req: Any) -> Any:
        c = self._container(req.container_id)
        return self.api.ContainerStatsResponse(
            stats=replies.container_stats(self.api, c, self.containers.stats(c))
        )

    def list_container_stats(self, req: Any) -> Any:
        f = req.filter
        out = []
        for c in self.containers.store.all():
            if c.phase == "setup" or (f.id and not c.id.startswith(f.id)):
                continue
            if f.pod_sandbox_id and not c.sandbox_id.startswith(f.pod_sandbox_id):
                continue
            if not replies.labels_match(c.labels, f.label_selector):
                continue
            if self.containers.observe(c).state == "RUNNING":
                out.append(replies.container_stats(self.api, c, self.containers.stats(c)))
        return self.api.ListContainerStatsResponse(stats=out)

    def reopen_container_log(self, req: Any) -> Any:
        c = self._container(req.container_id)
        if self.containers.observe(c).state != "RUNNING" or not self.consoles.reopen(c.id):
            raise BackendError(grpc.StatusCode.FAILED_PRECONDITION, f"container {c.id[:12]} is not running")
        return self.api.ReopenContainerLogResponse()

    def attach(self, req: Any) -> Any:
        """A URL of the shim's streaming server that bridges the client to the VM's serial console
        (the pty QEMU made for it); ``kubectl attach -it POD`` is an interactive console."""
        c = self._container(req.container_id)
        if not (req.stdin or req.stdout or req.stderr):
            raise BackendError(
                grpc.StatusCode.INVALID_ARGUMENT, "AttachRequest: one of stdin, stdout, or stderr must be set"
            )
        c = self.containers.observe(c)
        if c.state != "RUNNING":
            raise BackendError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"container {c.id} is not running ({c.state.lower()}): start it (StartContainer) first",
            )
        url = self.attach_urls.url(
            c.domain, stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, tty=req.tty
        )
        return self.api.AttachResponse(url=url)

    # ------------------------------------------------------------ in the guest, through its agent
    def _running(self, id_: str) -> ContainerRecord:
        c = self.containers.observe(self._container(id_))
        if c.state != "RUNNING":
            raise BackendError(
                grpc.StatusCode.FAILED_PRECONDITION, f"container {c.id} is not running ({c.state.lower()})"
            )
        return c

    def exec_sync(self, req: Any) -> Any:
        return self.guest.exec_sync_reply(self.api, self._running(req.container_id).domain, req)

    def exec(self, req: Any) -> Any:
        return self.guest.exec_reply(self.api, self._running(req.container_id).domain, req)

    def port_forward(self, req: Any) -> Any:
        sb = self._sandbox(req.pod_sandbox_id)

        def domain_of() -> str:  # at each connection: a VM that restarted is a new domain
            for c in self.containers.of_sandbox(sb.id):
                if self.containers.observe(c).state == "RUNNING":
                    return c.domain
            raise BackendError(grpc.StatusCode.FAILED_PRECONDITION, f"pod sandbox {sb.id[:12]} runs no VM")

        url = portforward_url(self.guest, domain_of, f"{sb.metadata.namespace}/{sb.metadata.name}")
        return self.api.PortForwardResponse(url=url)

    def update_container_resources(self, req: Any) -> Any:
        self._container(req.container_id)
        raise unimplemented(
            "UpdateContainerResources: a VM's vCPUs and memory change with a restart of the VM "
            "(delete the pod; a VirtualMachine shows RestartRequired)"
        )
