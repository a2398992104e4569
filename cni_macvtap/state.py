"""On-disk records of attachments (one JSON file each) so DEL and GC can undo what ADD did.

Layout: ``<stateDir>/<network name>/<CNI_CONTAINERID>/<CNI_IFNAME>.json``, written atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from typing import Any

SUFFIX = ".json"


def record_path(state_dir: str, network: str, container_id: str, ifname: str) -> str:
    """Path of one attachment's record."""
    return os.path.join(state_dir, network, container_id, ifname + SUFFIX)


def write(path: str, record: dict[str, Any]) -> None:
    """Write a record atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.rename(tmp, path)


def read(path: str) -> dict[str, Any] | None:
    """A record, or None when absent or unreadable."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def remove(path: str) -> None:
    """Remove a record and its container directory when empty."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))


def records(state_dir: str, network: str) -> Iterator[tuple[str, str, str]]:
    """(container_id, ifname, path) of every record of one network."""
    base = os.path.join(state_dir, network)
    try:
        containers = os.listdir(base)
    except FileNotFoundError:
        return
    for cid in containers:
        with contextlib.suppress(NotADirectoryError, FileNotFoundError):
            for fname in os.listdir(os.path.join(base, cid)):
                if fname.endswith(SUFFIX):
                    yield cid, fname[: -len(SUFFIX)], os.path.join(base, cid, fname)
