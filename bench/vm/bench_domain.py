#!/usr/bin/env python3
"""DomainManager.create (image resolve + overlay + define + start) and remove vs plain `virsh`.

Reference, same run, alternating: `virsh define` + `virsh start` of the same domain XML the manager
produced (overlay made beforehand with qemu-img, which the manager's figure includes), then `virsh
destroy` + `virsh undefine`. The guest is the bootable test disk (deploy/images/build_vm_disk.py),
domains are TCG; times are until libvirt reports the domain running (not guest boot).

    .venv/bin/python bench/vm/bench_domain.py --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deploy/images"))
sys.path.insert(0, str(REPO / "tests"))

import build_vm_disk  # noqa: E402
from helpers import libvirt_daemon  # noqa: E402

from cri_shim.vm import DomainManager, ImageStore, VMSpec  # noqa: E402


def virsh(*args: str) -> None:
    subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", *args], check=True, capture_output=True, timeout=120
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    libvirt_daemon.ensure_libvirtd()
    disk = build_vm_disk.build_vm_disk()
    with tempfile.TemporaryDirectory(prefix="ev-bench-") as tmp:
        state = Path(tmp)
        mgr = DomainManager(
            state,
            domain_type="qemu",
            images=ImageStore(state, file_roots=[disk.qcow2.parent]),
            wrapper_dir=REPO / ".local/state/vm-tests/bin",
        )
        ours_create, ours_remove, ref_create, ref_remove = [], [], [], []
        image = f"file://{disk.qcow2}"
        spec = VMSpec(name="evbench-ours", uid="bench", image=image, console_log=state / "c.log")
        # warm-up: image import into the cache, libvirt capability probe
        mgr.create(spec)
        xml = mgr.xml("evbench-ours", inactive=True).replace("evbench-ours", "evbench-ref")
        uuid = mgr.facts("evbench-ours")["uuid"]
        mgr.remove("evbench-ours", delete_disks=True)
        xml = xml.replace(uuid, "11111111-2222-3333-4444-555555555555")
        ref_overlay = state / "ref.qcow2"
        xml = xml.replace(str(state / "disks/vm/bench/root.qcow2"), str(ref_overlay))
        (state / "ref.xml").write_text(xml)
        base = mgr.images.resolve(f"file://{disk.qcow2}").path
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            mgr.create(spec)
            ours_create.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mgr.remove("evbench-ours", delete_disks=True)
            ours_remove.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(ref_overlay)],
                check=True,
                timeout=120,
            )
            virsh("define", str(state / "ref.xml"))
            virsh("start", "evbench-ref")
            ref_create.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            virsh("destroy", "evbench-ref")
            virsh("undefine", "evbench-ref")
            ref_overlay.unlink()
            ref_remove.append(time.perf_counter() - t0)
        mgr.close()

    def row(label: str, ours: list[float], ref: list[float]) -> str:
        a, b = statistics.median(ours), statistics.median(ref)
        return f"| {label} | {a * 1000:.0f} ms | {b * 1000:.0f} ms | {a / b:.2f}x |"

    print(f"| measure (median of {args.rounds}) | DomainManager | virsh reference | ratio |")
    print("|---|---|---|---|")
    print(row("create: overlay + define + start, until running", ours_create, ref_create))
    print(row("remove: destroy + undefine + delete files", ours_remove, ref_remove))
    print("ours create:", " ".join(f"{x * 1000:.0f}" for x in ours_create), "ms")
    print("ref create: ", " ".join(f"{x * 1000:.0f}" for x in ref_create), "ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
