"""Paths of the node's filesystem seen from a container that mounts the node's root elsewhere.

The macvtap daemon of the edgevirt-node DaemonSet runs in a container; the runtime's CNI_PATH names
the node's directories, and packaged plugins are often symlinks into other node directories (Debian's
containernetworking-plugins: /opt/cni/bin/host-local -> /usr/lib/cni/host-local). With the node's
root mounted at ``--host-root`` (as Multus's thick daemon mounts /hostroot), a node path is resolved
under that root, absolute symlink targets re-rooted there, so it never escapes into the container's
own tree.
"""

from __future__ import annotations

import os

MAX_LINKS = 40  # as Linux's own limit on symlinks followed in one lookup (ELOOP)


def resolve(root: str, path: str) -> str:
    """The file the node sees at the absolute ``path``, as a path under ``root`` (the node's root
    mounted there); a missing component is returned unresolved (the caller's check then fails)."""
    if not path.startswith("/"):
        raise ValueError(f"{path!r}: a node path must be absolute")
    todo = [p for p in path.split("/") if p]
    inside = ""  # the resolved part, relative to root, starting with "/" once non-empty
    links = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            inside = os.path.dirname(inside) if inside else ""
            inside = "" if inside == "/" else inside
            continue
        step = f"{inside}/{part}"
        full = root + step
        if not os.path.islink(full):
            inside = step
            continue
        links += 1
        if links > MAX_LINKS:
            raise OSError(f"{path}: more than {MAX_LINKS} symbolic links under {root}")
        target = os.readlink(full)
        if target.startswith("/"):
            inside = ""
        todo = [p for p in target.split("/") if p] + todo
    return root + (inside or "/")
