"""Node capability probe: which runtimes really work on this node, and the node labels that say so.

KVM is judged by running guests, never by the existence of ``/dev/kvm`` (on PVM-based hosts the
device exists, libvirt advertises ``<domain type='kvm'>``, and a Linux guest still hangs):

1. raw ioctls (:mod:`runtimeclass._kvm_run`, in a child process with a timeout): create a VM and a
   vCPU and run ``add ax,bx; out 0x10,al; hlt`` in real mode. Cheap; catches missing permissions,
   missing modules and hosts where KVM_RUN itself never returns.
2. QEMU ``-accel kvm`` boots a real Linux kernel (the node's ``/boot/vmlinuz-*`` by default) with a
   tiny busybox initramfs whose ``/init`` prints a marker on the serial port and powers off. Only a
   marker seen before the timeout counts. This is the step that says "no" on PVM hosts, where the
   raw ioctls succeed but a Linux guest hangs after the real-mode setup code.
3. the same boot with ``-cpu host``, which is what KVM domains get (``host-passthrough``). (On PVM
   hosts this one aborts at once: "failed to set MSR 0x10a".)

QEMU TCG is checked with a 512-byte boot sector that writes to ``isa-debug-exit`` (exit code 99).
Kata counts as installed when ``containerd-shim-kata-v2`` and a Kata ``configuration.toml`` exist;
Kata needs hardware virtualisation, so its label also requires usable KVM.

The result is cached for the process and, optionally, in a JSON file keyed by the boot id, kernel
release and QEMU binary, so callers (CRI server, node controller, label job) pay for it once per
boot. ``python -m runtimeclass.probe`` prints the result as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LABEL_KVM = "edgevirt.io/kvm"
LABEL_ACCEL = "edgevirt.io/accel"
LABEL_KATA = "edgevirt.io/kata"
PROBE_MARKER = "EDGEVIRT-KVM-PROBE-OK"
DEFAULT_CACHE = Path("/run/edgevirt/probe.json")
QEMU_BINARY = "qemu-system-x86_64"
KATA_SHIM = "containerd-shim-kata-v2"
KATA_CONFIGS = (
    "/etc/kata-containers/configuration.toml",
    "/usr/share/defaults/kata-containers/configuration.toml",
    "/opt/kata/share/defaults/kata-containers/configuration.toml",
)
KATA_BIN_DIRS = ("/opt/kata/bin", "/usr/local/bin", "/usr/bin")
CACHE_VERSION = 1


@dataclasses.dataclass
class Check:
    """One capability: whether it works and, always, why we think so."""

    ok: bool
    reason: str
    seconds: float = 0.0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ProbeResult:
    """Everything the probe learned about the node."""

    kvm: Check
    tcg: Check
    kata: Check
    libvirt: Check
    key: dict[str, str]

    @property
    def accel(self) -> str:
        """``kvm`` when KVM really runs guests, else ``tcg``."""
        return "kvm" if self.kvm.ok else "tcg"

    @property
    def domain_type(self) -> str:
        """The libvirt ``<domain type=...>`` to use: ``kvm`` or ``qemu``."""
        return "kvm" if self.kvm.ok else "qemu"

    def labels(self) -> dict[str, str]:
        """Node labels (DESIGN.md names)."""
        return {
            LABEL_KVM: "true" if self.kvm.ok else "false",
            LABEL_ACCEL: self.accel,
            LABEL_KATA: "true" if self.kata.ok else "false",
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "accel": self.accel,
            "domain_type": self.domain_type,
            "labels": self.labels(),
            "kvm": dataclasses.asdict(self.kvm),
            "tcg": dataclasses.asdict(self.tcg),
            "kata": dataclasses.asdict(self.kata),
            "libvirt": dataclasses.asdict(self.libvirt),
            "key": self.key,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        return cls(
            kvm=Check(**d["kvm"]),
            tcg=Check(**d["tcg"]),
            kata=Check(**d["kata"]),
            libvirt=Check(**d["libvirt"]),
            key=d["key"],
        )


# ---------------------------------------------------------------- helpers


def _newc(files: list[tuple[str, int, bytes]]) -> bytes:
    """A minimal cpio "newc" archive: (name, mode, data) entries plus the trailer."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*files, ("TRAILER!!!", 0, b"")], start=1):
        nameb = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08X}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0)
        )
        out.write(hdr.encode() + nameb)
        out.write(b"\0" * (-(110 + len(nameb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    return out.getvalue()


def probe_initramfs(busybox: str = "/bin/busybox") -> bytes:
    """An initramfs whose /init prints :data:`PROBE_MARKER` on the console and powers off."""
    init = f"#!/bin/sh\necho {PROBE_MARKER}\n/bin/poweroff -f\n".encode()
    bb = Path(busybox).read_bytes()
    return _newc(
        [
            ("bin", 0o040755, b""),
            ("dev", 0o040755, b""),
            ("bin/busybox", 0o100755, bb),
            ("bin/sh", 0o120777, b"busybox"),
            ("bin/poweroff", 0o120777, b"busybox"),
            ("init", 0o100755, init),
        ]
    )


def boot_sector() -> bytes:
    """512 bytes: ``mov al,0x31; out 0xf4,al; hlt; jmp $`` -> isa-debug-exit exit code 99."""
    code = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
    return code + bytes(510 - len(code)) + b"\x55\xaa"


def find_kernel() -> str | None:
    """The newest ``/boot/vmlinuz-*`` that is readable, or None."""
    kernels = sorted(p for p in glob.glob("/boot/vmlinuz-*") if os.access(p, os.R_OK))
    return kernels[-1] if kernels else None


def _run(argv: list[str], timeout: float) -> tuple[int | None, str, float]:
    """Run argv; return (returncode or None on timeout, combined output, seconds)."""
    t0 = time.monotonic()
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    ) as p:
        try:
            out, _ = p.communicate(timeout=timeout)
            return p.returncode, out.decode(errors="replace"), time.monotonic() - t0
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            return None, out.decode(errors="replace"), time.monotonic() - t0


# ---------------------------------------------------------------- checks


def check_kvm_ioctl(dev: str = "/dev/kvm", timeout: float = 5.0) -> Check:
    """Stage 1: raw KVM ioctls run four guest instructions (child process, timeout)."""
    if not os.path.exists(dev):
        return Check(False, f"{dev} does not exist (no KVM module loaded, or not passed into this container)")
    if not os.access(dev, os.R_OK | os.W_OK):
        return Check(False, f"{dev} is not readable and writable by uid {os.getuid()}")
    script = Path(__file__).with_name("_kvm_run.py")
    rc, out, secs = _run([sys.executable, "-I", str(script), dev], timeout)
    if rc is None:
        return Check(False, f"raw KVM_RUN did not return within {timeout:.0f}s", secs)
    try:
        res = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return Check(False, f"raw KVM probe printed no result (exit {rc}): {out.strip()[-300:]}", secs)
    if not res.get("ok"):
        return Check(False, f"raw KVM probe failed: {res.get('error')}", secs, res)
    return Check(True, "raw KVM ioctls ran real-mode guest code (out 0x10=5, hlt)", secs, res)


def check_qemu_kernel_boot(
    accel: str,
    kernel: str | None,
    timeout: float,
    qemu: str = QEMU_BINARY,
    busybox: str = "/bin/busybox",
    cpu: str | None = None,
) -> Check:
    """Stage 2: QEMU with ``accel`` boots a Linux kernel to a busybox /init that prints a marker."""
    if kernel is None:
        return Check(False, "no guest kernel to boot (install linux-image-amd64 or pass --kernel)")
    if shutil.which(qemu) is None:
        return Check(False, f"{qemu} not found in PATH (install qemu-system-x86)")
    if not os.path.exists(busybox):
        return Check(False, f"{busybox} not found (install busybox-static)")
    with tempfile.TemporaryDirectory(prefix="edgevirt-probe-") as tmp:
        initrd = Path(tmp, "initrd.cpio")
        initrd.write_bytes(probe_initramfs(busybox))
        argv = [
            qemu, "-accel", accel, "-machine", "pc", *(["-cpu", cpu] if cpu else []),
            "-m", "128", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
            "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", kernel, "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=1",
        ]  # fmt: skip
        rc, out, secs = _run(argv, timeout)
    details = {"kernel": kernel, "exit": rc, "tail": out.strip()[-400:]}
    what = f"QEMU -accel {accel}" + (f" -cpu {cpu}" if cpu else "")
    if PROBE_MARKER in out:
        return Check(True, f"{what} booted {kernel} to userspace in {secs:.1f}s", secs, details)
    if rc is None:
        return Check(
            False,
            f"{what} booting {kernel} printed no guest marker within {timeout:.0f}s "
            "(the guest hangs: KVM is present but does not run normal guests)",
            secs,
            details,
        )
    err = out.strip().splitlines()[-1] if out.strip() else ""
    return Check(False, f"{what} exited {rc} without the guest marker: {err[-200:]}", secs, details)


def check_kvm(kernel: str | None, timeout: float) -> Check:
    """Both KVM stages; the first failure is the reason."""
    stage1 = check_kvm_ioctl()
    if not stage1.ok:
        return stage1
    stage2 = check_qemu_kernel_boot("kvm", kernel, timeout)
    stage2.details["ioctl"] = stage1.reason
    stage2.seconds += stage1.seconds
    if not stage2.ok:
        return stage2
    # KVM domains use <cpu mode='host-passthrough'>: that must boot too
    stage3 = check_qemu_kernel_boot("kvm", kernel, timeout, cpu="host")
    stage3.details["ioctl"] = stage1.reason
    stage3.details["default_cpu"] = stage2.reason
    stage3.seconds += stage2.seconds
    return stage3


def check_tcg(timeout: float = 20.0, qemu: str = QEMU_BINARY) -> Check:
    """QEMU TCG runs a boot sector through SeaBIOS to isa-debug-exit (exit code 99)."""
    if shutil.which(qemu) is None:
        return Check(False, f"{qemu} not found in PATH (install qemu-system-x86)")
    with tempfile.TemporaryDirectory(prefix="edgevirt-probe-") as tmp:
        img = Path(tmp, "boot.img")
        img.write_bytes(boot_sector())
        argv = [
            qemu, "-accel", "tcg", "-machine", "pc", "-m", "32", "-nodefaults", "-no-user-config",
            "-nographic", "-display", "none", "-serial", "none", "-monitor", "none", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive", f"file={img},format=raw,if=ide,snapshot=on",
        ]  # fmt: skip
        rc, out, secs = _run(argv, timeout)
    if rc == 99:
        return Check(True, f"QEMU TCG ran a boot sector to isa-debug-exit in {secs:.2f}s", secs)
    if rc is None:
        return Check(False, f"QEMU TCG boot sector did not exit within {timeout:.0f}s", secs)
    return Check(False, f"QEMU TCG boot sector exited {rc}, expected 99: {out.strip()[-300:]}", secs)


def check_kata(kvm_ok: bool) -> Check:
    """Kata shim and configuration present (and KVM usable, which Kata needs)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *KATA_BIN_DIRS])
    shim = shutil.which(KATA_SHIM, path=path)
    conf = next((c for c in KATA_CONFIGS if os.path.exists(c)), None)
    details = {"shim": shim, "configuration": conf}
    if shim is None:
        return Check(False, f"{KATA_SHIM} not found in PATH or {', '.join(KATA_BIN_DIRS)}", details=details)
    if conf is None:
        return Check(False, f"no Kata configuration.toml in {', '.join(KATA_CONFIGS)}", details=details)
    if not kvm_ok:
        return Check(False, "Kata is installed but KVM does not run guests on this node", details=details)
    return Check(True, f"{shim} with {conf}, KVM usable", details=details)


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


# ---------------------------------------------------------------- cache + entry points


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
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            cached = json.loads(cache_file.read_text())
            if cached.get("key") == key:
                res = ProbeResult.from_dict(cached)
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
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(res.to_dict(), indent=2))
        tmp.replace(cache_file)
    return res


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
