"""The containerd backend: forwards CRI calls to containerd's CRI plugin as serialized bytes.

Requests and responses are not parsed here (the router parses only what it routes on), so a runc or
kata pod sees exactly what containerd answers, streaming URLs included. Upstream errors keep their
gRPC code and message; when containerd cannot be reached the error is UNAVAILABLE and names
containerd and its socket."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator

import grpc

from ..errors import BackendError
from ..methods import path
from .base import Backend

# Like kubelet's CRI client: 16 MiB messages; reconnect quickly after containerd restarts.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
]

# Runtime handler -> the containerd shim binary it needs (io.containerd.<name>.v2).
SHIM_BINARIES = {
    "": "containerd-shim-runc-v2",
    "runc": "containerd-shim-runc-v2",
    "kata": "containerd-shim-kata-v2",
}


def _identity(b: bytes) -> bytes:
    return b


class ContainerdBackend(Backend):
    """Passthrough to containerd's CRI service at `socket` (a path or unix:// address)."""

    serves_images = True

    def __init__(self, name: str, socket: str, timeout: float | None = None) -> None:
        self.name = name
        self.address = socket if "://" in socket else f"unix://{socket}"
        # Deadline for calls whose client sent none (kubelet sends none for PullImage: a long pull
        # must not be cut short). None: the client's deadline, or no deadline, as with containerd.
        self.default_timeout = timeout
        self._channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self._calls: dict[str, grpc.UnaryUnaryMultiCallable[bytes, bytes]] = {}
        self._lock = threading.Lock()

    def _call(self, method: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
        call = self._calls.get(method)
        if call is None:
            with self._lock:
                call = self._calls.setdefault(
                    method, self._channel.unary_unary(path(method), _identity, _identity)
                )
        return call

    def _error(self, method: str, e: grpc.RpcError) -> BackendError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        if code == grpc.StatusCode.UNAVAILABLE:
            return BackendError(
                code,
                f"containerd (backend {self.name}) at {self.address} is unavailable: {details}; "
                "is containerd running and listening on that socket?",
            )
        return BackendError(code, details or "")

    def invoke(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        try:
            return self._call(method)(
                request, timeout=timeout if timeout is not None else self.default_timeout
            )
        except grpc.RpcError as e:
            raise self._error(method, e) from None

    def events(self, request: bytes) -> Iterator[bytes]:
        stream = self._channel.unary_stream(path("GetContainerEvents"), _identity, _identity)(request)
        try:
            yield from stream
        except grpc.RpcError as e:
            raise self._error("GetContainerEvents", e) from None
        finally:
            stream.cancel()

    def handler_works(self, handler: str) -> bool:
        shim = SHIM_BINARIES.get(handler)
        return shim is None or shutil.which(shim) is not None

    def close(self) -> None:
        self._channel.close()
