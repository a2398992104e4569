"""Files only root may read: records, seed ISOs, console logs and the folders that hold them.

A VM's files carry what its owner wrote (cloud-init user-data, which may hold secrets) and what its
disks hold, so they are made 0600 in 0700 folders; the node's other local users see nothing. QEMU
runs as root on edgevirt nodes (``user = "root"`` in qemu.conf, set by deploy/install), so it
opens them; virtlogd and libvirtd run as root too.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path, *, chmod_existing: bool = True) -> Path:
    """``path`` and any missing parents made 0700; an existing ``path`` is set to 0700 too unless
    ``chmod_existing`` is false (a folder someone else made keeps its mode)."""
    missing = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=DIR_MODE)
            os.chmod(d, DIR_MODE)  # mkdir's mode is masked by the umask
    if chmod_existing:
        os.chmod(path, DIR_MODE)
    return Path(path)


def write_private(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` (0600) through a temporary file renamed into place."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, FILE_MODE)  # an old temporary file may have had another mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
