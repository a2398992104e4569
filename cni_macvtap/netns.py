"""Netlink sockets inside another network namespace without fork: a throwaway thread does setns(2).

pyroute2's own netns support forks a child process, which is not safe in a threaded daemon. setns(2)
with CLONE_NEWNET changes only the calling thread, and a socket keeps the namespace it was created in,
so a short-lived thread enters the namespace, creates the socket and exits; no other thread ever
changes namespace, and the thread that did is never reused.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading

CLONE_NEWNET = 0x40000000
NETLINK_ROUTE = 0

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_netns(path: str) -> int:
    """Open a network namespace file read-only (never creates anything); raises OSError if absent."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Entering it proves it is a network namespace; done in the socket thread below.
        return fd
    except BaseException:
        os.close(fd)
        raise


def netlink_socket_in(netns_fd: int) -> socket.socket:
    """A NETLINK_ROUTE socket bound to the network namespace behind netns_fd."""
    box: dict[str, object] = {}

    def worker() -> None:
        try:
            _setns(netns_fd)
            box["sock"] = socket.socket(
                socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_ROUTE
            )
        except OSError as exc:
            box["err"] = exc
        # The thread ends here: its namespace dies with it.

    t = threading.Thread(target=worker, name="netns-socket", daemon=True)
    t.start()
    t.join()
    if "err" in box:
        exc = box["err"]
        assert isinstance(exc, OSError)
        if exc.errno == errno.EINVAL:
            raise OSError(errno.EINVAL, "not a network namespace") from exc
        raise exc
    sock = box["sock"]
    assert isinstance(sock, socket.socket)
    return sock
