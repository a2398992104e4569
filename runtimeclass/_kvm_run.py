"""Run four real-mode guest instructions through raw KVM ioctls and report what happened.

Executed as a separate process by :mod:`runtimeclass.probe` (``python -I _kvm_run.py``) so that a
KVM_RUN that never returns (what a PVM host does with a normal guest) can be killed by a timeout.
Prints one JSON object on stdout. Standalone on purpose: no imports from this package.

The guest code, loaded at 0x1000 with CS=0, RIP=0x1000, AX=2, BX=3::

    01 d8      add ax, bx
    e6 10      out 0x10, al     -> KVM_EXIT_IO, port 0x10, value 5
    f4         hlt              -> KVM_EXIT_HLT
"""

import ctypes
import fcntl
import json
import mmap
import os
import struct
import sys
from typing import Any

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
CODE = bytes([0x01, 0xD8, 0xE6, 0x10, 0xF4])
GUEST_ADDR = 0x1000


def main() -> int:
    step = "open /dev/kvm"
    out: dict[str, Any] = {"ok": False}
    try:
        kvm = os.open(sys.argv[1] if len(sys.argv) > 1 else "/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        step = "KVM_GET_API_VERSION"
        out["api_version"] = fcntl.ioctl(kvm, KVM_GET_API_VERSION, 0)
        step = "KVM_CREATE_VM"
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        step = "guest memory"
        mem = mmap.mmap(-1, 0x4000, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
        mem[GUEST_ADDR : GUEST_ADDR + len(CODE)] = CODE
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        step = "KVM_SET_USER_MEMORY_REGION"
        fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("IIQQQ", 0, 0, 0, 0x4000, addr))
        step = "KVM_CREATE_VCPU"
        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
        run = mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        step = "KVM_GET_SREGS/KVM_SET_SREGS"
        sregs = bytearray(fcntl.ioctl(vcpu, KVM_GET_SREGS, bytes(312)))
        struct.pack_into("Q", sregs, 0, 0)  # cs.base
        struct.pack_into("H", sregs, 12, 0)  # cs.selector
        fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
        step = "KVM_SET_REGS"
        regs = [0] * 18
        regs[0], regs[1], regs[16], regs[17] = 2, 3, GUEST_ADDR, 0x2
        fcntl.ioctl(vcpu, KVM_SET_REGS, struct.pack("18Q", *regs))
        exits = []
        for _ in range(4):
            step = "KVM_RUN"
            fcntl.ioctl(vcpu, KVM_RUN, 0)
            reason = struct.unpack_from("I", run, 8)[0]
            if reason == KVM_EXIT_IO:
                _direction, _size, port, _count, off = struct.unpack_from("BBHIQ", run, 32)
                exits.append({"exit": "io", "port": port, "value": run[off]})
            elif reason == KVM_EXIT_HLT:
                exits.append({"exit": "hlt"})
                break
            else:
                exits.append({"exit": reason})
                break
        out["exits"] = exits
        out["ok"] = exits == [{"exit": "io", "port": 0x10, "value": 5}, {"exit": "hlt"}]
        if not out["ok"]:
            out["error"] = f"guest did not produce out(0x10)=5 then hlt: {exits}"
    except OSError as e:
        out["error"] = f"{step}: {e}"
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
