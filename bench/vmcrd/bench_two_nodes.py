"""Benchmark of VMs on two nodes against one: a burst of ``--burst`` VMs (the test disk, 256 MiB,
TCG) patched from Halted to Running at once, time until all are Running, with every VM pinned to
node 1 (the reference, measured in the same run) and with them split evenly over node 1 and node 2
(``deploy/local/up --nodes 2``). Rounds alternate which layout goes first. Then the second node's
own footprint: RSS and PSS of each of its processes (its containerd, libvirtd, virtlogd, macvtap
daemon, edgevirt-cri, kubelet, and its pods' processes: the DaemonSets' containers), idle, by
process name.

Both nodes share this machine's CPUs, so the split measures what a second kubelet, edgevirt-cri and
libvirtd in parallel change, not a second machine's capacity.

Usage: .venv/bin/python bench/vmcrd/bench_two_nodes.py [--burst 10] [--rounds 2] [--keep]
Needs `deploy/local/up` and `deploy/local/install-edgevirt`; brings node 2 up itself and removes it
at the end (unless ``--keep``). Prints a Markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench" / "vmcrd"))

from bench_lifecycle import Bench, installed_controllers_namespace  # noqa: E402
from benchkit import smaps_rollup_kib  # noqa: E402
from localcluster import secondnode  # noqa: E402
from localcluster.paths import NODE2_NAME, first_node_name  # noqa: E402

UP = REPO / "deploy" / "local" / "up"


def up(nodes: int) -> None:
    r = subprocess.run([str(UP), "--nodes", str(nodes)], capture_output=True, text=True, timeout=1500)
    if r.returncode != 0:
        raise SystemExit(f"deploy/local/up --nodes {nodes} failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")


def burst(b: Bench, tag: str, placement: list[str]) -> float:
    """Create len(placement) stopped VMs pinned as given, start them all at once: seconds until all
    are Running. The VMs are deleted again (untimed) before returning."""
    names = [f"{tag}{i:02d}" for i in range(len(placement))]
    for name, node in zip(names, placement, strict=True):
        b.create(name, nodeName=node)
    t0 = time.monotonic()
    for n in names:
        b.patch(n, {"running": True})
    t1 = b.wait(
        f"{tag}: all {len(names)} Running",
        lambda: all(b.status(n).get("printableStatus") == "Running" for n in names),
        900,
        0.2,
    )
    wrong = [n for n, node in zip(names, placement, strict=True) if b.status(n).get("nodeName") != node]
    if wrong:
        raise SystemExit(f"{tag}: VMs not on their pinned node: {wrong}")
    for n in names:
        b.custom.delete_namespaced_custom_object("edgevirt.io", "v1alpha1", b.ns, "virtualmachines", n)
    b.wait(f"{tag}: VMs gone", lambda: not any(b.pods(n) for n in names) and not _vms(b, names), 600, 0.5)
    return t1 - t0


def _vms(b: Bench, names: list[str]) -> list[str]:
    items = b.custom.list_namespaced_custom_object("edgevirt.io", "v1alpha1", b.ns, "virtualmachines")[
        "items"
    ]
    return [v["metadata"]["name"] for v in items if v["metadata"]["name"] in names]


def node2_pids() -> list[int]:
    """Node 2's processes: those in its mount namespace (its daemons) and those in its kubelet's
    cgroup root (its pods' containers, which have mount namespaces of their own)."""
    pids = set(secondnode._processes())
    marker = f":/{secondnode.CGROUP_NAME}/"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cgroup").read_text():
                    pids.add(int(proc.name))
            except OSError:
                continue
    return sorted(pids)


def node2_footprint() -> dict[str, tuple[int, int, int]]:
    """Process name -> (count, RSS KiB, PSS KiB) of node 2's processes (:func:`node2_pids`)."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for pid in node2_pids():
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            roll = smaps_rollup_kib(pid)
        except OSError:
            continue
        row = out[name]
        row[0] += 1
        row[1] += roll.get("Rss", 0)
        row[2] += roll.get("Pss", 0)
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="leave node 2 up at the end")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (deploy/local/up)")
    one, two = first_node_name(), NODE2_NAME
    single, split = [], []
    try:
        up(2)
        time.sleep(30)  # node 2's DaemonSet pods settle (their start is not the burst's)
        foot = node2_footprint()
        with installed_controllers_namespace("bench-2n") as b:
            burst(b, "warm", [one, two])  # both nodes' image caches warm (not counted)
            for r in range(args.rounds):
                layouts = [("one", [one] * args.burst), ("two", [one, two] * (args.burst // 2))]
                for tag, placement in layouts if r % 2 == 0 else reversed(layouts):
                    dt = burst(b, f"{tag}{r}-", placement)
                    (single if tag == "one" else split).append(dt)
    finally:
        if not args.keep:
            up(1)
    s50, t50 = statistics.median(single), statistics.median(split)
    head = f"burst of {args.burst} VMs Halted -> all Running ({args.rounds} rounds)"
    print(f"| {head} | median | runs | / one node |")
    print("|---|---|---|---|")
    print(f"| all on node 1 (reference) | {s50:.2f} s | {', '.join(f'{x:.2f}' for x in single)} | 1.00x |")
    runs = ", ".join(f"{x:.2f}" for x in split)
    print(f"| split over node 1 and node 2 | {t50:.2f} s | {runs} | {t50 / s50:.2f}x |")
    print()
    print("| node 2's processes, idle | count | RSS | PSS |")
    print("|---|---|---|---|")
    total = [0, 0, 0]
    for name, (n, rss, pss) in sorted(foot.items(), key=lambda kv: -kv[1][2]):
        print(f"| {name} | {n} | {rss / 1024:.1f} MiB | {pss / 1024:.1f} MiB |")
        total = [total[0] + n, total[1] + rss, total[2] + pss]
    print(f"| all | {total[0]} | {total[1] / 1024:.1f} MiB | {total[2] / 1024:.1f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
