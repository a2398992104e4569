"""One operation per attachment at a time, across daemon threads, daemon workers and standalone calls.

The lock is an open-file-description lock (F_OFD_SETLK) on one byte of ``<stateDir>/.locks`` chosen by
the attachment's hash (a collision only serialises more). OFD locks belong to the open file, not the
process, so each call opens the file, locks and closes it: daemon threads exclude each other exactly
like separate processes, no descriptor is kept between calls, and they conflict with the classic
POSIX locks (lockf) older versions of the plugin take on the same byte. Waiting is bounded: after
LOCK_TIMEOUT_S the call fails with code 11 (try again).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import time
import zlib
from collections.abc import Iterator

from .errors import IO_FAILURE, TRY_AGAIN, CNIError

LOCK_FILE = ".locks"
LOCK_TIMEOUT_S = 90.0
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid


def _open(state_dir: str, create: bool) -> int | None:
    """The lock file. Without create (DEL, CHECK: best effort) None when it cannot be had: no state dir
    means no records, nothing another process could be changing."""
    path = os.path.join(state_dir, LOCK_FILE)
    try:
        if create:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
        elif not os.path.isdir(state_dir):
            return None
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if not create:
            return None
        raise CNIError(
            IO_FAILURE, f"cannot open the lock file {path}: {exc.strerror}: fix 'stateDir' or its permissions"
        ) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CNIError(IO_FAILURE, f"{path} is not a regular file: remove it")
    return fd


def _acquire(fd: int, offset: int, what: str) -> None:
    request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    pause = 0.002
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise CNIError(IO_FAILURE, f"cannot lock {what}: {exc.strerror}") from None
        if time.monotonic() >= deadline:
            raise CNIError(
                TRY_AGAIN,
                f"another operation on {what} has been running for {LOCK_TIMEOUT_S:.0f} s: try again",
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


@contextlib.contextmanager
def attachment_lock(state_dir: str, key: tuple[str, str, str], create: bool = False) -> Iterator[None]:
    """Hold the lock of attachment key = (network, container id, ifname) for the body."""
    fd = _open(state_dir, create)
    if fd is None:
        yield
        return
    try:
        offset = zlib.crc32("\0".join(key).encode("utf-8", "surrogateescape")) & 0x7FFFFFFF
        _acquire(fd, offset, "attachment " + "/".join(key[1:]) + f" of network {key[0]}")
        yield
    finally:
        os.close(fd)  # closing the open file description releases its lock
