"""Helpers for the VM layer's integration tests (test_vm_*.py): console waits and leak checks."""

from __future__ import annotations

import time
from pathlib import Path

import libvirt


def wait_console(path: Path, needle: str, timeout: float = 90.0, after: int = 0) -> str:
    """Wait until the raw console log (from byte ``after``) contains ``needle``; return that text."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_bytes()[after:].decode(errors="replace")
            if needle in text:
                return text
        time.sleep(0.25)
    raise AssertionError(
        f"{needle!r} not on the console within {timeout:.0f}s; console tail:\n{text[-2000:]}"
    )


def console_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def leftovers(env) -> dict[str, list[str]]:
    """Domains with our prefix and files under the manager's per-domain and disk dirs."""
    conn = libvirt.open("qemu:///system")
    try:
        doms = [d.name() for d in conn.listAllDomains() if d.name().startswith(env.prefix)]
    finally:
        conn.close()
    files = []
    for sub in ("domains", "disks"):
        root = env.state_dir / sub
        if root.exists():
            files += [str(p.relative_to(env.state_dir)) for p in root.rglob("*")]
    return {"domains": doms, "files": sorted(files)}
