"""The interface between the router and a runtime backend (containerd passthrough, the kvm VM handler,
test fakes).

The router only ever calls `Backend.invoke(method, request_bytes, timeout)` and gets serialized
response bytes back, so a passthrough backend can forward bytes without parsing them. A backend that
wants typed messages subclasses `TypedBackend` and implements the CRI methods it supports as
snake_case methods taking and returning the generated runtime.v1 messages, e.g.

    class VMBackend(TypedBackend):
        def run_pod_sandbox(self, req: api.RunPodSandboxRequest) -> api.RunPodSandboxResponse: ...

Anything it does not implement answers UNIMPLEMENTED naming the backend and the method. Backends
raise `BackendError(code, message)` for failures. Fan-out calls (ListPodSandbox, ListContainers, ...)
are sent to every backend with the client's filter: each backend must honour the filter itself.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator

import grpc

from .. import protos
from ..errors import BackendError, unimplemented
from ..methods import METHODS


class Backend(ABC):
    """One runtime behind edgevirt-cri. `name` is the backend's name in the config."""

    name: str = "backend"
    #: True when this backend has an image store (ImageService calls may go to it).
    serves_images: bool = False

    @abstractmethod
    def invoke(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        """Run CRI `method` (e.g. "ListContainers") on serialized `request`; return the serialized
        response or raise BackendError."""

    def events(self, request: bytes) -> Iterator[bytes]:
        """GetContainerEvents as a stream of serialized ContainerEventResponse messages."""
        raise unimplemented(f"backend {self.name} does not stream container events (GetContainerEvents)")

    def unavailable_reason(self) -> str | None:
        """None when the backend can serve on this node, else why not (its handlers are then not
        registered). Called once at start."""
        return None

    def handler_works(self, handler: str) -> bool:
        """Whether `handler` really works on this node right now (for Status.runtime_handlers)."""
        return True

    def close(self) -> None:
        """Release connections; called once at shutdown."""
        return None


def snake(method: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", method).lower()


class TypedBackend(Backend):
    """A backend that works on parsed runtime.v1 messages: implement e.g. `run_pod_sandbox(req)`."""

    def invoke(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        impl = getattr(self, snake(method), None)
        if impl is None or method not in METHODS:
            raise unimplemented(f"backend {self.name} does not implement {method}")
        api = protos.api()
        service = api.DESCRIPTOR.services_by_name[METHODS[method][0].rsplit(".", 1)[1]]
        in_type = service.methods_by_name[method].input_type.name
        try:
            req = getattr(api, in_type).FromString(request)
        except Exception as e:  # a malformed message from the client
            raise BackendError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot parse {in_type}: {e}") from e
        response: bytes = impl(req).SerializeToString()
        return response
