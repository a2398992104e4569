"""Long-run check of issue 12: do edgevirt's node processes hold on to memory as VMs come and go?

``--vms`` VirtualMachines (the bootable test disk, 256 MiB, ``terminationGracePeriodSeconds: 1`` so a
stop does not wait 30 s for a guest still booting to hear ACPI) are started together and stopped
together ``--cycles`` times through the whole installed chain: ``kubectl patch`` -> the cluster-mode
controller -> kubelet -> edgevirt-cri's kvm handler -> the macvtap CNI -> libvirt, with the node-mode
controller and the labeller running beside them. A cycle: all patched ``running: true``, wait until
every one is Running; all patched ``running: false``, wait until every one is Stopped and its pod
is gone.

Memory of every edgevirt process on the node (``bench_memory.survey``: VmRSS and PSS per component,
QEMUs excluded) is read after the first cycle (the baseline: what a process loads on its first VM is
loaded by then), every ``--every`` cycles, and after the last; the verdict is the last against the
baseline, per component and in total, against the goal: within 5 %; and, because the first cycles
also fill what is bounded but filled only under load (edgevirt-cri's gRPC pool grows to its 32
threads, each with its stack and a glibc arena), the second half's drift too (the survey nearest
the middle against the last): a leak keeps growing there, a pool filling does not. Threads are
shown per component. The same survey with all VMs running (taken in the last cycle) is the "with
10 VM pods" figure of the node-memory goal.

Usage: .venv/bin/python bench/node/bench_longrun.py [--vms 10] [--cycles 100] [--every 10] [--settle S]
Needs `deploy/local/up` and `deploy/local/install-edgevirt`. Prints Markdown for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "vmcrd"))
sys.path.insert(0, str(REPO / "bench" / "node"))

from bench_lifecycle import Bench, installed_controllers_namespace  # noqa: E402
from bench_memory import COMPONENTS, Usage, survey  # noqa: E402

GOAL_DRIFT = 0.05
NODE = [name for name, on_node, _ in COMPONENTS if on_node]


def snapshot() -> dict[str, Usage]:
    comps, _anchors, _qemus = survey()
    return {name: comps[name] for name in NODE}


def cycle(
    b: Bench, names: list[str], timeout: float, settle: float = 0.0
) -> tuple[float, float, dict[str, Usage]]:
    """(seconds to all Running, seconds to all Stopped with no pod, the survey while all ran, taken
    ``settle`` seconds after all were Running)."""
    t0 = time.monotonic()
    for n in names:
        b.patch(n, {"running": True})
    up = b.wait(
        "all Running",
        lambda: all(b.status(n).get("printableStatus") == "Running" for n in names),
        timeout,
        0.2,
    )
    time.sleep(settle)
    running = snapshot()
    t1 = time.monotonic()
    for n in names:
        b.patch(n, {"running": False})
    down = b.wait(
        "all Stopped, no pod",
        lambda: all(b.status(n).get("printableStatus") == "Stopped" and not b.pods(n) for n in names),
        timeout,
        0.2,
    )
    return up - t0, down - t1, running


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=10)
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--every", type=int, default=10, help="a survey every this many cycles")
    ap.add_argument("--timeout", type=float, default=600, help="seconds a start or stop of all may take")
    ap.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="in the last cycle, seconds with all VMs running before their survey (the macvtap daemon's "
        "workers, started for the VMs' CNI calls, exit after 60 s without one: 75 shows the node at rest)",
    )
    args = ap.parse_args()
    rows: list[tuple[int, dict[str, Usage]]] = []
    ups, downs = [], []
    with installed_controllers_namespace("bench-longrun") as b:
        names = [f"lr{i:02d}" for i in range(args.vms)]
        for n in names:
            b.create(n, terminationGracePeriodSeconds=1)
        for i in range(1, args.cycles + 1):
            up, down, running = cycle(b, names, args.timeout, args.settle if i == args.cycles else 0.0)
            ups.append(up)
            downs.append(down)
            if i == 1 or i % args.every == 0 or i == args.cycles:
                rows.append((i, snapshot()))
                total = sum(u.pss for u in rows[-1][1].values())
                print(f"cycle {i}: up {up:.1f} s, down {down:.1f} s, node PSS {mib(total)} MiB", flush=True)
    base = rows[0][1]
    print(f"\n{args.vms} VMs started and stopped {args.cycles} times; RSS / PSS MiB after the cycle\n")
    print("| after cycle | " + " | ".join(f"{n} (threads)" for n in NODE) + " | total |")
    print("|---|" + "---|" * (len(NODE) + 1))
    for i, snap in rows:
        cells = [f"{mib(snap[n].rss)} / {mib(snap[n].pss)} ({snap[n].threads})" for n in NODE]
        total = f"{mib(sum(u.rss for u in snap.values()))} / {mib(sum(u.pss for u in snap.values()))}"
        print(f"| {i} | " + " | ".join(cells) + f" | {total} |")
    last = rows[-1][1]
    middle_cycle, middle = min(rows, key=lambda r: abs(r[0] - args.cycles / 2))
    for label, since in ((f"the first ({rows[0][0]})", base), (f"cycle {middle_cycle}", middle)):
        drifts = {n: (last[n].rss - since[n].rss) / since[n].rss for n in NODE if since[n].rss}
        tb, tl = sum(u.rss for u in since.values()), sum(u.rss for u in last.values())
        drifts["total"] = (tl - tb) / tb
        verdict = "met" if all(abs(d) <= GOAL_DRIFT for d in drifts.values()) else "NOT met"
        print(
            f"\nRSS drift, last cycle against {label}: "
            + ", ".join(f"{n} {d:+.1%}" for n, d in drifts.items())
            + f" (goal: within {GOAL_DRIFT:.0%}: {verdict})"
        )
    print(
        f"with all {args.vms} VMs running (last cycle, {args.settle:g} s after all were Running): "
        + ", ".join(f"{n} {mib(running[n].rss)} / {mib(running[n].pss)}" for n in NODE)
        + f"; total RSS {mib(sum(u.rss for u in running.values()))},"
        + f" PSS {mib(sum(u.pss for u in running.values()))} MiB"
    )
    ups.sort()
    downs.sort()
    print(
        f"cycle times: all Running p50 {ups[len(ups) // 2]:.1f} s (max {ups[-1]:.1f}), "
        f"all Stopped p50 {downs[len(downs) // 2]:.1f} s (max {downs[-1]:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
