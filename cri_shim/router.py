"""Routes every CRI call to the backend that owns it.

- RunPodSandbox: the backend registered for request.runtime_handler; an unknown handler is rejected
  with the list of known ones.
- Calls naming a sandbox or container ID: the backend recorded for that ID in the IdIndex (on disk,
  so it survives a restart). An ID the index does not know is looked up by asking each backend for
  its status; if none knows it, the call goes to the default backend, whose own answer (NotFound,
  or success for an idempotent remove) is what the client gets.
- List* calls: sent to every backend with the client's filter, responses merged by concatenating
  the serialized messages (each List response has only repeated fields, so that is protobuf's
  merge). A backend that fails does not hide the others: its items from its last successful answer
  to the same request are used, so kubelet never sees that backend's pods vanish and come back.
  When every backend fails, the default backend's error is returned.

Requests are parsed only for the fields routed on; responses are forwarded as bytes except the IDs
that RunPodSandbox and CreateContainer return, which are recorded.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from . import protos
from .backends.base import Backend
from .errors import BackendError, invalid
from .methods import METHODS, Route
from .state import IdIndex

T = TypeVar("T")

log = logging.getLogger("edgevirt-cri.router")

# CRI api.proto: these "must not return an error if the [sandbox|container] has already been removed"
# (StopPodSandbox: "if all relevant resources have already been reclaimed"). containerd 1.6 answers
# NotFound for StopPodSandbox of an unknown sandbox; the shim answers success, as the contract says.
# StopContainer: "must not return an error if the container has already been stopped"; critest checks
# that for a container that does not exist as well (cri-o and containerd 2 answer success).
IDEMPOTENT = frozenset({"StopPodSandbox", "RemovePodSandbox", "StopContainer", "RemoveContainer"})

# How many (method, backend, request) answers of fan-out calls are kept for a backend that goes down.
LAST_ANSWERS = 256


class Router:
    """The routing core of edgevirt-cri, independent of the gRPC server."""

    def __init__(
        self,
        backends: dict[str, Backend],
        handlers: dict[str, str],
        index: IdIndex,
        unavailable: dict[str, str] | None = None,
    ) -> None:
        if "" not in handlers:
            raise ValueError('the default runtime handler "" has no backend')
        self.backends = backends
        self.handlers = handlers
        self.index = index
        #: handler -> why it is configured but not registered (its backend is not available here)
        self.unavailable = dict(unavailable or {})
        self.default = backends[handlers[""]]
        self._order = [self.default] + [b for b in backends.values() if b is not self.default]
        self._image_backends = [b for b in self._order if b.serves_images] or [self.default]
        self._last: OrderedDict[tuple[str, str, bytes], bytes] = OrderedDict()
        self._last_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * len(backends)), thread_name_prefix="fanout")
        self.api = protos.api()

    # --- entry point ---
    def call(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        """Route one unary CRI call; returns the serialized response or raises BackendError."""
        route = METHODS[method][1]
        if route is Route.SANDBOX:
            req_id = self._field(method, request, "pod_sandbox_id")
            return self._by_sandbox(method, request, req_id, timeout)
        if route is Route.CONTAINER:
            req_id = self._field(method, request, "container_id")
            return self._by_container(method, request, req_id, timeout)
        if route is Route.FANOUT:
            return self._fanout(method, request, timeout)
        if route is Route.HANDLER:
            return self._run_pod_sandbox(request, timeout)
        if route is Route.IMAGE:
            return self._image(method, request, timeout)
        if route is Route.BROADCAST:
            return self._broadcast(method, request, timeout)
        if route is Route.DEFAULT:
            return self.default.invoke(method, request, timeout)
        raise BackendError(grpc.StatusCode.INTERNAL, f"{method} is answered by the server, not routed")

    def events(self, request: bytes) -> Iterator[bytes]:
        """GetContainerEvents from the default backend (the only one kubelet's evented PLEG needs
        today); other backends' events are merged in when they stream them."""
        if len(self.backends) == 1:
            return self.default.events(request)
        return self._merged_events(request)

    # --- helpers ---
    def _parse(self, method: str, request: bytes) -> Any:
        try:
            return getattr(self.api, f"{method}Request").FromString(request)
        except Exception as e:
            raise BackendError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"cannot parse {method}Request: {e}; send a runtime.v1 message",
            ) from e

    def _field(self, method: str, request: bytes, name: str) -> str:
        value: str = getattr(self._parse(method, request), name)
        if not value:
            raise invalid(
                f"{method}Request.{name}", "is empty", f"set {name} to the ID returned by the runtime"
            )
        return value

    # --- RunPodSandbox ---
    def known_handlers(self) -> list[str]:
        return sorted(self.handlers)

    def _run_pod_sandbox(self, request: bytes, timeout: float | None) -> bytes:
        req = self._parse("RunPodSandbox", request)
        handler = req.runtime_handler
        name = self.handlers.get(handler)
        if name is None:
            known = ", ".join(f'"{h}"' for h in self.known_handlers())
            why = f" ({self.unavailable[handler]})" if handler in self.unavailable else ""
            raise invalid(
                "RunPodSandboxRequest.runtime_handler",
                f'unknown runtime handler "{handler}"{why}',
                f"use one of the handlers edgevirt-cri serves on this node: {known} (RuntimeClass.handler)",
            )
        backend = self.backends[name]
        raw = backend.invoke("RunPodSandbox", request, timeout)
        sandbox_id = self.api.RunPodSandboxResponse.FromString(raw).pod_sandbox_id
        self._record_sandbox(sandbox_id, backend)
        return raw

    def _record_sandbox(self, sandbox_id: str, backend: Backend) -> None:
        try:
            self.index.add_sandbox(sandbox_id, backend.name)
        except (OSError, ValueError) as e:
            # The sandbox exists; routing still finds it by asking the backends. Say so loudly.
            log.error("could not record sandbox %s -> %s: %s", sandbox_id, backend.name, e)

    # --- by ID ---
    def _owner(self, kind: str, id_: str, timeout: float | None) -> Backend:
        name = self.index.sandbox_backend(id_) if kind == "sandbox" else self.index.container_backend(id_)
        if name is not None and name in self.backends:
            return self.backends[name]
        return self._discover(kind, id_, timeout)

    def _discover(self, kind: str, id_: str, timeout: float | None) -> Backend:
        """Ask every backend whether it knows `id_` (an ID made before the index existed, or a
        unique prefix the backend resolves); record the full ID of the one that does."""
        method = "PodSandboxStatus" if kind == "sandbox" else "ContainerStatus"
        field = "pod_sandbox_id" if kind == "sandbox" else "container_id"
        probe = getattr(self.api, f"{method}Request")(**{field: id_}).SerializeToString()
        for backend in self._order:
            try:
                raw = backend.invoke(method, probe, timeout)
            except BackendError:
                continue
            status = getattr(self.api, f"{method}Response").FromString(raw).status
            full = status.id or id_
            known = (
                self.index.sandbox_backend(full) if kind == "sandbox" else self.index.container_backend(full)
            )
            if known == backend.name:
                return backend  # `id_` was a prefix of an ID already recorded
            try:
                if kind == "sandbox":
                    self.index.add_sandbox(full, backend.name)
                else:
                    self.index.add_container(full, backend.name, getattr(status, "pod_sandbox_id", ""))
            except (OSError, ValueError) as e:
                log.error("could not record %s %s -> %s: %s", kind, full, backend.name, e)
            return backend
        return self.default

    def _by_sandbox(self, method: str, request: bytes, sandbox_id: str, timeout: float | None) -> bytes:
        backend = self._owner("sandbox", sandbox_id, timeout)
        try:
            raw = backend.invoke(method, request, timeout)
        except BackendError as e:
            if method in IDEMPOTENT and e.code == grpc.StatusCode.NOT_FOUND:
                # CRI: "idempotent, must not return an error if [it] has already been removed".
                self.index.remove_sandbox(sandbox_id)
                return b""
            raise
        if method == "CreateContainer":
            cid = self.api.CreateContainerResponse.FromString(raw).container_id
            try:
                self.index.add_container(cid, backend.name, sandbox_id)
            except (OSError, ValueError) as e:
                log.error("could not record container %s -> %s: %s", cid, backend.name, e)
        elif method == "RemovePodSandbox":
            self.index.remove_sandbox(sandbox_id)
        return raw

    def _by_container(self, method: str, request: bytes, container_id: str, timeout: float | None) -> bytes:
        backend = self._owner("container", container_id, timeout)
        try:
            raw = backend.invoke(method, request, timeout)
        except BackendError as e:
            if method in IDEMPOTENT and e.code == grpc.StatusCode.NOT_FOUND:
                self.index.remove_container(container_id)
                return b""
            raise
        if method == "RemoveContainer":
            self.index.remove_container(container_id)
        return raw

    # --- fan-out ---
    def _remember(self, method: str, backend: Backend, request: bytes, raw: bytes) -> None:
        if len(self.backends) > 1:
            with self._last_lock:
                key = (method, backend.name, request)
                self._last[key] = raw
                self._last.move_to_end(key)
                while len(self._last) > LAST_ANSWERS:
                    self._last.popitem(last=False)

    def _fanout(self, method: str, request: bytes, timeout: float | None) -> bytes:
        targets = self._image_backends if METHODS[method][0].endswith("ImageService") else self._order
        if len(targets) == 1:  # the common case: no threads, no copies
            return targets[0].invoke(method, request, timeout)
        futures = [(b, self._pool.submit(b.invoke, method, request, timeout)) for b in targets]
        parts: list[bytes] = []
        errors: list[tuple[Backend, BackendError]] = []
        for backend, fut in futures:
            try:
                raw = fut.result()
            except BackendError as e:
                errors.append((backend, e))
                continue
            self._remember(method, backend, request, raw)
            parts.append(raw)
        if not parts:
            # Nobody answered: the default backend's error (it names what is down).
            raise next((e for b, e in errors if b is self.default), errors[0][1])
        for backend, err in errors:
            if err.code == grpc.StatusCode.UNIMPLEMENTED:
                continue  # that backend has nothing of this kind
            with self._last_lock:
                last = self._last.get((method, backend.name, request))
            log.warning(
                "%s: backend %s failed (%s: %s); %s",
                method,
                backend.name,
                err.code.name,
                err.message,
                "using its last answer" if last is not None else "it has no earlier answer to reuse",
            )
            if last is not None:
                parts.append(last)
        return b"".join(parts)

    def _broadcast(self, method: str, request: bytes, timeout: float | None) -> bytes:
        results: list[bytes] = []
        first_error: BackendError | None = None
        for backend in self._order:
            try:
                results.append(backend.invoke(method, request, timeout))
            except BackendError as e:
                if e.code != grpc.StatusCode.UNIMPLEMENTED and backend is self.default:
                    first_error = e
        if first_error is not None:
            raise first_error
        return results[0] if results else b""

    # --- images ---
    def _image(self, method: str, request: bytes, timeout: float | None) -> bytes:
        backend = self._image_backends[0]
        if len(self._image_backends) > 1:
            handler = self._parse(method, request).image.runtime_handler
            name = self.handlers.get(handler)
            if name is not None and self.backends[name] in self._image_backends:
                backend = self.backends[name]
        return backend.invoke(method, request, timeout)

    # --- events ---
    def _merged_events(self, request: bytes) -> Iterator[bytes]:
        import queue

        q: queue.Queue[object] = queue.Queue(maxsize=1024)
        stop = threading.Event()
        done = object()

        def pump(backend: Backend) -> None:
            try:
                for ev in backend.events(request):
                    if stop.is_set():
                        return
                    q.put(ev)
            except BackendError as e:
                if e.code != grpc.StatusCode.UNIMPLEMENTED:
                    q.put(e)
            finally:
                q.put(done)

        threads = [threading.Thread(target=pump, args=(b,), daemon=True) for b in self._order]
        for t in threads:
            t.start()
        finished = 0
        try:
            while finished < len(threads):
                item = q.get()
                if item is done:
                    finished += 1
                elif isinstance(item, BackendError):
                    raise item
                elif isinstance(item, bytes):
                    yield item
        finally:
            stop.set()

    def prune(self) -> int:
        """Forget recorded IDs their backend no longer has (removed while the shim was down, e.g.
        by `crictl rmp` straight to containerd). Only records that existed before the backend was
        listed are candidates, so a pod created meanwhile is never forgotten; a backend that does
        not answer is left alone. Returns how many records were dropped."""
        dropped = 0
        for backend in self._order:
            old_pods = {s for s, b in list(self.index.sandboxes.items()) if b == backend.name}
            old_ctrs = {c for c, (b, _) in list(self.index.containers.items()) if b == backend.name}
            try:
                pods = self.api.ListPodSandboxResponse.FromString(backend.invoke("ListPodSandbox", b"", 30))
                ctrs = self.api.ListContainersResponse.FromString(backend.invoke("ListContainers", b"", 30))
            except BackendError as e:
                log.warning("not pruning records of backend %s: %s", backend.name, e.message)
                continue
            for sid in old_pods - {p.id for p in pods.items}:
                self.index.remove_sandbox(sid)
            for cid in old_ctrs - {c.id for c in ctrs.containers}:
                self.index.remove_container(cid)
            dropped += sum(1 for s in old_pods if self.index.sandbox_backend(s) is None)
            dropped += sum(1 for c in old_ctrs if self.index.container_backend(c) is None)
        return dropped

    def ordered(self) -> list[Backend]:
        """The backends, the default handler's first."""
        return list(self._order)

    def each_backend(self, fn: Callable[[Backend], T]) -> list[T]:
        """``fn(backend)`` for every backend, concurrently on the router's fan-out threads, the results in
        :meth:`ordered` order. Those threads live as long as the router: a pool made per call would
        start and end threads every few seconds (kubelet asks Status every 5 s), and each thread that
        ends leaves memory behind in the allocator (issue 12's long-run check saw edgevirt-cri grow
        idle that way)."""
        return list(self._pool.map(fn, self._order))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for b in self.backends.values():
            b.close()
