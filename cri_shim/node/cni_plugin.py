"""The macvtap CNI plugin copy on the host: installed by the DaemonSet, removed by ``uninstall``.

The edgevirt-node DaemonSet's init container runs ``edgevirt-node install-cni-plugin``: the image's
static daemon-only ``macvtap`` is written into the host's CNI bin dir (to a temporary file, fsynced,
renamed into place: a runtime exec'ing the plugin meanwhile gets the old file or the new one), as
flannel and calico install theirs. Beside it, the marker ``.macvtap.edgevirt`` (JSON) says the file
is ours::

    {"file": "macvtap", "ours": [<sha256 of every copy we wrote, newest first>],
     "backup": null | {"file": ".macvtap.edgevirt-backup", "mode": 493} | {"link": "<target>"}}

A ``macvtap`` that is not ours (e.g. deploy/cni/install-plugin's) is kept as the backup and put back
by :func:`remove_plugin`, which ``edgevirt-node uninstall`` runs: our copy goes only when the file
still is one we wrote (its sha256 is in ``ours``); one replaced since is left alone. Both are
idempotent; nothing but the three names above is ever touched.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fsops
from .outcome import Change

PLUGIN = "macvtap"
ROLE = "the macvtap CNI plugin (the edgevirt-node DaemonSet's copy)"
KEEP_SHAS = 5  # earlier copies still count as ours (an upgrade stopped halfway)


def marker_path(bin_dir: Path, name: str = PLUGIN) -> Path:
    return bin_dir / f".{name}.edgevirt"


def backup_path(bin_dir: Path, name: str = PLUGIN) -> Path:
    return bin_dir / f".{name}.edgevirt-backup"


@dataclass
class Marker:
    ours: list[str] = field(default_factory=list)
    backup: dict[str, Any] | None = None

    def to_json(self, name: str) -> bytes:
        doc = {"file": name, "ours": self.ours, "backup": self.backup}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def read_marker(bin_dir: Path, name: str = PLUGIN) -> Marker | None:
    """The marker beside ``name`` (None when absent; one we cannot read counts as absent: then the
    file is not known to be ours and is left alone)."""
    try:
        doc = json.loads(marker_path(bin_dir, name).read_text())
        ours = [str(s) for s in doc["ours"]]
        backup = doc.get("backup")
        return Marker(ours, dict(backup) if isinstance(backup, dict) else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _backup_foreign(bin_dir: Path, name: str, found: fsops.Found) -> dict[str, Any]:
    """Keep what is at ``name`` (not ours) so that removing ours puts it back."""
    if found.kind == "link":
        return {"link": found.target}
    fsops.write_atomic(backup_path(bin_dir, name), (bin_dir / name).read_bytes(), found.mode)
    return {"file": backup_path(bin_dir, name).name, "mode": found.mode}


def install_plugin(source: Path, bin_dir: Path, name: str = PLUGIN) -> Change:
    """Write ``source`` as ``bin_dir/name`` (0755) with its marker; idempotent."""
    data = source.read_bytes()
    sha = fsops.sha256(data)
    dest = bin_dir / name
    found = fsops.inspect(dest)
    if found.kind in ("dir", "other"):
        raise FileExistsError(
            f"{dest} is a {found.kind}, not a file or link: not replacing it with the plugin"
        )
    marker = read_marker(bin_dir, name) or Marker()
    current = fsops.file_sha256(dest) if found.kind == "file" else None
    if current == sha and sha in marker.ours and found.mode == 0o755:
        return Change("unchanged", "file", str(dest), ROLE)
    action = "updated" if current in marker.ours else "created"
    if found.kind != "none" and current not in marker.ours:
        marker.backup = _backup_foreign(bin_dir, name, found)
        action = "replaced"
    marker.ours = [sha, *[s for s in marker.ours if s != sha]][:KEEP_SHAS]
    # the marker first: a crash before the rename leaves the old file and a marker that still knows it
    fsops.write_atomic(marker_path(bin_dir, name), marker.to_json(name), 0o644)
    fsops.write_atomic(dest, data, 0o755)
    note = "the file that was there is kept, uninstall puts it back" if action == "replaced" else ""
    return Change(action, "file", str(dest), ROLE, note)


def _restore(bin_dir: Path, name: str, backup: dict[str, Any]) -> str:
    dest = bin_dir / name
    if "link" in backup:
        fsops.symlink_atomic(dest, str(backup["link"]))
        return f"put back the link to {backup['link']}"
    saved = backup_path(bin_dir, name)
    fsops.write_atomic(dest, saved.read_bytes(), int(backup.get("mode", 0o755)))
    return "put back the file that was there before"


def remove_plugin(bin_dir: Path, name: str = PLUGIN) -> Change | None:
    """Remove our copy (put back what it replaced); None when there is no marker (nothing of ours)."""
    marker = read_marker(bin_dir, name)
    if marker is None:
        return None
    dest = bin_dir / name
    found = fsops.inspect(dest)
    ours = found.kind == "none" or (found.kind == "file" and fsops.file_sha256(dest) in marker.ours)
    change = Change(
        "kept", "file", str(dest), ROLE, f"a {found.kind} written by someone else since: left alone"
    )
    if ours:
        change.action, change.note = "removed", ""
        if marker.backup is not None and ("link" in marker.backup or backup_path(bin_dir, name).is_file()):
            change.action, change.note = "restored", _restore(bin_dir, name, marker.backup)
        elif found.kind != "none":
            os.unlink(dest)
        else:
            change.note = "already gone"
    with contextlib.suppress(FileNotFoundError):
        backup_path(bin_dir, name).unlink()
    marker_path(bin_dir, name).unlink(missing_ok=True)
    return change
