"""``install``: make the node as the plan says, recording first what it is about to do.

1. Check the options and plan (nothing written yet; an InstallError leaves the node untouched).
2. For every planned entry find what is there now (``before``), or take it from an earlier record;
   add the parent directories that do not exist yet.
3. Nothing differs from the record and the node: a no-op.
4. Otherwise back up the files about to be replaced, write the record (planned entries plus those
   of an earlier install that are no longer wanted), undo the unwanted ones, make the planned
   ones, and write the final record.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import fsops, qemu_conf, record
from .options import CRI_UNIT, MACVTAP_UNIT, InstallError, NodeOptions, check, with_binaries
from .outcome import Change, Outcome
from .plan import Want, plan
from .record import Entry, Record
from .undo import backup_dir, undo
from .units import cri_argv, macvtap_argv

PARENT_MODE = 0o755


def summary(opts: NodeOptions) -> dict[str, Any]:
    """The options as plain JSON (kept in the record)."""
    result: dict[str, Any] = json.loads(json.dumps(asdict(opts), default=str))
    return result


def backup_name(path: str) -> str:
    return fsops.sha256(path.encode())[:16] + "-" + Path(path).name


def _before(opts: NodeOptions, want: Want) -> dict[str, Any] | None:
    found = fsops.inspect(opts.rooted(want.path))
    if found.kind == "none":
        return None
    if want.kind == "dir":
        if found.kind == "dir":
            return {"dir": found.mode}
        raise InstallError(
            f"{want.flag}: {want.path} exists and is not a directory; remove it or choose another"
        )
    if found.kind in ("dir", "other") or (want.kind == "block" and found.kind == "link"):
        raise InstallError(f"{want.flag}: {want.path} is a {found.kind}, not a file; pass the file to use")
    if found.kind == "link":
        return {"link": found.target}
    return {"file": backup_name(str(want.path)), "mode": found.mode}


def _entry(opts: NodeOptions, want: Want, old: Entry | None) -> Entry:
    before = old.before if old is not None else _before(opts, want)
    entry = Entry(want.kind, str(want.path), want.role, before=before)
    if want.kind in ("dir", "file"):
        entry.mode = want.mode
    if want.kind == "file":
        entry.sha256 = fsops.sha256(want.content.encode())
    elif want.kind == "link":
        entry.target = want.content
    elif want.kind == "block" and old is not None:
        entry.sha256 = old.sha256
    return entry


def _parents(
    opts: NodeOptions,
    path: Path,
    flag: str,
    old: dict[tuple[str, str], Entry],
    skip: frozenset[str] = frozenset(),
) -> list[Entry]:
    """Entries for the directories above ``path`` that we made (earlier) or must make (now);
    ``skip``: the record's own parents (made first, removed last)."""
    out = []
    for parent in reversed(path.parents[:-1]):  # from the top down, without "/"
        if str(parent) in skip:
            continue
        earlier = old.get(("dir", str(parent)))
        if earlier is not None and earlier.parent:
            out.append(earlier)
            continue
        found = fsops.inspect(opts.rooted(parent))
        if found.kind == "none":
            out.append(Entry("dir", str(parent), "parent directory", mode=PARENT_MODE, parent=True))
        elif found.kind != "dir":
            raise InstallError(f"{flag}: {parent} exists and is not a directory; remove it or choose another")
    return out


def entries(
    opts: NodeOptions,
    wants: list[Want],
    old: dict[tuple[str, str], Entry],
    skip: frozenset[str] = frozenset(),
) -> list[Entry]:
    """The record's entries for ``wants`` (parents first, but not those in ``skip``); reads only."""
    out: list[Entry] = []
    seen: set[tuple[str, str]] = set()
    for want in wants:
        for entry in [
            *_parents(opts, want.path, want.flag, old, skip),
            _entry(opts, want, old.get((want.kind, str(want.path)))),
        ]:
            if entry.key not in seen:
                seen.add(entry.key)
                out.append(entry)
    return out


def satisfied(opts: NodeOptions, entry: Entry) -> bool:
    """Whether the node already has ``entry`` as recorded."""
    path = opts.rooted(Path(entry.path))
    found = fsops.inspect(path)
    if entry.kind == "dir":
        return found.kind == "dir" and (entry.parent or found.mode == entry.mode)
    if entry.kind == "file":
        return found.kind == "file" and found.mode == entry.mode and fsops.file_sha256(path) == entry.sha256
    if entry.kind == "link":
        return found.kind == "link" and found.target == entry.target
    if found.kind != "file":
        return False
    text = path.read_text()
    return qemu_conf.with_block(text) == text


