"""The install record (``/var/lib/edgevirt/node-install.json``): everything the installer wrote or
changed, and what was there before, so ``uninstall`` removes exactly that and puts back the rest.

It is written before the installer acts (listing what it is about to do) and again when it is
done, each time to a temporary file renamed into place, so a crash leaves a record that covers
everything that may have been touched. What was at a path before (``before``):

* ``None`` - nothing: uninstall removes what is there (a directory only when it is empty)
* ``{"file": <backup name>, "mode": m}`` - a file, copied into the backup directory next to the record
* ``{"link": <target>}`` - a symbolic link
* ``{"dir": m}`` - a directory (its mode is put back)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VERSION = 1


class RecordError(Exception):
    """The record cannot be read; the message says which file and what to do."""


@dataclass
class Entry:
    """One thing the installer made or changed. ``path`` is as the node sees it (not under --root)."""

    kind: str  # dir, file, link, block
    path: str
    role: str
    mode: int | None = None
    sha256: str | None = None  # a file's content, or qemu.conf after the block went in
    target: str | None = None  # a link's target
    parent: bool = False  # a directory made only to hold another entry
    before: dict[str, Any] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.path


@dataclass
class Record:
    entries: list[Entry]
    #: directories made to hold the record itself (removed last, when empty)
    record_parents: list[str] = field(default_factory=list)
    #: the installer's settings, for `status` and for a human reading the file
    options: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Record:
        try:
            doc = json.loads(text)
            if doc.get("version") != VERSION:
                raise ValueError(f"version {doc.get('version')!r}, this installer reads {VERSION}")
            entries = [Entry(**e) for e in doc["entries"]]
            return cls(entries, list(doc.get("record_parents", [])), dict(doc.get("options", {})))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RecordError(
                f"{where} is not an install record this installer reads ({e}); "
                "move it away and undo the install by hand (its entries say what was written)"
            ) from None


def load(path: Path) -> Record | None:
    """The record at ``path`` (under --root), None when there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return Record.from_json(text, str(path))


def save(path: Path, record: Record) -> None:
    """Write the record to a temporary file (0600), fsync it and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, record.to_json().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
