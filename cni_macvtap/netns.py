"""Network namespace files: opening one safely and making netlink sockets inside it without fork.

``open_netns`` never opens anything that is not a namespace: the path is opened with O_PATH (which does
not open the file itself, so a FIFO cannot block and a device node never sees an open), must be a
regular file (nsfs inodes are), is re-opened through /proc/self/fd, and NS_GET_NSTYPE must say it is
a network namespace.

pyroute2's own netns support forks a child process, which is not safe in a threaded daemon. setns(2)
with CLONE_NEWNET changes only the calling thread, and a socket keeps the namespace it was created in,
so a short-lived thread enters the namespace, creates the socket and exits; no other thread ever
changes namespace, and the thread that did is never reused.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import stat
import threading

CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), Linux >= 4.11
NETLINK_ROUTE = 0

_libc = ctypes.CDLL(None, use_errno=True)


class NotANetns(OSError):
    """The path exists but is not a network namespace."""


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_netns(path: str) -> int:
    """A read-only fd of the network namespace at path; OSError when absent, NotANetns when it is
    something else (a file, a FIFO, a device, a directory, another kind of namespace)."""
    pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(pfd).st_mode):
            raise NotANetns(errno.EINVAL, "not a namespace file")
        fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    finally:
        os.close(pfd)
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = None  # ENOTTY: an ordinary file
    if kind != CLONE_NEWNET:
        os.close(fd)
        raise NotANetns(errno.EINVAL, "not a network namespace")
    return fd


def identity(fd: int) -> tuple[int, int]:
    """(device, inode) of a namespace fd: equal for every path to the same namespace."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


HOST_NAMESPACES = ("/proc/self/ns/net", "/proc/1/ns/net")


def host_identities() -> set[tuple[int, int]]:
    """The identities of the network namespaces a pod never has: this process's own and init's."""
    out = set()
    for path in HOST_NAMESPACES:
        try:
            st = os.stat(path)
        except OSError:
            continue  # /proc/1 is not ours to see: our own suffices
        out.add((st.st_dev, st.st_ino))
    return out


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
            raise NotANetns(errno.EINVAL, "not a network namespace") from exc
        raise exc
    sock = box["sock"]
    assert isinstance(sock, socket.socket)
    return sock
