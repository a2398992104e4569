"""Where a call acts: the host namespace (the process-wide HostLinks and the master) and the pod's
network namespace named by CNI_NETNS, opened safely and never the plugin's own.

pyroute2 is imported only when a verb needs netlink (the links module is loaded lazily).
"""

from __future__ import annotations

import os
import threading
from types import TracebackType
from typing import TYPE_CHECKING

from . import netns
from .errors import INVALID_CONFIG, INVALID_ENVIRONMENT, CNIError

if TYPE_CHECKING:
    from .config import NetConf
    from .links import HostLinks, LinkInfo, PodLinks

_host: HostLinks | None = None
_host_guard = threading.Lock()


def host_links() -> HostLinks:
    """The process-wide HostLinks (created on first use; the daemon keeps it warm)."""
    global _host
    with _host_guard:
        if _host is None:
            from .links import HostLinks

            _host = HostLinks()
        return _host


def resolve_master(conf: NetConf) -> LinkInfo:
    """The master link: the configured one, else the interface of the host's default route."""
    host = host_links()
    name = conf.master or host.default_route_link()
    if name is None:
        raise CNIError(
            INVALID_CONFIG,
            "invalid config: 'master' is not set and this host has no default route: set \"master\"",
        )
    link = host.by_name(name)
    if link is None:
        raise CNIError(
            INVALID_CONFIG,
            f"invalid config: 'master' {name!r} does not exist on the host: name an existing interface",
        )
    return link


class PodNetns:
    """An open pod network namespace: its fd, its identity, and netlink sockets inside it."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.identity = netns.identity(fd)

    def __enter__(self) -> PodNetns:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        os.close(self.fd)

    def links(self) -> PodLinks:
        """Link operations inside this namespace (a context manager owning its socket)."""
        from .links import PodLinks

        try:
            return PodLinks(self.fd)
        except OSError as exc:
            raise CNIError(
                INVALID_ENVIRONMENT, f"CNI_NETNS {self.path!r} is not a network namespace: {exc.strerror}"
            ) from None


def open_pod(path: str) -> PodNetns:
    """CNI_NETNS opened for ADD or CHECK: a network namespace, and not the host's (code 4)."""
    try:
        fd = netns.open_netns(path)
    except netns.NotANetns:
        raise CNIError(
            INVALID_ENVIRONMENT, f"CNI_NETNS {path!r} is not a network namespace: give the pod's namespace"
        ) from None
    except OSError as exc:
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_NETNS {path!r} cannot be opened: {exc.strerror}") from None
    pod = PodNetns(path, fd)
    if pod.identity in netns.host_identities():
        os.close(fd)
        raise CNIError(
            INVALID_ENVIRONMENT,
            f"CNI_NETNS {path!r} is the host's network namespace (the plugin's own or init's): "
            "give the pod's network namespace",
        )
    return pod


def find_pod(path: str) -> PodNetns | None:
    """A namespace DEL or GC may act in, or None when it is gone or is not a network namespace."""
    try:
        fd = netns.open_netns(path)
    except OSError:
        return None
    return PodNetns(path, fd)
