"""How each CRI runtime.v1 method is routed: by runtime handler, by sandbox or container ID, fanned
out to every backend and merged, sent to all, or answered by the shim itself."""

from __future__ import annotations

from enum import Enum

RUNTIME = "runtime.v1.RuntimeService"
IMAGE = "runtime.v1.ImageService"


class Route(Enum):
    LOCAL = "local"  # answered by edgevirt-cri itself (Version, Status)
    HANDLER = "handler"  # RunPodSandbox: the backend of request.runtime_handler
    SANDBOX = "sandbox"  # the backend that owns request.pod_sandbox_id
    CONTAINER = "container"  # the backend that owns request.container_id
    FANOUT = "fanout"  # every backend; the responses (repeated fields only) are concatenated
    BROADCAST = "broadcast"  # every backend; the first answer is returned
    DEFAULT = "default"  # the backend of the default handler ""
    IMAGE = "image"  # request.image.runtime_handler's backend, else the default image backend
    EVENTS = "events"  # server stream: every backend's stream, merged


# method name -> (service, route). Every RPC of cri-api v0.34.4's runtime.v1 is listed; a method a
# backend lacks answers UNIMPLEMENTED from that backend.
METHODS: dict[str, tuple[str, Route]] = {
    "Version": (RUNTIME, Route.LOCAL),
    "Status": (RUNTIME, Route.LOCAL),
    "RunPodSandbox": (RUNTIME, Route.HANDLER),
    "StopPodSandbox": (RUNTIME, Route.SANDBOX),
    "RemovePodSandbox": (RUNTIME, Route.SANDBOX),
    "PodSandboxStatus": (RUNTIME, Route.SANDBOX),
    "CreateContainer": (RUNTIME, Route.SANDBOX),
    "PortForward": (RUNTIME, Route.SANDBOX),
    "PodSandboxStats": (RUNTIME, Route.SANDBOX),
    "UpdatePodSandboxResources": (RUNTIME, Route.SANDBOX),
    "StartContainer": (RUNTIME, Route.CONTAINER),
    "StopContainer": (RUNTIME, Route.CONTAINER),
    "RemoveContainer": (RUNTIME, Route.CONTAINER),
    "ContainerStatus": (RUNTIME, Route.CONTAINER),
    "UpdateContainerResources": (RUNTIME, Route.CONTAINER),
    "ReopenContainerLog": (RUNTIME, Route.CONTAINER),
    "ExecSync": (RUNTIME, Route.CONTAINER),
    "Exec": (RUNTIME, Route.CONTAINER),
    "Attach": (RUNTIME, Route.CONTAINER),
    "ContainerStats": (RUNTIME, Route.CONTAINER),
    "CheckpointContainer": (RUNTIME, Route.CONTAINER),
    "ListPodSandbox": (RUNTIME, Route.FANOUT),
    "ListContainers": (RUNTIME, Route.FANOUT),
    "ListContainerStats": (RUNTIME, Route.FANOUT),
    "ListPodSandboxStats": (RUNTIME, Route.FANOUT),
    "ListMetricDescriptors": (RUNTIME, Route.FANOUT),
    "ListPodSandboxMetrics": (RUNTIME, Route.FANOUT),
    "UpdateRuntimeConfig": (RUNTIME, Route.BROADCAST),
    "RuntimeConfig": (RUNTIME, Route.DEFAULT),
    "GetContainerEvents": (RUNTIME, Route.EVENTS),
    "ListImages": (IMAGE, Route.FANOUT),
    "ImageFsInfo": (IMAGE, Route.FANOUT),
    "PullImage": (IMAGE, Route.IMAGE),
    "ImageStatus": (IMAGE, Route.IMAGE),
    "RemoveImage": (IMAGE, Route.IMAGE),
}


def path(method: str) -> str:
    """The gRPC path of a method, e.g. /runtime.v1.RuntimeService/Version."""
    return f"/{METHODS[method][0]}/{method}"
