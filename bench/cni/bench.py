#!/usr/bin/env python3
"""Benchmark: macvtap CNI (daemon and standalone) against Debian's reference macvlan + host-local.

Run as root from the repo root:  .venv/bin/python bench/cni/bench.py [--iterations N] [--write]

Everything happens inside throwaway namespaces: a "host" netns with a veth master (vm0) and pod
namespaces. Both plugins are executed from the same CNI bin dir (the real install-plugin launcher for
ours), with host-local IPAM in temp dataDirs, alternating call by call so machine load hits both
alike. Reported: ADD and DEL latency p50/p95, a parallel burst (24 pods, 8 at a time: ADD then DEL
wall time), the ratios ours/reference, the standalone (no daemon) figures and the daemon's RSS.
With --write the table replaces the "## macvtap CNI" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from benchkit import pct, status_kib  # noqa: E402
from helpers import processes  # noqa: E402
from helpers.netns import Namespaces, sh  # noqa: E402
from helpers.waiting import wait_for  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
BURST_PODS, BURST_PARALLEL = 24, 8


def daemon_rss_kb(pid: int) -> list[int]:
    """VmRSS of the daemon process and of its children (the workers)."""
    return [status_kib(p) for p in [pid, *processes.children(pid)]]


def daemon_pss_kb(pid: int) -> list[int]:
    """Pss of the daemon process and of its children (pages shared after the fork count once)."""
    return [pss_kib(p) for p in [pid, *processes.children(pid)]]


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


class Bench:
    def __init__(self, tmp: Path, iterations: int) -> None:
        self.tmp = tmp
        self.n = iterations
        self.tag = f"evb{secrets.token_hex(3)}"
        self.host = f"{self.tag}-host"
        self.netns = Namespaces()
        self.bin = tmp / "bin"

    def netns_add(self, name: str) -> str:
        return self.netns.add(name)

    def setup(self) -> None:
        self.netns_add(self.host)
        sh("ip", "-n", self.host, "link", "add", "vm0", "type", "veth", "peer", "name", "vp0")
        sh("ip", "-n", self.host, "link", "set", "vm0", "up")
        sh(str(REPO / "deploy/cni/install-plugin"), "--dest", str(self.bin), timeout=300)

    def conf(self, kind: str, standalone: bool = False, socket: str = "macvtap.sock") -> bytes:
        ipam = {"type": "host-local", "dataDir": str(self.tmp / f"ipam-{kind}"),
                "ranges": [[{"subnet": "10.99.0.0/16" if kind == "ours" else "10.98.0.0/16"}]]}  # fmt: skip
        doc = {"cniVersion": "1.0.0", "name": f"bench-{kind}", "master": "vm0", "ipam": ipam}
        if kind == "ours":
            doc.update(type="macvtap", deviceDir=str(self.tmp / "dev"), stateDir=str(self.tmp / "state"))
            doc["daemonSocket"] = str(self.tmp / ("none.sock" if standalone else socket))
        else:
            doc.update(type="macvlan", mode="bridge")
        return json.dumps(doc).encode()

    def call(
        self,
        kind: str,
        verb: str,
        cid: str,
        netns: str,
        standalone: bool = False,
        socket: str = "macvtap.sock",
    ) -> float:
        binary = self.bin / ("macvtap" if kind == "ours" else "macvlan")
        env = {"CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
               "CNI_PATH": str(self.bin), "PATH": "/usr/bin:/bin"}  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.host}", str(binary)],
            input=self.conf(kind, standalone, socket), env=env, capture_output=True, timeout=120,
        )  # fmt: skip
        dt = (time.perf_counter() - t0) * 1000
        if proc.returncode != 0:
            raise SystemExit(f"{kind} {verb} failed: {proc.stdout.decode()} {proc.stderr.decode()}")
        return dt

    def baseline_nsenter(self) -> float:
        t = []
        for _ in range(10):
            t0 = time.perf_counter()
            subprocess.run(["nsenter", f"--net=/run/netns/{self.host}", "true"], check=True, timeout=60)
            t.append((time.perf_counter() - t0) * 1000)
        return statistics.median(t)

    def sequential(self, kinds: list[tuple[str, bool]]) -> dict[tuple[str, bool], dict[str, list[float]]]:
        pods = {k: self.netns_add(f"{self.tag}-seq{i}") for i, k in enumerate(kinds)}
        out = {k: {"ADD": [], "DEL": []} for k in kinds}
        for i in range(self.n):
            for verb in ("ADD", "DEL"):
                order = kinds if i % 2 == 0 else list(reversed(kinds))
                for k in order:
                    out[k][verb].append(self.call(k[0], verb, f"seq-{k[0]}-{int(k[1])}-{i}", pods[k], k[1]))
        return out

    def burst(self, kind: str, standalone: bool, pods: list[str], round_: int) -> tuple[float, float]:
        ids = [f"burst-{kind}-{int(standalone)}-{round_}-{j}" for j in range(BURST_PODS)]
        with ThreadPoolExecutor(BURST_PARALLEL) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda j: self.call(kind, "ADD", ids[j], pods[j], standalone), range(BURST_PODS)))
            t1 = time.perf_counter()
            list(pool.map(lambda j: self.call(kind, "DEL", ids[j], pods[j], standalone), range(BURST_PODS)))
            t2 = time.perf_counter()
        return (t1 - t0) * 1000, (t2 - t1) * 1000

    def cold(self, daemon_pid: int, n: int) -> dict[str, list[float]]:
        """``n`` times: once the on-demand daemon on cold.sock has no worker left, one ADD through it
        (it starts a worker for the call) and one reference ADD right after; then both DELs."""
        pods = {k: self.netns_add(f"{self.tag}-cold{k}") for k in ("ours", "ref")}
        out: dict[str, list[float]] = {"ours": [], "ref": []}
        for i in range(n):
            wait_for(
                "the cold daemon's workers to exit", lambda: not processes.children(daemon_pid), 60, 0.05
            )
            time.sleep(0.2)
            for k in ("ours", "ref"):
                out[k].append(self.call(k, "ADD", f"cold-{k}-{i}", pods[k], socket="cold.sock"))
            for k in ("ours", "ref"):
                self.call(k, "DEL", f"cold-{k}-{i}", pods[k], socket="cold.sock")
        return out

    def close(self) -> None:
        self.netns.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3, help="burst rounds per implementation")
    ap.add_argument(
        "--write", action="store_true", help="replace the macvtap CNI section of bench/RESULTS.md"
    )
    ap.add_argument(
        "--workers", type=int, default=None, help="the daemon's --workers (default: its own, one per CPU)"
    )
    ap.add_argument(
        "--min-workers",
        type=int,
        default=None,
        help="the daemon's --min-workers (default: its own, 0: workers start on demand)",
    )
    ap.add_argument(
        "--cold",
        type=int,
        default=8,
        help="first calls after an idle spell: a second daemon with --idle-exit 1 (its workers gone "
        "before each call), against the reference's ADD at the same moment",
    )
    ap.add_argument(
        "--no-preload",
        action="store_true",
        help="the supervisor does not load the workers' code before forking (MACVTAP_DAEMON_NO_PRELOAD=1)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench needs root (namespaces and links)")
    tmp = Path(tempfile.mkdtemp(prefix="evbench-"))
    b = Bench(tmp, args.iterations)
    daemon = cold_daemon = None
    no_preload = {"MACVTAP_DAEMON_NO_PRELOAD": "1"} if args.no_preload else {}
    try:
        b.setup()
        daemon = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{b.host}", str(b.bin / "macvtap"), "daemon", "--socket",
             str(tmp / "macvtap.sock"), *([f"--workers={args.workers}"] if args.workers else []),
             *([f"--min-workers={args.min_workers}"] if args.min_workers is not None else [])],
            stderr=subprocess.DEVNULL, env={**os.environ, **no_preload},
        )  # fmt: skip
        wait_for("the macvtap daemon's socket", (tmp / "macvtap.sock").exists, 60, 0.05)
        cold_daemon = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{b.host}", str(b.bin / "macvtap"), "daemon", "--socket",
             str(tmp / "cold.sock"), "--idle-exit", "1", "--ops-address", "",
             *([f"--workers={args.workers}"] if args.workers else [])],
            stderr=subprocess.DEVNULL, env={**os.environ, **no_preload},
        )  # fmt: skip
        wait_for("the second macvtap daemon's socket", (tmp / "cold.sock").exists, 60, 0.05)
        time.sleep(0.5)
        kinds = [("ours", False), ("ref", False), ("ours", True)]
        for k in kinds:  # warm-up: page cache, pyc files, host-local dirs
            pod = b.netns_add(f"{b.tag}-warm{int(k[1])}{k[0]}")
            b.call(k[0], "ADD", "warm", pod, k[1])
            b.call(k[0], "DEL", "warm", pod, k[1])
        seq = b.sequential(kinds)
        bursts: dict[tuple[str, bool], list[tuple[float, float]]] = {k: [] for k in kinds}
        pods = {k: [b.netns_add(f"{b.tag}-b{int(k[1])}{k[0]}{j}") for j in range(BURST_PODS)] for k in kinds}
        for r in range(args.rounds):
            for k in kinds if r % 2 == 0 else list(reversed(kinds)):
                bursts[k].append(b.burst(k[0], k[1], pods[k], r))
        rss = daemon_rss_kb(daemon.pid)
        pss = daemon_pss_kb(daemon.pid)
        cold = b.cold(cold_daemon.pid, args.cold)
        wait_for(
            "the cold daemon's workers to exit", lambda: not processes.children(cold_daemon.pid), 60, 0.05
        )
        idle_rss, idle_pss = daemon_rss_kb(cold_daemon.pid), daemon_pss_kb(cold_daemon.pid)
        nsenter_ms = b.baseline_nsenter()
    finally:
        for d in (daemon, cold_daemon):
            if d is not None:
                processes.stop(d, grace=20)
        b.close()
        shutil.rmtree(tmp, ignore_errors=True)

    def row(label: str, k: tuple[str, bool]) -> list[float]:
        add, dele = seq[k]["ADD"], seq[k]["DEL"]
        badd = statistics.median(x[0] for x in bursts[k])
        bdel = statistics.median(x[1] for x in bursts[k])
        return [pct(add, 50), pct(add, 95), pct(dele, 50), pct(dele, 95), badd, bdel]

    ours, ref, alone = row("ours", kinds[0]), row("ref", kinds[1]), row("alone", kinds[2])
    cols = ["ADD p50", "ADD p95", "DEL p50", "DEL p95", "burst ADD", "burst DEL"]
    lines = [
        "| ms | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
        "| macvtap + daemon | " + " | ".join(f"{v:.1f}" for v in ours) + " |",
        "| reference macvlan + host-local | " + " | ".join(f"{v:.1f}" for v in ref) + " |",
        "| **ratio ours/reference** | "
        + " | ".join(f"**{o / r:.2f}**" for o, r in zip(ours, ref, strict=True))
        + " |",
        "| macvtap standalone (no daemon) | " + " | ".join(f"{v:.1f}" for v in alone) + " |",
        "| ratio standalone/reference | "
        + " | ".join(f"{o / r:.2f}" for o, r in zip(alone, ref, strict=True))
        + " |",
    ]
    table = "\n".join(lines)
    cold_ours, cold_ref = statistics.median(cold["ours"]), statistics.median(cold["ref"])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cmd = "sudo .venv/bin/python bench/cni/bench.py " + " ".join(sys.argv[1:])
    workers = f"--workers {args.workers}" if args.workers else "default one worker per CPU"
    workers += f", --min-workers {args.min_workers}" if args.min_workers is not None else ", on demand"
    workers += ", workers' code not preloaded" if args.no_preload else ""
    rss_text = " + ".join(f"{kb / 1024:.1f}" for kb in rss)
    section = f"""## macvtap CNI

