"""systemd's readiness protocol (sd_notify(3)) in a few lines of the standard library.

A service of ``Type=notify`` gets ``$NOTIFY_SOCKET``: a unix datagram socket, a path or an abstract
name written with a leading ``@``. The service sends ``READY=1`` once it serves and ``STOPPING=1``
when it begins to shut down. :meth:`Notifier.from_environment` reads the address once and removes
it from the environment, so the processes the service starts (CNI plugins, qemu-img, ...) cannot
send notifications in its name. Without ``$NOTIFY_SOCKET`` every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger("edgevirt.sd_notify")

READY = "READY=1"
STOPPING = "STOPPING=1"


def socket_address(value: str) -> str | None:
    """The address to send to for a ``$NOTIFY_SOCKET`` value: a path, or an abstract name
    (``@name`` -> ``\\0name``); None for an empty value or a kind we do not speak (``vsock:``)."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends state strings to the service manager's notification socket, if there is one."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier of ``$NOTIFY_SOCKET``, which is then removed from ``environ``."""
        env = os.environ if environ is None else environ
        raw = env.pop("NOTIFY_SOCKET", "")
        address = socket_address(raw)
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract name; not notifying", raw)
        return cls(address)

    def notify(self, state: str) -> bool:
        """Send ``state`` (e.g. ``READY=1``); True when it was sent. A failure is logged, never raised:
        the service runs on without its manager knowing."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall(state.encode())
        except OSError as e:
            log.warning("cannot notify the service manager (%s): %s", state, e)
            return False
        return True
