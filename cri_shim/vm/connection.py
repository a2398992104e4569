"""The one seam between edgevirt and a libvirt daemon's connection (like KubeVirt's ``Connection``).

:class:`Connection` opens ``virConnect`` lazily, notices a dead one (a restarted libvirtd leaves it
behind) and opens a new one, and offers the few connection-level calls the libvirt layer makes:
lookup by name or UUID, define, list, the library version, and one command to a domain's QEMU guest
agent (``libvirt_qemu.qemuAgentCommand``). Every libvirt error becomes a :class:`.errors.VMError`
(:class:`.errors.DomainNotFound` for a missing domain, :class:`.errors.AgentUnavailable` when the
guest agent cannot be reached, :class:`.errors.AgentError` when it answered with an error) naming
the domain.
Nothing outside the libvirt layer talks to libvirt: the kvm handler and node mode go through
:class:`.lifecycle.DomainManager`. The one other connection is the watch of domain lifecycle events
(:mod:`.domain_events`), which needs libvirt's event loop and a connection of its own.
"""

from __future__ import annotations

import contextlib
import threading

import libvirt
import libvirt_qemu

from .errors import AgentError, AgentUnavailable, DomainNotFound, VMError

#: libvirt's answers that mean "no agent to talk to": not connected or not answering in time
#: (AGENT_UNRESPONSIVE), out of step (AGENT_UNSYNCED), no agent channel in the domain
#: (ARGUMENT_UNSUPPORTED: "QEMU guest agent is not configured"), the domain is not running or is
#: paused (OPERATION_INVALID), a timeout (OPERATION_TIMEOUT)
AGENT_UNAVAILABLE = frozenset(
    {
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
        libvirt.VIR_ERR_AGENT_UNSYNCED,
        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
        libvirt.VIR_ERR_OPERATION_INVALID,
        libvirt.VIR_ERR_OPERATION_TIMEOUT,
    }
)


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    return None


def error_code(e: libvirt.libvirtError) -> int:
    """The ``virErrorNumber`` of a libvirt error (0 when it carries none)."""
    return int(e.get_error_code() or 0)


class Connection:
    """A self-healing connection to the libvirt daemon at ``uri``."""

    def __init__(self, uri: str = "qemu:///system") -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.Lock()
        # libvirt's default handler prints every error (also expected ones, like a lookup of a
        # domain that does not exist) to stderr; errors reach us as exceptions anyway.
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)

    def get(self) -> libvirt.virConnect:
        """The open connection: opened on first use, reopened when the old one died."""
        with self._lock:
            if self._conn is not None:
                try:  # a restarted libvirtd leaves a dead connection behind: notice it here
                    if not self._conn.isAlive():
                        raise libvirt.libvirtError("connection is not alive")
                    self._conn.getLibVersion()
                except libvirt.libvirtError:
                    with contextlib.suppress(libvirt.libvirtError):
                        self._conn.close()
                    self._conn = None
            if self._conn is None:
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as e:
                    raise VMError(f"cannot connect to libvirt at {self.uri}: {e}") from None
            return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None

    def lib_version(self) -> int:
        """libvirt's version number (e.g. 9000000); raises :class:`VMError` when libvirt is away."""
        try:
            return int(self.get().getLibVersion())
        except libvirt.libvirtError as e:
            raise VMError(f"libvirt at {self.uri} does not answer: {e}") from None

    def lookup(self, name: str) -> libvirt.virDomain:
        try:
            return self.get().lookupByName(name)
        except libvirt.libvirtError as e:
            if error_code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                raise DomainNotFound(f"no domain named {name!r}") from None
            raise VMError(f"libvirt lookup of {name!r} failed: {e}") from None

    def lookup_uuid(self, uuid: str) -> libvirt.virDomain | None:
        """The domain with ``uuid``, or None (also when the lookup fails)."""
        try:
            return self.get().lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            return None

    def define(self, xml: str, name: str) -> libvirt.virDomain:
        try:
            return self.get().defineXML(xml)
        except libvirt.libvirtError as e:
            raise VMError(f"libvirt refused the domain definition of {name!r}: {e}") from None

    def list_all(self) -> list[libvirt.virDomain]:
        try:
            return list(self.get().listAllDomains())
        except libvirt.libvirtError as e:
            raise VMError(f"listing the domains of {self.uri} failed: {e}") from None

    def agent_command(self, name: str, command: str, timeout: int) -> str:
        """Send one command (QGA JSON) to the guest agent of domain ``name``, waiting at most
        ``timeout`` seconds for its answer; returns the agent's reply (JSON)."""
        dom = self.lookup(name)
        try:
            return str(libvirt_qemu.qemuAgentCommand(dom, command, max(1, timeout), 0))
        except libvirt.libvirtError as e:
            if error_code(e) in AGENT_UNAVAILABLE:
                raise AgentUnavailable(f"the guest agent of {name!r} cannot be reached: {e}") from None
            raise AgentError(f"the guest agent of {name!r} answered with an error: {e}") from None
