"""PortForward of VM pods: each forwarded connection is ``nc 127.0.0.1 <port>`` in the guest, its
stdin and stdout on two hot-plugged virtio-serial channels, its stderr captured by the guest agent.

containerd dials the pod IP's port from the pod's network namespace; a VM pod's NIC is a macvtap
in bridge mode, whose frames the host's own stack never sees, so the way into the guest is the
virtio-serial path of exec (:mod:`.exec`). The guest needs the agent and an ``nc`` (busybox,
netcat-openbsd, ncat: any ``nc HOST PORT`` that copies stdin to the connection and the connection
to stdout); the port is reached on the guest's loopback, as containerd reaches the pod's ``localhost``
(a server listening on the VM's address only, not on 127.0.0.1 or 0.0.0.0, is not reached). Why a
connection failed (``nc``'s own words, e.g. ``Connection refused``) goes to the client's error
stream, as containerd writes its dial error there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..vm.errors import VMError
from .exec import GuestExec

if TYPE_CHECKING:  # imported on the first port-forward
    from ..portforward_session import Forward
    from ..vm.guest_session import GuestProcess, SessionSpec

#: the guest command of one forwarded connection
NC = ("nc", "127.0.0.1")


def forward_spec(port: int) -> SessionSpec:
    from ..vm.guest_session import SessionSpec

    return SessionSpec([*NC, str(port)], stdin=True, stderr="captured")


class GuestForward:
    """One forwarded connection: a :class:`GuestProcess` running ``nc`` (:class:`Forward`)."""

    def __init__(self, proc: GuestProcess) -> None:
        self.proc = proc

    def read(self) -> bytes:
        return self.proc.stdout.read() if self.proc.stdout is not None else b""

    def write(self, data: bytes) -> None:
        self.proc.write(data)

    def close_write(self) -> None:
        self.proc.close_stdin()

    def wait(self, stop: threading.Event) -> str | None:
        try:
            st = self.proc.wait(stop)
        except VMError as e:
            return f"the guest agent lost track of nc: {e}"
        if st is None:
            return None
        if st.shell_exit_code == 0:
            return ""
        said = st.stderr.decode(errors="replace").strip()
        return said or f"nc in the guest exited with {st.shell_exit_code}"

    def close(self) -> None:
        self.proc.close()


def portforward_url(guest: GuestExec, domain_of: Callable[[], str], what: str) -> str:
    """A one-time URL forwarding to the guest of the VM ``domain_of()`` names when a connection
    comes (a VM restarted meanwhile is a new domain)."""
    guest.agent(domain_of())

    def dial(port: int) -> Forward:
        domain = domain_of()
        guest.agent(domain)
        return GuestForward(guest.start(domain, forward_spec(port)))

    return guest.server().portforward_url(dial, what)
