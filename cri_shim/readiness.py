"""edgevirt-cri's readiness (``/readyz``): it serves, and the default handler's backend answers.

Serving: the gRPC server has started, is not stopping, and its socket accepts a connection (a
plain connect, no RPC, so probes never show up as CRI traffic in the metrics). Then the default
backend (containerd for a node's ordinary pods) gets ``Version``; only "cannot be reached"
(UNAVAILABLE) and "no answer in time" (DEADLINE_EXCEEDED) count as not answering - any other
answer, an error code included, means it is there.
"""

from __future__ import annotations

import socket

import grpc

from . import protos
from .backends.base import Backend
from .errors import BackendError

PROBE_TIMEOUT_S = 2.0
NOT_ANSWERING = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class CriReadiness:
    """The readiness check: call it for (ready, why not)."""

    def __init__(self, socket_path: str, default_backend: Backend, timeout: float = PROBE_TIMEOUT_S) -> None:
        self.socket_path = socket_path
        self.default_backend = default_backend
        self.timeout = timeout
        self.serving = False
        self.stopping = False

    def _socket_accepts(self) -> str | None:
        """None when the socket accepts a connection, else why not."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            try:
                s.connect(self.socket_path)
            except OSError as e:
                return e.strerror or str(e)
        return None

    def __call__(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        if not self.serving:
            return False, "not serving CRI yet"
        refused = self._socket_accepts()
        if refused is not None:
            return False, f"the CRI socket {self.socket_path} does not accept connections ({refused})"
        request = protos.api().VersionRequest(version="v1").SerializeToString()
        try:
            self.default_backend.invoke("Version", request, self.timeout)
        except BackendError as e:
            if e.code in NOT_ANSWERING:
                return False, f"the default backend {self.default_backend.name} does not answer: {e.message}"
        return True, ""

    def close(self) -> None:
        """Nothing to release (kept so callers need not know)."""
