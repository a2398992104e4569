"""systemd's readiness protocol (sd_notify(3)) for the macvtap daemon, standard library only.

``$NOTIFY_SOCKET`` is a unix datagram socket: a path, or an abstract name written with a leading
``@``. The daemon sends ``READY=1`` once every worker serves and ``STOPPING=1`` on SIGTERM.
:meth:`Notifier.from_environment` reads the address once and removes it from the environment (the
workers and the IPAM plugins they run never see it). Without it every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger("macvtap-daemon")

READY = "READY=1"
STOPPING = "STOPPING=1"


def socket_address(value: str) -> str | None:
    """A path as is, ``@name`` -> ``\\0name`` (abstract); None for anything else."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends state strings to the service manager, if it gave us a socket."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(socket_address(env.pop("NOTIFY_SOCKET", "")))

    def notify(self, state: str) -> bool:
        """Send ``state``; True when sent. A failure is logged, never raised."""
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
