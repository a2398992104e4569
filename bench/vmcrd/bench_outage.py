"""Benchmark of edge autonomy: how fast VirtualMachine status catches up after an API server outage.

One VM (the bootable test disk, 256 MiB, TCG) runs with both controller modes. Per round:

* kill -9 kube-apiserver, keep it away ``--outage`` seconds (default 60, as issue 5 says), and check
  every second that the VM's QEMU process is the same one (the VM is untouched);
* start it again (``deploy/local/up kube-apiserver``) and wait for ``/readyz``;
* patch ``spec.paused`` (true, then false on the next round) and time until
  ``status.printableStatus`` says Paused (Running).

The reference, measured in the same run on the same VM: the same pause/unpause patch in steady state
(no outage before it). The ratio says what the outage costs; the issue's goal is a catch-up within
10 s of the API server's return.

Usage: .venv/bin/python bench/vmcrd/bench_outage.py [--rounds 3] [--outage 60] [--steady 5]
Needs `deploy/local/up`. Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy" / "local"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lifecycle import KUBECTL, controllers_on_a_namespace  # noqa: E402
from helpers import vm_env  # noqa: E402
from localcluster.components import BY_NAME  # noqa: E402
from localcluster.paths import Paths  # noqa: E402

UP_APISERVER = [str(REPO / "deploy/local/up"), "kube-apiserver"]


def qemu_pid(uid: str) -> int | None:
    """The pid of the one active QEMU process of the VM with this UID (libvirt's pid file)."""
    names = [name for name, active in vm_env.vm_domains(uid) if active]
    return vm_env.qemu_pid(names[0]) if len(names) == 1 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--outage", type=float, default=60.0)
    ap.add_argument("--steady", type=int, default=5, help="steady-state pause/unpause samples")
    args = ap.parse_args()
    readyz = [*KUBECTL, "get", "--raw", "/readyz"]
    apiserver = BY_NAME["kube-apiserver"].process(Paths.default())
    paused = False
    steady: list[float] = []
    catch_up: list[float] = []
    api_back: list[float] = []

    def toggle() -> float:
        nonlocal paused
        paused = not paused
        want = "Paused" if paused else "Running"
        t0 = time.monotonic()
        b.patch("edge", {"paused": paused})
        return b.wait(want, lambda: b.status("edge").get("printableStatus") == want, 120, 0.05) - t0

    with controllers_on_a_namespace("bench-outage") as b:
        b.create("edge")
        uid = b.vm("edge")["metadata"]["uid"]
        b.patch("edge", {"running": True})
        b.wait("Ready", lambda: b.ready("edge"), 300, 0.2)
        b.wait("the guest up", lambda: "EDGEVIRT-GUEST: up" in b.console("edge"), 300, 0.5)
        qemu = qemu_pid(uid)
        if qemu is None:
            raise SystemExit(f"no single QEMU process found for VM uid {uid}")
        for _ in range(args.steady):
            steady.append(toggle())
        try:
            for r in range(args.rounds):
                pid = apiserver.pid()
                if not pid:
                    raise SystemExit("kube-apiserver is not running (deploy/local/up)")
                os.kill(pid, 9)
                t_end = time.monotonic() + args.outage
                while time.monotonic() < t_end:
                    if qemu_pid(uid) != qemu:
                        raise SystemExit(f"round {r}: the VM's QEMU process changed during the outage")
                    time.sleep(1)
                t_start = time.monotonic()
                res = subprocess.run(UP_APISERVER, capture_output=True, text=True, timeout=600)
                if res.returncode:
                    raise SystemExit(f"restarting kube-apiserver failed: {res.stdout}{res.stderr}")
                b.wait(
                    "/readyz",
                    lambda: subprocess.run(readyz, capture_output=True, timeout=30).returncode == 0,
                    120,
                    0.1,
                )
                api_back.append(time.monotonic() - t_start)
                catch_up.append(toggle())
                if qemu_pid(uid) != qemu:
                    raise SystemExit(f"round {r}: the VM's QEMU process changed after the outage")
                print(f"round {r + 1}: API server ready after {api_back[-1]:.1f} s, status caught up in "
                      f"{catch_up[-1]:.2f} s", file=sys.stderr)  # fmt: skip
        finally:  # whatever happened, the API server runs again before the cleanup needs it
            subprocess.run(UP_APISERVER, capture_output=True, timeout=600)
    ref, mid = statistics.median(steady), statistics.median(catch_up)
    rows = [
        (f"patch paused -> status, once the API server is ready again ({args.rounds} outages of "
         f"{args.outage:.0f} s)", mid, max(catch_up), f"{mid / ref:.2f}x"),
        (f"reference: the same patch in steady state ({args.steady} samples)", ref, max(steady), "1.00x"),
        ("(kube-apiserver start -> /readyz)", statistics.median(api_back), max(api_back), ""),
    ]  # fmt: skip
    print("| measure | p50 | max | ratio p50 to steady state |")
    print("|---|---|---|---|")
    for label, p50, top, ratio in rows:
        print(f"| {label} | {p50:.2f} s | {top:.2f} s | {ratio} |")
    print("| the VM's QEMU process unchanged through every outage | yes | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
