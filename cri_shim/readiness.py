"""edgevirt-cri's readiness (``/readyz``): it serves, and the default handler's backend answers.

Serving is checked end to end: a ``Version`` call over edgevirt-cri's own socket (answered by the
shim itself). Then the default backend (containerd for a node's ordinary pods) gets ``Version``;
only "cannot be reached" (UNAVAILABLE) and "no answer in time" (DEADLINE_EXCEEDED) count as not
answering - any other answer, an error code included, means it is there. The probes do not count
as CRI traffic in the metrics.
"""

from __future__ import annotations

import threading

import grpc

from . import protos
from .backends.base import Backend
from .errors import BackendError
from .methods import path

PROBE_TIMEOUT_S = 2.0
NOT_ANSWERING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _identity(b: bytes) -> bytes:
    return b


class CriReadiness:
    """The readiness check: call it for (ready, why not)."""

    def __init__(self, socket_path: str, default_backend: Backend, timeout: float = PROBE_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.default_backend = default_backend
        self.timeout = timeout
        self.serving = False
        self.stopping = False
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()

    def _version_over_socket(self) -> None:
        with self._lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(f"unix://{self.socket_path}")
            channel = self._channel
        request = protos.api().VersionRequest(version="v1").SerializeToString()
        channel.unary_unary(path("Version"), _identity, _identity)(request, timeout=self.timeout)

    def __call__(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        if not self.serving:
            return False, "not serving CRI yet"
        try:
            self._version_over_socket()
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            return False, f"the CRI socket {self.socket_path} does not answer Version ({code})"
        request = protos.api().VersionRequest(version="v1").SerializeToString()
        try:
            self.default_backend.invoke("Version", request, self.timeout)
        except BackendError as e:
            if e.code in NOT_ANSWERING:
                return False, f"the default backend {self.default_backend.name} does not answer: {e.message}"
        return True, ""

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = None
