"""Node capability probe: which runtimes really work on this node, and the node labels that say so.

Runs the checks, :mod:`runtimeclass.guests` (KVM judged by booting guests, QEMU TCG),
:mod:`runtimeclass.kata` and :mod:`runtimeclass.libvirtd`, into a :class:`ProbeResult` whose
``labels()`` are the node labels. The result is cached for the process and, optionally, in a JSON file
keyed by the boot id, kernel release and QEMU binary, so callers (CRI server, node controller, label
job) pay for it once per boot; libvirtd's reachability is re-checked on every cached read (cheap).
``python -m runtimeclass.probe`` prints the result as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path

from .guests import QEMU_BINARY, check_kvm, check_qemu_kernel_boot, check_tcg, find_kernel
from .kata import check_kata
from .libvirtd import check_libvirt
from .result import LABEL_ACCEL, LABEL_KATA, LABEL_KVM, Check, ProbeResult

# the probe's public names, also those of the checks callers use through this module
__all__ = [
    "DEFAULT_CACHE",
    "LABEL_ACCEL",
    "LABEL_KATA",
    "LABEL_KVM",
    "Check",
    "ProbeResult",
    "cache_key",
    "check_kata",
    "check_kvm",
    "check_libvirt",
    "check_qemu_kernel_boot",
    "check_tcg",
    "find_kernel",
    "main",
    "probe",
    "read_cache",
    "write_cache",
]

DEFAULT_CACHE = Path("/run/edgevirt/probe.json")
CACHE_VERSION = 1


def cache_key(kernel: str | None, qemu: str = QEMU_BINARY) -> dict[str, str]:
    """What a cached result depends on: this boot, this kernel, this QEMU binary, the guest kernel."""
    boot_id = ""
    with contextlib.suppress(OSError):
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    qpath = shutil.which(qemu) or ""
    qstat = ""
    with contextlib.suppress(OSError):
        st = os.stat(qpath)
        qstat = f"{st.st_size}:{int(st.st_mtime)}"
    return {
        "version": str(CACHE_VERSION),
        "boot_id": boot_id,
        "kernel_release": platform.release(),
        "qemu": f"{qpath}:{qstat}",
        "guest_kernel": kernel or "",
    }


_PROCESS_CACHE: dict[str, ProbeResult] = {}


def probe(
    *,
    kernel: str | None = None,
    kvm_timeout: float = 15.0,
    cache_file: Path | None = None,
    refresh: bool = False,
    libvirt_uri: str = "qemu:///system",
) -> ProbeResult:
    """Probe the node (once per process; once per boot if ``cache_file`` is given)."""
    kernel = kernel or find_kernel()
    key = cache_key(kernel)
    mem_key = json.dumps(key, sort_keys=True)
    if not refresh and mem_key in _PROCESS_CACHE:
        return _PROCESS_CACHE[mem_key]
    if cache_file is not None and not refresh:
        res = read_cache(cache_file, key)
        if res is not None:
            # libvirt reachability can change at any time: always re-check it (cheap).
            res.libvirt = check_libvirt(libvirt_uri)
            _PROCESS_CACHE[mem_key] = res
            return res
    kvm = check_kvm(kernel, kvm_timeout)
    res = ProbeResult(
        kvm=kvm, tcg=check_tcg(), kata=check_kata(kvm.ok), libvirt=check_libvirt(libvirt_uri), key=key
    )
    _PROCESS_CACHE[mem_key] = res
    if cache_file is not None:
        write_cache(cache_file, res)
    return res


def read_cache(cache_file: Path, key: dict[str, str]) -> ProbeResult | None:
    """The result cached in ``cache_file`` if it was made under ``key`` (None if absent, unreadable
    or made for another boot, kernel or QEMU)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        cached = json.loads(cache_file.read_text())
        if cached.get("key") == key:
            return ProbeResult.from_dict(cached)
    return None


def write_cache(cache_file: Path, res: ProbeResult) -> None:
    """Write the result next to ``cache_file`` and rename it into place (readers never see half)."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(res.to_dict(), indent=2))
    tmp.replace(cache_file)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtimeclass.probe", description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", help="guest kernel for the KVM boot test (default: newest /boot/vmlinuz-*)")
    ap.add_argument("--timeout", type=float, default=15.0, help="seconds the KVM guest gets to boot")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache file (keyed by boot id)")
    ap.add_argument("--no-cache", action="store_true", help="neither read nor write the cache file")
    ap.add_argument("--refresh", action="store_true", help="ignore a cached result")
    ap.add_argument("--labels", action="store_true", help="print only the node labels")
    args = ap.parse_args(argv)
    res = probe(
        kernel=args.kernel,
        kvm_timeout=args.timeout,
        cache_file=None if args.no_cache else args.cache,
        refresh=args.refresh,
    )
    print(json.dumps(res.labels() if args.labels else res.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
