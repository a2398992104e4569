"""Netlink work on macvtap links with pyroute2: create on the master, rename, bring up, inspect, delete.

The host side uses one long-lived IPRoute guarded by a lock (pyroute2's sync API is not safe for
concurrent use of one socket); the pod side gets a fresh socket per call from netns.netlink_socket_in.
pyroute2 is untyped: its messages are Any here and nowhere else.
"""

from __future__ import annotations

import errno
import functools
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from . import netns, package_init
from .errors import LINK_FAILURE, TRY_AGAIN, CNIError

package_init.skip_init("pyroute2")  # IPRoute alone, not every pyroute2 API (cni_macvtap.package_init)
from pyroute2.iproute.linux import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

T = TypeVar("T")
MACVTAP_MODES = {"private": 1, "vepa": 2, "bridge": 4, "passthru": 8, "source": 16}
MODE_NAMES = {v: k for k, v in MACVTAP_MODES.items()}
TEMP_PREFIX = "mvt"


@dataclass(frozen=True)
class LinkInfo:
    """What we need to know about a link."""

    index: int
    name: str
    kind: str | None
    mode: str | None
    mac: str
    mtu: int
    up: bool
    link: int | None  # IFLA_LINK: the master's ifindex (in the link's link-netns)


class MacRefused(Exception):
    """The kernel refused the MAC address at creation (the caller names where the MAC came from)."""


class AddressInUse(Exception):
    """The link cannot come up: another macvlan/macvtap on the master already has its MAC."""


def temp_name() -> str:
    """A random name for a new link until it is renamed to CNI_IFNAME."""
    return TEMP_PREFIX + secrets.token_hex(5)


def _info(msg: Any) -> LinkInfo:
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    mode_num = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_MACVTAP_MODE")
    return LinkInfo(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        mode=MODE_NAMES.get(mode_num) if isinstance(mode_num, int) else mode_num,
        mac=(msg.get_attr("IFLA_ADDRESS") or "").lower(),
        mtu=msg.get_attr("IFLA_MTU"),
        up=bool(msg["flags"] & 1),
        link=msg.get_attr("IFLA_LINK"),
    )


def _get(ipr: Any, what: str, **key: Any) -> LinkInfo | None:
    """RTM_GETLINK by name or index: the link, or None when there is none."""
    try:
        msgs = ipr.link("get", **key)
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise netlink_error(exc, f"looking up {what}") from None
    return _info(msgs[0])


def netlink_error(exc: NetlinkError, action: str) -> CNIError:
    """Map a netlink failure to a CNI error (EBUSY/EAGAIN/ENOBUFS are worth a retry)."""
    code = TRY_AGAIN if exc.code in (errno.EBUSY, errno.EAGAIN, errno.ENOBUFS) else LINK_FAILURE
    return CNIError(code, f"{action}: {os.strerror(exc.code)}", f"netlink errno {exc.code}")


def name_taken(name: str) -> CNIError:
    """The error for a CNI_IFNAME that already exists in the pod namespace."""
    return CNIError(
        LINK_FAILURE, f"interface {name!r} already exists in CNI_NETNS: use another CNI_IFNAME or DEL first"
    )


def _on_owner_thread(method: Callable[..., T]) -> Callable[..., T]:
    """Run a HostLinks method on its single owner thread: pyroute2's sync API binds an event loop to each
    calling thread and never releases it (one leaked fd per new thread), so only one thread may use it."""

    @functools.wraps(method)
    def wrapper(self: HostLinks, *args: Any, **kwargs: Any) -> T:
        return self._owner.submit(method, self, *args, **kwargs).result()

    return wrapper


class HostLinks:
    """Link operations in the namespace this process runs in (where the master lives)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ipr: IPRoute | None = None
        self._owner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-netlink")

    @contextmanager
    def _rt(self) -> Iterator[IPRoute]:
        with self._lock:
            if self._ipr is None:
                self._ipr = IPRoute()
            try:
                yield self._ipr
            except OSError as exc:
                if isinstance(exc, NetlinkError):
                    raise
                # A broken socket is dropped and re-opened on next use.
                self._ipr.close()
                self._ipr = None
                raise

    @_on_owner_thread
    def close(self) -> None:
        """Close the netlink socket."""
        with self._lock:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

    @_on_owner_thread
    def by_name(self, name: str) -> LinkInfo | None:
        """The link called name, or None."""
        with self._rt() as ipr:
            return _get(ipr, f"link {name!r}", ifname=name)

    @_on_owner_thread
    def default_route_link(self) -> str | None:
        """Name of the interface of the default route (IPv4 first, then IPv6), or None."""
        with self._rt() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                for route in ipr.get_routes(family=family, table=254):
                    if route["dst_len"] == 0 and route.get_attr("RTA_OIF"):
                        oif = route.get_attr("RTA_OIF")
                        name = ipr.link("get", index=oif)[0].get_attr("IFLA_IFNAME")
                        return str(name) if name is not None else None
        return None

    @_on_owner_thread
    def create_macvtap(
        self, name: str, master: int, netns_fd: int, mode: str, mtu: int | None, mac: str | None
    ) -> None:
        """Create a macvtap on master directly inside the namespace behind netns_fd, under the temporary
        name (creating it there is much cheaper than moving it: no synchronize_net)."""
        kwargs: dict[str, Any] = {"ifname": name, "kind": "macvtap", "link": master, "net_ns_fd": netns_fd}
        kwargs["macvtap_mode"] = mode
        if mtu:
            kwargs["mtu"] = mtu
        if mac:
            kwargs["address"] = mac
        with self._rt() as ipr:
            try:
                ipr.link("add", **kwargs)
            except NetlinkError as exc:
                if exc.code == errno.EADDRNOTAVAIL or (exc.code == errno.EINVAL and mac):
                    raise MacRefused(os.strerror(exc.code)) from None
                raise netlink_error(exc, "creating the macvtap link") from None


class PodLinks:
    """Link operations inside a pod's network namespace, over a socket created there."""

    def __init__(self, netns_fd: int) -> None:
        self._sock = netns.netlink_socket_in(netns_fd)
        try:
            self._ipr = IPRoute(use_socket=self._sock)
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> PodLinks:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._ipr.close()
        finally:
            self._sock.close()  # IPRoute does not close a socket it was given

    def by_name(self, name: str) -> LinkInfo | None:
        """The link called name in the pod namespace, or None."""
        return _get(self._ipr, f"{name!r} in CNI_NETNS", ifname=name)

    def by_index(self, index: int) -> LinkInfo | None:
        """The link with this ifindex in the pod namespace, or None."""
        return _get(self._ipr, f"link #{index} in CNI_NETNS", index=index)

    def rename(self, index: int, name: str) -> None:
        """Rename a link (it is down); EEXIST means the name is taken."""
        try:
            self._ipr.link("set", index=index, ifname=name)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                raise name_taken(name) from None
            raise netlink_error(exc, f"renaming the macvtap to {name!r}") from None

    def set_up(self, index: int) -> None:
        """Bring a link up; AddressInUse when its MAC is taken on the master."""
        try:
            self._ipr.link("set", index=index, state="up")
        except NetlinkError as exc:
            if exc.code == errno.EADDRINUSE:
                raise AddressInUse(os.strerror(exc.code)) from None
            raise netlink_error(exc, "bringing the macvtap up") from None

    def delete(self, index: int) -> bool:
        """Delete a link in the pod namespace; False when it is already gone."""
        try:
            self._ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return False
            raise netlink_error(exc, f"deleting link #{index} in CNI_NETNS") from None
        return True
