"""File operations of the installer: what is at a path, atomic writes, backups, removal.

Every write goes to a temporary file in the same directory, is fsynced, given its mode and renamed
into place, so a reader (systemd, kubelet, libvirtd) sees the old file or the new one, never half.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Found:
    """What is at a path: ``kind`` none, file, link, dir or other; ``mode`` its permission bits."""

    kind: str
    mode: int = 0
    target: str = ""


def inspect(path: Path) -> Found:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return Found("none")
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return Found("link", mode, os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return Found("dir", mode)
    if stat.S_ISREG(st.st_mode):
        return Found("file", mode)
    return Found("other", mode)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str | None:
    try:
        return sha256(path.read_bytes())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """``data`` at ``path`` with ``mode``, by rename (a link at ``path`` is replaced, not followed)."""
    tmp = path.with_name(f".{path.name}.edgevirt-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def symlink_atomic(path: Path, target: str) -> None:
    tmp = path.with_name(f".{path.name}.edgevirt-tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, path)


def make_dir(path: Path, mode: int) -> None:
    """``path`` as a directory with exactly ``mode`` (not masked by the umask)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode)
    os.chmod(path, mode)


def remove_dir(path: Path, purge: bool) -> bool:
    """Remove ``path`` when empty (any content with ``purge``); False when it was kept."""
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        if not purge:
            return False
        shutil.rmtree(path)
    return True


def remove_file(path: Path) -> None:
    """Remove a file or link at ``path`` (nothing when absent; a directory is never removed here)."""
    if inspect(path).kind in ("file", "link", "other"):
        path.unlink()


def backup(path: Path, backup_dir: Path, name: str) -> str:
    """Copy the file at ``path`` to ``backup_dir/name`` (0600); returns ``name``."""
    backup_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(backup_dir / name, path.read_bytes(), 0o600)
    return name
