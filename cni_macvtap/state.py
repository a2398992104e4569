"""On-disk records of attachments (one JSON file each) so DEL and GC can undo what ADD did.

Layout: ``<stateDir>/<network name>/<CNI_CONTAINERID>/<CNI_IFNAME>.json``, written atomically (temp
file + rename). ADD writes the record *before* it acts (``"phase": "adding"``, with the namespace and
the temporary link name) and again when done, so even a killed ADD is undone by DEL. A file only
counts as a record when it is a regular file naming the same attachment as its path; anything else
at these paths is not ours and is never removed or overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator
from typing import Any

from .defaults import MAX_STDIN
from .environment import CONTAINER_ID_MAX, CONTAINER_ID_RE, IFNAME_MAX
from .errors import IO_FAILURE, CNIError

SUFFIX = ".json"
MAX_RECORD = 2 * MAX_STDIN + (64 << 10)  # the record holds the ADD config (and its args)
ADDING, DONE = "adding", "done"


def record_path(state_dir: str, network: str, container_id: str, ifname: str) -> str:
    """Path of one attachment's record."""
    return os.path.join(state_dir, network, container_id, ifname + SUFFIX)


def write(path: str, record: dict[str, Any]) -> None:
    """Write a record atomically (temp file + rename); failures are code 5 naming the path."""
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.rename(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CNIError(IO_FAILURE, f"cannot write the attachment record {path}: {exc.strerror}") from None


def read(path: str) -> dict[str, Any] | None:
    """The record at path, or None when absent, unreadable, too large, or not a record of the
    attachment its path names."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RECORD:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            doc = json.loads(f.read(MAX_RECORD + 1))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    cid = os.path.basename(os.path.dirname(path))
    ifname = os.path.basename(path)[: -len(SUFFIX)]
    if not isinstance(doc, dict) or doc.get("containerID") != cid or doc.get("ifname") != ifname:
        return None
    return doc


def occupied(path: str) -> bool:
    """True when something (a record or not) is at path."""
    return os.path.lexists(path)


def remove(path: str) -> None:
    """Remove a record (the caller read it as ours) and its container directory when empty."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


def _plausible(container_id: str, ifname: str) -> bool:
    return (
        bool(CONTAINER_ID_RE.fullmatch(container_id))
        and len(container_id) <= CONTAINER_ID_MAX
        and 0 < len(ifname) <= IFNAME_MAX
    )


def records(state_dir: str, network: str) -> Iterator[tuple[str, str, str]]:
    """(container_id, ifname, path) of every file of one network that may be a record (read() decides)."""
    base = os.path.join(state_dir, network)
    try:
        containers = os.listdir(base)
    except OSError:
        return
    for cid in containers:
        with contextlib.suppress(OSError):
            for fname in os.listdir(os.path.join(base, cid)):
                ifname = fname[: -len(SUFFIX)]
                if fname.endswith(SUFFIX) and _plausible(cid, ifname):
                    yield cid, ifname, os.path.join(base, cid, fname)