{stamp}, `{cmd.strip()}` ({args.iterations} sequential ADD+DEL per implementation, alternating call by
call; burst = {BURST_PODS} pods, {BURST_PARALLEL} at a time, wall time of all ADDs then all DELs, median of
{args.rounds} rounds). Each call is a fresh `nsenter --net=<host netns> <plugin>` process (nsenter alone:
{nsenter_ms:.1f} ms, included in every figure for both sides). host-local IPAM for both: the reference
execs Debian's binary, our daemon serves the same store in-process (identical on-disk state, see
tests/integration/test_cni_hostlocal.py), standalone ours execs the binary. Our executable is the
native thin client installed by deploy/cni/install-plugin.

{table}

Daemon RSS after the run (`macvtap daemon`, {workers}): {rss_text}
= {sum(rss) / 1024:.1f} MiB; PSS {" + ".join(f"{kb / 1024:.1f}" for kb in pss)} = {sum(pss) / 1024:.1f} MiB
(supervisor + workers; the workers share the code the supervisor loaded before forking). Workers
start on demand and exit after `--idle-exit` seconds without a call: idle, the daemon is its
supervisor alone, {idle_rss[0] / 1024:.1f} MiB RSS, {idle_pss[0] / 1024:.1f} MiB PSS (measured on a second
daemon run with `--idle-exit 1`, after its workers exited).

The first ADD after an idle spell (that second daemon, no worker running: the call waits for one to
start), median of {args.cold}, each against a reference ADD made right after it: ours {cold_ours:.1f} ms,
reference {cold_ref:.1f} ms (**{cold_ours / cold_ref:.2f}x**), once per idle spell.

Reading it: the ratios come from calls alternated within one run; the 2-core machine was shared with
other builds and test suites, so absolute figures move between runs (the reference ADD p50 ranged from
9 to 18 ms in runs this day). The sequential and burst figures are with warm workers (calls come
closer together than `--idle-exit`). Standalone is dominated by starting Python and importing pyroute2
(~190 ms), which is why the daemon exists. DEL is mostly the kernel unregistering the link (~16 ms
for both). Before the native client and the in-process host-local, the same bench gave ADD 2.1x and
burst 2.5x the reference; one daemon process (no workers) gave burst ADD 1.35x.
"""
    print(section)
    if args.write:
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        start = text.find("## macvtap CNI")
        if start == -1:
            text = text.rstrip("\n") + "\n\n" + section
        else:
            end = text.find("\n## ", start + 3)
            text = text[:start] + section + (text[end + 1 :] if end != -1 else "")
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
