"""Helpers of the VM tests (VM layer, VM pods, VirtualMachines): what a VM-layer test gets, console
waits, libvirt domains (by name prefix or by the VM's UID, their QEMU pid) and leak checks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt

from helpers.waiting import wait_for

URI = "qemu:///system"
#: the bootable test disk as an OCI containerDisk in the local cluster's registry (a real pull by kubelet)
VM_IMAGE = "127.0.0.1:5000/vm/test-disk:1"


@dataclass
class VMEnv:
    """What a VM-layer integration test gets: a manager, its state dir and a name prefix."""

    manager: object  # cri_shim.vm.DomainManager
    state_dir: Path
    prefix: str

    def name(self, suffix: str) -> str:
        return f"{self.prefix}{suffix}"


def wait_console(path: Path, needle: str, timeout: float = 90.0, after: int = 0) -> str:
    """Wait until the raw console log (from byte ``after``) contains ``needle``; return that text."""
    text = [""]

    def shows() -> str | None:
        if path.exists():
            text[0] = path.read_bytes()[after:].decode(errors="replace")
        return text[0] if needle in text[0] else None

    return wait_for(
        f"{needle!r} on the console",
        shows,
        timeout,
        0.25,
        explain=lambda: f"console tail:\n{text[0][-2000:]}",
    )


def console_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


@contextlib.contextmanager
def connection(uri: str = URI) -> Iterator[libvirt.virConnect]:
    conn = libvirt.open(uri)
    try:
        yield conn
    finally:
        conn.close()


def domain_names(prefix: str = "") -> list[str]:
    """Names of the domains (defined or running) whose name starts with ``prefix``, sorted."""
    with connection() as conn:
        return sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(prefix))


def remove_domains(prefix: str) -> None:
    """Destroy and undefine every domain whose name starts with ``prefix``."""
    with connection() as conn:
        for dom in conn.listAllDomains():
            if dom.name().startswith(prefix):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(0)


def vm_domains(uid: str) -> list[tuple[str, bool]]:
    """(name, active) of every libvirt domain that carries this VM's uid."""
    with connection() as conn:
        return [
            (d.name(), bool(d.isActive()))
            for d in conn.listAllDomains()
            if f">{uid}<" in d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        ]


def qemu_pid(domain: str) -> int | None:
    """The QEMU process of a running domain (libvirt's pid file), None if it has none."""
    try:
        return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def leftovers(env: VMEnv) -> dict[str, list[str]]:
    """Domains with our prefix and files under the manager's per-domain and disk dirs."""
    files = []
    for sub in ("domains", "disks"):
        root = env.state_dir / sub
        if root.exists():
            files += [str(p.relative_to(env.state_dir)) for p in root.rglob("*")]
    return {"domains": domain_names(env.prefix), "files": sorted(files)}
