"""Does a guest really run here: KVM judged by running guests, QEMU TCG by running a boot sector.

``/dev/kvm`` existing proves nothing (on PVM-based hosts the device exists, libvirt advertises
``<domain type='kvm'>``, and a Linux guest still hangs), so KVM is checked in three stages:

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
Every check is a :class:`~runtimeclass.result.Check` that says why.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .result import Check

PROBE_MARKER = "EDGEVIRT-KVM-PROBE-OK"
QEMU_BINARY = "qemu-system-x86_64"


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
