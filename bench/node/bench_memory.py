"""Memory of edgevirt's own processes on this node, against issue 12's goal (≤ 100 MiB idle, ≤ 120 MiB
with 10 VM pods), with kubelet, libvirtd and virtlogd beside them as anchors.

Read-only: the processes are found in /proc by their command lines, whether they run as host units
(the node installer's, or the local cluster's) or in pods (the node DaemonSet's containers are
processes of this host too):

- ``edgevirt-cri``: the CRI server kubelet talks to;
- ``macvtap daemon``: the CNI daemon (a supervisor and its workers, summed);
- ``edgevirt-controller --mode node``: the node-mode controller;
- ``/bin/busybox sh /usr/local/lib/edgevirt/label-loop``, its sleep between passes and its pass
  ``edgevirt-node label --once``: the labeller.

Per component: processes, threads, VmRSS and PSS (``/proc/PID/smaps_rollup``: a page shared by N
processes counts 1/N in each, so PSS sums to what the node really spends), and the largest private
parts (``[heap]``, anonymous) and glibc's thread arenas (how many, and how much is resident in
them: what ``MALLOC_ARENA_MAX`` would bound). Cluster-mode controller replicas found here are
listed too, outside the node total (they run wherever the scheduler puts them). The number of
running QEMU processes says under which load the figures were taken.

Usage: .venv/bin/python bench/node/bench_memory.py [--write] [--label TEXT]
Prints a Markdown table; ``--write`` also puts it, dated, under "## Node memory (edgevirt's own
processes)" in bench/RESULTS.md (replacing that section's previous table of the same --label).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from benchkit import smaps_rollup_kib, status_kib  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Node memory (edgevirt's own processes)"
GOAL_IDLE_MIB, GOAL_10_VMS_MIB = 100, 120


def script_args(argv: list[str]) -> list[str]:
    """The command line from the program on: a Python interpreter's own path (and its options) dropped,
    so ``python3 /usr/local/bin/edgevirt-cri --x`` reads as ``edgevirt-cri --x``."""
    if argv and Path(argv[0]).name.startswith("python"):
        argv = argv[1:]
        while argv and argv[0].startswith("-"):
            argv = argv[1:]
    return [Path(argv[0]).name, *argv[1:]] if argv else []


def mode_is(argv: list[str], mode: str) -> bool:
    return f"--mode={mode}" in argv or any(a == "--mode" and b == mode for a, b in itertools.pairwise(argv))


#: (component, does this command line belong to it?); ``node`` says whether it counts in the node total
COMPONENTS: list[tuple[str, bool, Callable[[list[str]], bool]]] = [
    ("edgevirt-cri", True, lambda a: a[0] == "edgevirt-cri"),
    ("macvtap daemon", True, lambda a: a[0] == "macvtap" and "daemon" in a[1:2]),
    ("node-mode controller", True, lambda a: a[0] == "edgevirt-controller" and mode_is(a, "node")),
    # the labeller: its busybox sh loop (/usr/local/lib/edgevirt/label-loop), a pass under way and
    # the pass's busybox timeout watcher; the loop's sleep between passes (``busybox sleep 600``, a
    # command line like any other's) is found as the loop's child (OWN_CHILDREN)
    (
        "labeller",
        True,
        lambda a: (
            (a[0] == "edgevirt-node" and "label" in a[1:2])
            or any(x.endswith("/label-loop") for x in a[:3])
            or (a[:2] == ["busybox", "timeout"] and "edgevirt-node" in a[2:4])
        ),
    ),
    ("cluster-mode controller", False, lambda a: a[0] == "edgevirt-controller" and mode_is(a, "cluster")),
]
#: components whose processes' children not matched by their command lines are theirs too
OWN_CHILDREN = ("labeller",)
ANCHORS = ("kubelet", "libvirtd", "virtlogd")
QEMU_PREFIX = "qemu-system-"


@dataclass
class Usage:
    pids: list[int] = field(default_factory=list)
    threads: int = 0
    rss: int = 0  # KiB
    pss: int = 0
    heap: int = 0  # [heap] Rss, KiB (the main malloc arena)
    anon: int = 0  # Anonymous, KiB (heap, thread arenas, Python's own arenas, stacks)
    arenas: int = 0  # glibc's thread arenas (what MALLOC_ARENA_MAX bounds)
    arena_rss: int = 0  # KiB resident in them

    def add(self, pid: int) -> None:
        rollup = smaps_rollup_kib(pid)
        self.pids.append(pid)
        self.threads += status_kib(pid, "Threads")
        self.rss += status_kib(pid, "VmRSS")
        self.pss += rollup.get("Pss", 0)
        self.anon += rollup.get("Anonymous", 0)
        maps = mappings(pid)
        self.heap += sum(rss for _, _, _, name, rss in maps if name == "[heap]")
        arenas = thread_arenas(maps)
        self.arenas += len(arenas)
        self.arena_rss += sum(arenas)


#: a glibc thread arena: an anonymous mapping reserved 64 MiB-aligned, 64 MiB long (rw-p as far as
#: it is used, ---p for the rest)
ARENA_BYTES = 64 << 20


def mappings(pid: int) -> list[tuple[int, int, str, str, int]]:
    """(start, end, perms, name, Rss KiB) of every mapping of /proc/<pid>/smaps."""
    out: list[tuple[int, int, str, str, int]] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, fields[1], fields[5] if len(fields) > 5 else "", 0))
        elif fields[0] == "Rss:" and out:
            out[-1] = (*out[-1][:4], int(fields[1]))
    return out


def thread_arenas(maps: list[tuple[int, int, str, str, int]]) -> list[int]:
    """Resident KiB of each glibc thread arena among ``maps``."""
    found = []
    for i, (start, end, perms, name, rss) in enumerate(maps):
        if name or perms != "rw-p" or start % ARENA_BYTES:
            continue
        reserved = end
        if i + 1 < len(maps) and maps[i + 1][0] == end and maps[i + 1][2] == "---p" and not maps[i + 1][3]:
            reserved = maps[i + 1][1]
        if reserved - start == ARENA_BYTES:
            found.append(rss)
    return found


def processes() -> list[tuple[int, list[str]]]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            argv = [a for a in (p / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
        except OSError:
            continue  # gone meanwhile
        if argv:
            out.append((int(p.name), argv))
    return out


def survey() -> tuple[dict[str, Usage], dict[str, Usage], int]:
    """(usage per component, usage per anchor, number of QEMU processes)."""
    comps: dict[str, Usage] = {name: Usage() for name, _, _ in COMPONENTS}
    anchors: dict[str, Usage] = {name: Usage() for name in ANCHORS}
    qemus = 0
    unmatched = []
    for pid, argv in processes():
        args = script_args(argv)
        prog = Path(argv[0]).name
        try:
            if prog.startswith(QEMU_PREFIX):
                qemus += 1
            elif prog in anchors:
                anchors[prog].add(pid)
            else:
                for name, _, belongs in COMPONENTS:
                    if args and belongs(args):
                        comps[name].add(pid)
                        break
                else:
                    unmatched.append(pid)
        except (OSError, ValueError):
            continue  # ended while being read
    parents = {pid: name for name in OWN_CHILDREN for pid in comps[name].pids}
    for pid in unmatched:
        try:
            owner = parents.get(status_kib(pid, "PPid"))
            if owner:
                comps[owner].add(pid)
        except (OSError, ValueError):
            continue
    return comps, anchors, qemus


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def table(comps: dict[str, Usage], anchors: dict[str, Usage], qemus: int) -> list[str]:
    rows = [
        "| process | n | threads | RSS MiB | PSS MiB | [heap] MiB | anon MiB | thread arenas (MiB in them) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(name: str, u: Usage, bold: bool = False, glibc: bool = True) -> None:
        cells = [str(len(u.pids)), str(u.threads), mib(u.rss), mib(u.pss), mib(u.heap), mib(u.anon)]
        cells.append(f"{u.arenas} ({mib(u.arena_rss)})" if glibc else "n/a (Go)")
        if bold:
            name, cells = f"**{name}**", [f"**{c}**" for c in cells]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")

    total = Usage()
    for name, in_node, _ in COMPONENTS:
        u = comps[name]
        if in_node:
            row(name, u)
            total.pids += u.pids
            for attr in ("threads", "rss", "pss", "heap", "anon", "arenas", "arena_rss"):
                setattr(total, attr, getattr(total, attr) + getattr(u, attr))
    row("edgevirt on the node (total)", total, bold=True)
    goal = GOAL_IDLE_MIB if qemus == 0 else GOAL_10_VMS_MIB
    rows.append(f"| goal ({'idle' if qemus == 0 else '10 VM pods'}) | | | ≤ {goal} | ≤ {goal} | | | |")
    for name, in_node, _ in COMPONENTS:
        if not in_node and comps[name].pids:
            row(f"{name} (not in the node total)", comps[name])
    for name in ANCHORS:
        row(f"anchor: {name}", anchors[name], glibc=name != "kubelet")
    missing = [name for name, in_node, _ in COMPONENTS if in_node and not comps[name].pids]
    rows.append("")
    rows.append(
        f"QEMU processes running: {qemus}." + (f" Not found: {', '.join(missing)}." if missing else "")
    )
    return rows


def write_results(label: str, command: str, rows: list[str]) -> None:
    """Put the dated table in RESULTS.md's section, replacing an earlier one of the same label."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    block = [f"### {label}", "", f"{stamp}, `{command}`.", "", *rows, ""]
    lines = RESULTS.read_text().splitlines()
    if SECTION not in lines:
        lines += [
            "",
            SECTION,
            "",
            f"Goal (issue 12): ≤ {GOAL_IDLE_MIB} MiB idle, ≤ {GOAL_10_VMS_MIB} MiB with 10 VM pods.",
            "",
        ]
    start = lines.index(SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    head = f"### {label}"
    if head in lines[start:end]:
        i = lines.index(head, start)
        j = next((k for k in range(i + 1, end) if lines[k].startswith(("### ", "## "))), end)
        lines[i:j] = block
    else:
        lines[end:end] = block
    RESULTS.write_text("\n".join(lines).rstrip("\n") + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="also write the table into bench/RESULTS.md")
    ap.add_argument("--label", default="idle", help="the table's heading in RESULTS.md (default idle)")
    args = ap.parse_args()
    rows = table(*survey())
    print("\n".join(rows))
    if args.write:
        cmd = shlex.join(["bench/node/bench_memory.py", *sys.argv[1:]])
        write_results(args.label, f".venv/bin/python {cmd}", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
