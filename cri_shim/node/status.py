"""``status``: the node compared with the install record, and whether the services answer.

Every recorded entry is ``ok`` (as installed), ``missing`` or ``modified``; for a directory that
we kept data in, only that it is still a directory counts. Then the sockets the record names are
probed, and - on the node itself, not under ``--root`` - the services' ``/readyz``.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from . import fsops, record
from .apply import satisfied
from .options import NodeOptions
from .outcome import Change, Outcome
from .undo import serving

PROBE_TIMEOUT_S = 2.0


def readyz(address: str) -> str:
    """``ready``, or why not, for the ops endpoint at ``address`` (HOST:PORT)."""
    host, _, port = address.rpartition(":")
    url = f"http://{host}:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as r:  # http, to a loopback ops address
            return "ready" if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"not ready: {e.read().decode(errors='replace').strip()}"
    except OSError as e:
        return f"no answer ({e})"


def status(opts: NodeOptions) -> Outcome:
    rec = record.load(opts.rooted(opts.record))
    if rec is None:
        return Outcome("status", False, warnings=[f"not installed: no record at {opts.record}"], ok=False)
    changes = []
    for entry in rec.entries:
        found = fsops.inspect(opts.rooted(Path(entry.path)))
        if satisfied(opts, entry) or (entry.kind == "dir" and found.kind == "dir"):
            action = "ok"
        else:
            action = "missing" if found.kind == "none" else "modified"
        changes.append(Change(action, entry.kind, entry.path, entry.role))
    info: dict[str, str] = {}
    for name, key, ops in (
        ("edgevirt-cri", "socket", "ops_address"),
        ("macvtap-daemon", "macvtap_socket", "macvtap_ops_address"),
    ):
        sock = str(rec.options.get(key) or "")
        if not sock or (name == "macvtap-daemon" and not rec.options.get("macvtap_daemon")):
            continue
        info[f"{name} socket"] = "serving" if serving(str(opts.rooted(Path(sock)))) else "not serving"
        address = str(rec.options.get(ops) or "")
        if address and opts.root == Path("/"):
            info[f"{name} readyz"] = readyz(address)
    ok = all(c.action == "ok" for c in changes)
    return Outcome("status", False, changes, [f"{k}: {v}" for k, v in info.items()], info=dict(info), ok=ok)
