"""``uninstall``: undo every recorded entry, last first, and remove the record.

* a file or link we made is removed; one we replaced is put back from its backup (content and mode)
* a directory we made is removed when empty; one with content (VM disks, records) is kept and
  reported, unless ``--purge``; a directory that existed gets its mode back
* the libvirt block: when qemu.conf is as we left it, its earlier bytes are put back exactly;
  when it was edited since, only our block is taken out and the edits stay

Undoing is idempotent: an entry already undone is left alone, so an uninstall that stopped halfway
(the record is removed only at the end) can simply be run again. Then what the DaemonSets left goes
too, with or without a record (:mod:`.node_cleanup`: the macvtap plugin copy, the Node's labels).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path

from . import fsops, node_cleanup, qemu_conf, record
from .node_cleanup import NodeCleanup
from .options import NodeOptions
from .outcome import Change, Outcome
from .record import Entry


def backup_dir(opts: NodeOptions) -> Path:
    path = opts.rooted(opts.record)
    return path.with_name(path.stem + ".backup")


def _restore(opts: NodeOptions, entry: Entry, path: Path) -> str:
    """Put back what was at ``path`` before (nothing, a file, a link); returns the action."""
    before = entry.before
    if before is None:
        return "removed"
    if "file" in before:
        data = (backup_dir(opts) / before["file"]).read_bytes()
        fsops.write_atomic(path, data, int(before["mode"]))
    elif "link" in before:
        fsops.symlink_atomic(path, str(before["link"]))
    return "restored"


def _undo_dir(opts: NodeOptions, entry: Entry, path: Path, purge: bool) -> Change:
    found = fsops.inspect(path)
    change = Change("removed", entry.kind, entry.path, entry.role)
    if entry.before is not None:
        if found.kind == "dir":
            os.chmod(path, int(entry.before["dir"]))
        change.action, change.note = "restored", f"mode {int(entry.before['dir']):04o}"
    elif found.kind == "dir" and not fsops.remove_dir(path, purge and not entry.parent):
        change.action = "kept"
        change.note = (
            "not empty: remove it yourself, or uninstall --purge" if not entry.parent else "not empty"
        )
    elif found.kind not in ("dir", "none"):
        change.action, change.note = "kept", f"a {found.kind} now, not our directory"
    return change


def _undo_block(opts: NodeOptions, entry: Entry, path: Path) -> Change:
    found = fsops.inspect(path)
    change = Change("restored", entry.kind, entry.path, entry.role)
    if found.kind != "file":
        change.action = _restore(opts, entry, path) if entry.before is not None else "removed"
        return change
    text = path.read_text()
    if entry.sha256 is not None and fsops.sha256(text.encode()) == entry.sha256:
        if entry.before is None:
            fsops.remove_file(path)
            change.action = "removed"
        else:
            _restore(opts, entry, path)
        return change
    rest = qemu_conf.without_block(text)
    if rest == text:
        change.action, change.note = "unchanged", "no block of ours in it"
    else:
        fsops.write_atomic(path, rest.encode(), found.mode)
        change.note = "edited since install: only our block taken out"
    return change


def undo(opts: NodeOptions, entry: Entry, purge: bool) -> Change:
    """Undo one entry (see the module's docstring)."""
    path = opts.rooted(Path(entry.path))
    if entry.kind == "dir":
        return _undo_dir(opts, entry, path, purge)
    if entry.kind == "block":
        return _undo_block(opts, entry, path)
    found = fsops.inspect(path)
    if found.kind == "dir":
        return Change("kept", entry.kind, entry.path, entry.role, "a directory now, not ours")
    fsops.remove_file(path)
    return Change(_restore(opts, entry, path), entry.kind, entry.path, entry.role)


def serving(socket_path: str) -> bool:
    """Whether something accepts connections on the unix socket (a running service)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(socket_path)
        except OSError:
            return False
    return True


def uninstall(opts: NodeOptions, purge: bool = False, cleanup: NodeCleanup | None = None) -> Outcome:
    """Undo the install recorded at ``opts.record`` (under ``opts.root``), then remove what the
    DaemonSets left (``cleanup``; None: nothing of theirs)."""
    if cleanup is not None:
        node_cleanup.check(cleanup)
    outcome = _undo_record(opts, purge)
    if cleanup is not None:
        changes, warnings, ok = node_cleanup.clean(opts, cleanup)
        outcome.changes += changes
        outcome.warnings += warnings
        outcome.changed = outcome.changed or bool(changes)
        outcome.ok = ok
    return outcome


def _undo_record(opts: NodeOptions, purge: bool) -> Outcome:
    record_path = opts.rooted(opts.record)
    rec = record.load(record_path)
    if rec is None:
        return Outcome("uninstall", False, warnings=[f"no install record at {record_path}"])
    warnings = []
    for name in ("socket", "macvtap_socket"):
        sock = str(rec.options.get(name, ""))
        if sock and serving(str(opts.rooted(Path(sock)))):
            warnings.append(f"something still serves on {sock}: stop the service (systemctl stop ...) first")
    changes = [undo(opts, e, purge) for e in reversed(rec.entries)]
    shutil.rmtree(backup_dir(opts), ignore_errors=True)
    record_path.unlink()
    for parent in reversed(rec.record_parents):
        with contextlib.suppress(OSError):
            fsops.remove_dir(opts.rooted(Path(parent)), purge=False)
    steps = []
    if opts.root == Path("/"):
        steps = [
            "systemctl daemon-reload",
            "point kubelet at containerd again, then: systemctl restart kubelet",
        ]
        if any(c.kind == "block" and c.action in ("restored", "removed") for c in changes):
            steps.append("systemctl restart libvirtd   # qemu.conf restored")
    return Outcome("uninstall", True, changes, warnings, steps)
