"""An in-process fake CRI backend for routing tests only: keeps sandboxes and containers in dicts,
honours List filters like containerd does, and can be switched "down" (UNAVAILABLE)."""

from __future__ import annotations

import itertools

import grpc

from cri_shim import protos
from cri_shim.backends.base import TypedBackend
from cri_shim.errors import BackendError

api = protos.api()
_ids = itertools.count(1)


class FakeBackend(TypedBackend):
    def __init__(self, name: str, images: bool = False) -> None:
        self.name = name
        self.serves_images = images
        self.down = False
        self.sandboxes: dict[str, api.PodSandbox] = {}
        self.containers: dict[str, api.Container] = {}
        self.calls: list[str] = []

    def invoke(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        self.calls.append(method)
        if self.down:
            raise BackendError(grpc.StatusCode.UNAVAILABLE, f"fake backend {self.name} is down")
        return super().invoke(method, request, timeout)

    def _new_id(self) -> str:
        return f"{next(_ids):064x}"

    # --- sandboxes ---
    def run_pod_sandbox(self, req):
        sid = self._new_id()
        self.sandboxes[sid] = api.PodSandbox(
            id=sid,
            metadata=req.config.metadata,
            state=api.SANDBOX_READY,
            labels=req.config.labels,
            runtime_handler=req.runtime_handler,
        )
        return api.RunPodSandboxResponse(pod_sandbox_id=sid)

    def _sandbox(self, sid: str) -> api.PodSandbox:
        if sid not in self.sandboxes:
            raise BackendError(grpc.StatusCode.NOT_FOUND, f"sandbox {sid} not found in {self.name}")
        return self.sandboxes[sid]

    def stop_pod_sandbox(self, req):
        self._sandbox(req.pod_sandbox_id).state = api.SANDBOX_NOTREADY
        return api.StopPodSandboxResponse()

    def remove_pod_sandbox(self, req):
        self.sandboxes.pop(req.pod_sandbox_id, None)
        return api.RemovePodSandboxResponse()

    def pod_sandbox_status(self, req):
        sb = self._sandbox(req.pod_sandbox_id)
        return api.PodSandboxStatusResponse(
            status=api.PodSandboxStatus(id=sb.id, metadata=sb.metadata, state=sb.state, labels=sb.labels)
        )

    def list_pod_sandbox(self, req):
        f = req.filter
        items = [
            sb
            for sb in self.sandboxes.values()
            if (not f.id or sb.id == f.id)
            and (not f.HasField("state") or sb.state == f.state.state)
            and all(sb.labels.get(k) == v for k, v in f.label_selector.items())
        ]
        return api.ListPodSandboxResponse(items=items)

    # --- containers ---
    def create_container(self, req):
        self._sandbox(req.pod_sandbox_id)
        cid = self._new_id()
        self.containers[cid] = api.Container(
            id=cid,
            pod_sandbox_id=req.pod_sandbox_id,
            metadata=req.config.metadata,
            state=api.CONTAINER_CREATED,
            labels=req.config.labels,
        )
        return api.CreateContainerResponse(container_id=cid)

    def _container(self, cid: str) -> api.Container:
        if cid not in self.containers:
            raise BackendError(grpc.StatusCode.NOT_FOUND, f"container {cid} not found in {self.name}")
        return self.containers[cid]

    def start_container(self, req):
        self._container(req.container_id).state = api.CONTAINER_RUNNING
        return api.StartContainerResponse()

    def remove_container(self, req):
        self.containers.pop(req.container_id, None)
        return api.RemoveContainerResponse()

    def container_status(self, req):
        c = self._container(req.container_id)
        return api.ContainerStatusResponse(
            status=api.ContainerStatus(id=c.id, metadata=c.metadata, state=c.state)
        )

    def list_containers(self, req):
        f = req.filter
        items = [
            c
            for c in self.containers.values()
            if (not f.id or c.id == f.id)
            and (not f.pod_sandbox_id or c.pod_sandbox_id == f.pod_sandbox_id)
            and (not f.HasField("state") or c.state == f.state.state)
            and all(c.labels.get(k) == v for k, v in f.label_selector.items())
        ]
        return api.ListContainersResponse(containers=items)

    # --- runtime ---
    def status(self, req):
        return api.StatusResponse(
            status=api.RuntimeStatus(
                conditions=[
                    api.RuntimeCondition(type="RuntimeReady", status=True),
                    api.RuntimeCondition(type="NetworkReady", status=True),
                ]
            )
        )

    def list_images(self, req):
        return api.ListImagesResponse(
            images=[api.Image(id=f"sha256:{self.name}", repo_tags=[f"{self.name}:1"])]
        )


def create(name: str, options: dict) -> FakeBackend:
    """A `type: plugin` factory (config `factory: cri_fake:create`); options.unavailable makes the
    backend report itself unavailable on this node."""
    backend = FakeBackend(name)
    reason = options.get("unavailable")
    backend.unavailable_reason = lambda: reason
    return backend