def _make(opts: NodeOptions, entry: Entry, content: str) -> Change:
    path = opts.rooted(Path(entry.path))
    if satisfied(opts, entry):
        return Change("unchanged", entry.kind, entry.path, entry.role)
    found = fsops.inspect(path)
    action = "created" if found.kind == "none" else "updated"
    if entry.kind == "dir":
        fsops.make_dir(path, entry.mode or PARENT_MODE)
    elif entry.kind == "file":
        fsops.write_atomic(path, content.encode(), entry.mode or 0o644)
    elif entry.kind == "link":
        fsops.symlink_atomic(path, entry.target or "")
    else:
        text = path.read_text() if found.kind == "file" else ""
        new = qemu_conf.with_block(text)
        fsops.write_atomic(path, new.encode(), found.mode if found.kind == "file" else 0o644)
        entry.sha256 = fsops.sha256(new.encode())
        action = "updated" if found.kind == "file" else "created"
    return Change(action, entry.kind, entry.path, entry.role)


def _backups(opts: NodeOptions, new: list[Entry], old: dict[tuple[str, str], Entry]) -> None:
    """Copy the files about to be replaced (entries not in an earlier record) next to the record."""
    for entry in new:
        if entry.key not in old and entry.before is not None and "file" in entry.before:
            fsops.backup(opts.rooted(Path(entry.path)), backup_dir(opts), entry.before["file"])


def info(opts: NodeOptions) -> dict[str, Any]:
    """What a caller needs to run the services itself (the local cluster) or to check them."""
    units = {CRI_UNIT: {"path": str(opts.unit_dir / CRI_UNIT), "exec_start": cri_argv(opts)}}
    if opts.macvtap_daemon:
        units[MACVTAP_UNIT] = {"path": str(opts.unit_dir / MACVTAP_UNIT), "exec_start": macvtap_argv(opts)}
    text = fsops.inspect(opts.rooted(opts.qemu_conf))
    overridden = (
        qemu_conf.overridden_keys(opts.rooted(opts.qemu_conf).read_text()) if text.kind == "file" else []
    )
    return {
        "root": str(opts.root),
        "record": str(opts.record),
        "config": str(opts.config_path),
        "units": units,
        "sockets": {"edgevirt-cri": str(opts.socket), "containerd": str(opts.containerd_socket)}
        | ({"macvtap-daemon": str(opts.macvtap_socket)} if opts.macvtap_daemon else {}),
        "ops": {"edgevirt-cri": opts.ops_address}
        | ({"macvtap-daemon": opts.macvtap_ops_address} if opts.macvtap_daemon else {}),
        "kubelet": {
            "config_dir": str(opts.kubelet_config_dir),
            "containerRuntimeEndpoint": f"unix://{opts.socket}",
        },
        "libvirt": {
            "mode": "relaxed" if opts.libvirt_relaxed else "secure (qemu.conf untouched)",
            "qemu_conf": str(opts.qemu_conf),
            "overridden_keys": overridden if opts.libvirt_relaxed else [],
        },
    }


def next_steps(opts: NodeOptions, changes: list[Change]) -> list[str]:
    if opts.root != Path("/"):
        return []
    steps = ["systemctl daemon-reload"]
    if any(c.kind == "block" and c.action != "unchanged" for c in changes):
        steps.append("systemctl restart libvirtd   # qemu.conf changed")
    units = f"{MACVTAP_UNIT} {CRI_UNIT}" if opts.macvtap_daemon else CRI_UNIT
    steps.append(f"systemctl restart {units}")
    steps.append(f"run kubelet with --config-dir={opts.kubelet_config_dir}, then: systemctl restart kubelet")
    return steps


def install(opts: NodeOptions) -> Outcome:
    """Install (or update to) ``opts``; InstallError before anything is written when it cannot."""
    opts = with_binaries(opts)
    warnings = check(opts)
    wants = plan(opts)
    record_path = opts.rooted(opts.record)
    old_record = record.load(record_path)
    old = {e.key: e for e in old_record.entries} if old_record else {}
    if old_record is not None:
        parents = old_record.record_parents
    else:
        parents = [e.path for e in _parents(opts, opts.record, "--record", {})]
    new = entries(opts, wants, old, frozenset(parents))
    keys = {e.key for e in new}
    stale = [e for e in old_record.entries if e.key not in keys] if old_record else []
    options = summary(opts)
    if old_record and not stale and old_record.options == options and all(satisfied(opts, e) for e in new):
        changes = [Change("unchanged", e.kind, e.path, e.role) for e in new]
        return Outcome("install", False, changes, warnings, [], info(opts))
    changes = []
    for parent in parents:
        if fsops.inspect(opts.rooted(Path(parent))).kind == "none":
            fsops.make_dir(opts.rooted(Path(parent)), PARENT_MODE)
            changes.append(Change("created", "dir", parent, "the record's directory"))
    _backups(opts, new, old)
    record.save(record_path, Record(new + stale, parents, options))
    changes += [undo(opts, e, purge=False) for e in reversed(stale)]
    content = {str(w.path): w.content for w in wants}
    changes += [_make(opts, e, content.get(e.path, "")) for e in new]
    record.save(record_path, Record(new, parents, options))
    return Outcome("install", True, changes, warnings, next_steps(opts, changes), info(opts))
