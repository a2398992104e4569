"""The tap character device of a macvtap, made available at a fixed path (there is no udev).

Path contract: ``<deviceDir>/<CNI_CONTAINERID>/<CNI_IFNAME>`` (deviceDir defaults to
/run/edgevirt/macvtap). The devt is found through /sys/dev/char while the link still has its random
temporary name. Only character devices are ever replaced or removed at these paths: a file of any
other kind there is not ours.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

from .errors import DEVICE_NODE_FAILURE, CNIError

SYS_DEV_CHAR = "/sys/dev/char"


def macvtap_major() -> int:
    """The char major of macvtap from /proc/devices."""
    with open("/proc/devices") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[1] == "macvtap":
                return int(parts[0])
    raise CNIError(DEVICE_NODE_FAILURE, "the macvtap module is not loaded (no 'macvtap' in /proc/devices)")


def devt_of(ifname: str, ifindex: int) -> tuple[int, int]:
    """(major, minor) of the tap device of the macvtap named ifname with index ifindex (any netns).

    /sys/class/net only shows the links of the netns that mounted /sys, but /sys/dev/char is not
    namespace-filtered and its symlinks name the netdev and its tap: ".../net/<ifname>/macvtap/tap<N>",
    which is unique while ifname is our random temporary name.
    """
    major = macvtap_major()
    suffix = f"/net/{ifname}/macvtap/tap{ifindex}"
    try:
        entries = os.listdir(SYS_DEV_CHAR)
    except OSError as exc:
        raise CNIError(DEVICE_NODE_FAILURE, f"cannot list {SYS_DEV_CHAR}: {exc.strerror}") from None
    prefix = f"{major}:"
    for entry in entries:
        if entry.startswith(prefix):
            with contextlib.suppress(OSError):
                if os.readlink(f"{SYS_DEV_CHAR}/{entry}").endswith(suffix):
                    return major, int(entry[len(prefix) :])
    raise CNIError(DEVICE_NODE_FAILURE, f"no tap device found for macvtap {ifname} (#{ifindex}) in sysfs")


def node_path(device_dir: str, container_id: str, ifname: str) -> str:
    """Where the tap device node of one attachment lives."""
    return os.path.join(device_dir, container_id, ifname)


def _in_the_way(path: str) -> CNIError:
    return CNIError(
        DEVICE_NODE_FAILURE,
        f"cannot create tap device node {path}: a file that is not a tap device is in the way: "
        "remove it or choose another 'deviceDir'",
    )


def _place(tmp: str, path: str) -> None:
    """Move the finished node to path without ever replacing anything but a stale tap node."""
    try:
        os.link(tmp, path)  # fails when path exists, unlike rename
    except FileExistsError:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and not (stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == macvtap_major()):
            raise _in_the_way(path) from None
        os.rename(tmp, path)  # a stale node of a gone macvtap: replaced
        return
    os.unlink(tmp)


def create(path: str, devt: tuple[int, int], uid: int, gid: int, mode: int) -> None:
    """mknod the tap node atomically (temp name, chown, chmod, link into place); it is on tmpfs, so
    fsync-free."""
    parent = os.path.dirname(path)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{secrets.token_hex(4)}")
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
        os.mknod(tmp, stat.S_IFCHR | 0o600, os.makedev(*devt))
        os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        _place(tmp, path)
    except (OSError, CNIError) as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        remove_dir_if_empty(parent)
        if isinstance(exc, CNIError):
            raise
        raise CNIError(DEVICE_NODE_FAILURE, f"cannot create tap device node {path}: {exc.strerror}") from None


def matches(path: str, devt: tuple[int, int]) -> bool:
    """True when path is a char device with this devt."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == devt


def remove(path: str, devt: tuple[int, int] | None = None) -> None:
    """Remove a tap device node (and its container directory when empty); absent is fine. Only a
    character device of the macvtap major (and of devt, when known) is removed: anything else at the
    path is not ours (a config pointing deviceDir at /dev must not cost the host /dev/net/tun)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISCHR(st.st_mode) and _is_tap(st.st_rdev, devt):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    remove_dir_if_empty(os.path.dirname(path))


def _is_tap(rdev: int, devt: tuple[int, int] | None) -> bool:
    try:
        major = macvtap_major()
    except CNIError:
        return False  # the module is not loaded: no tap node can be ours
    if devt is not None:
        return (os.major(rdev), os.minor(rdev)) == devt and devt[0] == major
    return os.major(rdev) == major


def remove_dir_if_empty(path: str) -> None:
    """rmdir that ignores a missing or non-empty directory."""
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(path)
