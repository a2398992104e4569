"""libvirtd reachability: does it answer a read-only connection (libvirt-python is optional)."""

from __future__ import annotations

import time

from .result import Check


def check_libvirt(uri: str = "qemu:///system") -> Check:
    """libvirtd answers on ``uri`` (read-only connection)."""
    try:
        import libvirt  # optional: the probe must work without libvirt-python
    except ImportError as e:
        return Check(False, f"libvirt-python not importable: {e}")
    t0 = time.monotonic()
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as e:
        return Check(False, f"libvirtd not reachable at {uri}: {e}", time.monotonic() - t0)
    try:
        v = conn.getLibVersion()
        hv = conn.getVersion()
    finally:
        conn.close()
    ver = f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"
    qv = f"{hv // 1000000}.{hv // 1000 % 1000}.{hv % 1000}"
    return Check(True, f"libvirt {ver} answers at {uri} (QEMU {qv})", time.monotonic() - t0, {"uri": uri})
