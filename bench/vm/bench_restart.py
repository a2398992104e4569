"""Benchmark of a VM's restart by kubelet alone: with the API server and the registry stopped, the time
from QEMU's death (kill -9) to the VM running again (libvirt says the pod's new domain runs), on the
VM's first restart, against ``virsh start`` of the same (shut off) domain as the floor (the same end
point: its start is over).

Local cluster (`deploy/local/up`): kubelet -> edgevirt-cri's kvm handler -> libvirt, QEMU TCG, the
bootable test disk, 256 MiB, 1 vCPU. Per round, a fresh plain kvm pod with restartPolicy Always (a
fresh container: kubelet's crash-loop back-off grows per container, and the first restart has none):
wait until its QEMU runs, stop kube-apiserver and the registry, kill -9 the QEMU, poll (every 5 ms)
for a new QEMU process of a new domain of the pod and then for libvirt to say that domain runs; each
restart is broken down from libvirt's own log stamps (kill -> libvirt saw QEMU end, -> the new
domain starting up: kubelet and edgevirt-cri, -> running); then the floor, with kubelet held (SIGSTOP) so it
does not restart the pod meanwhile: destroy that new domain's QEMU once it runs and
``virDomainCreate`` (what ``virsh start`` does) the first, shut-off domain, until it is active;
kubelet goes on (SIGCONT), the API server and the registry start, the pod is deleted.

Both ways kubelet learns that a container ended, in the same run (``--pleg both``): its generic PLEG
(a relist every second, kubelet's default) and its evented PLEG (feature gate ``EventedPLEG``, beta
and off by default upstream: kubelet acts on edgevirt-cri's GetContainerEvents stream, which reports
QEMU's end as libvirt does). For the evented rounds a kubelet config drop-in turns the gate on and
kubelet restarts; the drop-in goes and kubelet restarts again afterwards.

Usage: .venv/bin/python bench/vm/bench_restart.py [--rounds 10] [--image REF] [--pleg both|generic|evented]
Prints a Markdown table for bench/RESULTS.md (section "## VM restart by kubelet, control plane away").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

import libvirt

REPO = Path(__file__).resolve().parents[2]
for p in (REPO, REPO / "deploy/local", REPO / "tests", REPO / "bench"):
    sys.path.insert(0, str(p))

from benchkit import pct  # noqa: E402
from helpers.cluster import Cluster  # noqa: E402
from helpers.vm_env import VM_IMAGE, qemu_pid  # noqa: E402
from helpers.waiting import wait_for  # noqa: E402
from localcluster.components import BY_NAME  # noqa: E402
from localcluster.paths import Paths, node_name  # noqa: E402

POD = """apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default}}
spec:
  runtimeClassName: kvm
  restartPolicy: Always
  terminationGracePeriodSeconds: 5
  containers:
  - name: vm
    image: {image}
    imagePullPolicy: IfNotPresent
    resources: {{limits: {{cpu: "1", memory: 256Mi}}, requests: {{cpu: 10m, memory: 256Mi}}}}
"""
QEMU_PIDS = Path("/run/libvirt/qemu")


def edgevirt_pids() -> dict[str, int]:
    """Domain name -> QEMU pid of every running edgevirt domain (libvirt's pid files)."""
    out = {}
    for f in QEMU_PIDS.glob("edgevirt-*.pid"):
        pid = qemu_pid(f.stem)
        if pid and Path(f"/proc/{pid}").exists():
            out[f.stem] = pid
    return out


def up(cluster: Cluster, *names: str) -> None:
    for name in names:
        res = cluster.up(name)
        if res.returncode != 0:
            raise RuntimeError(f"deploy/local/up {name}: {res.stdout}{res.stderr}")
    wait_for(
        "the API server", lambda: cluster.kubectl("get", "--raw", "/readyz", check=False).returncode == 0, 120
    )


EVENTED_DROPIN = "90-bench-evented-pleg.conf"


def restart_kubelet(cluster: Cluster) -> None:
    BY_NAME["kubelet"].process(cluster.paths).stop(grace=30)
    res = cluster.up("kubelet")
    if res.returncode != 0:
        raise RuntimeError(f"deploy/local/up kubelet: {res.stdout}{res.stderr}")
    wait_for(
        "the node Ready",
        lambda: (
            cluster.kubectl(
                "get",
                "node",
                cluster.node,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                check=False,
            ).stdout
            == "True"
        ),
        180,
    )


def set_evented_pleg(cluster: Cluster, on: bool) -> None:
    """kubelet with (or without) the EventedPLEG gate, through a drop-in in its --config-dir."""
    dropin = cluster.paths.etc / "kubelet.conf.d" / EVENTED_DROPIN
    if on:
        dropin.write_text(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n"
            "featureGates:\n  EventedPLEG: true\n"
        )
    elif not dropin.exists():
        return
    else:
        dropin.unlink()
    restart_kubelet(cluster)


QEMU_LOGS = Path("/var/log/libvirt/qemu")


def libvirt_log_time(domain: str, marker: str) -> float | None:
    """The wall-clock time of the last line of ``domain``'s libvirt log holding ``marker`` (libvirt
    stamps "starting up" and "shutting down, reason=..." in UTC, to the millisecond)."""
    try:
        lines = (QEMU_LOGS / f"{domain}.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if marker in line and line[:4].isdigit():
            stamp = line.split("+0000", 1)[0]
            when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f")
            return when.replace(tzinfo=datetime.UTC).timestamp()
    return None


def one_round(
    cluster: Cluster, conn: libvirt.virConnect, image: str
) -> tuple[float, float, tuple[float, float, float] | None]:
    """(restart, floor, where the restart went: kill -> libvirt saw QEMU end, -> the new domain
    starting (kubelet and edgevirt-cri), -> it runs), in seconds."""
    name = f"bench-restart-{uuid.uuid4().hex[:6]}"
    before = set(edgevirt_pids())
    cluster.kubectl("apply", "-f", "-", input=POD.format(name=name, image=image))
    try:
        first = wait_for("the pod's QEMU", lambda: (set(edgevirt_pids()) - before) or None, 300, 0.1).pop()
        pid0 = edgevirt_pids()[first]
        time.sleep(2)  # let kubelet see it running
        for c in ("kube-apiserver", "registry"):
            BY_NAME[c].process(cluster.paths).stop()
        try:
            t0 = time.perf_counter()
            wall0 = time.time()
            os.kill(pid0, signal.SIGKILL)
            second = wait_for(
                "a new QEMU of the pod",
                lambda: next((d for d in set(edgevirt_pids()) - before - {first}), None),
                300,
                0.005,
            )
            # the end point is the floor's: libvirt says the new domain runs (its start is over)
            new = conn.lookupByName(second)
            wait_for(
                "the new domain running", lambda: new.state()[0] == libvirt.VIR_DOMAIN_RUNNING, 120, 0.005
            )
            restart = time.perf_counter() - t0
            # the floor: virsh start of the first (shut off) domain, once the new one is gone again;
            # the new one is destroyed only once its start is over (destroyed while starting, it
            # would be kubelet's StartContainer failing, not a restart measured), and kubelet is
            # held (SIGSTOP) meanwhile, so its own restart of the pod does not race the floor's
            time.sleep(1)
            kubelet = BY_NAME["kubelet"].process(cluster.paths).pid()
            assert kubelet, "kubelet is not running"
            os.kill(kubelet, signal.SIGSTOP)
            try:
                new.destroy()
                dom = conn.lookupByName(first)
                t1 = time.perf_counter()
                dom.create()
                wait_for("the floor domain to be active", dom.isActive, 120, 0.001)
                floor = time.perf_counter() - t1
                dom.destroy()
            finally:
                os.kill(kubelet, signal.SIGCONT)
        finally:
            up(cluster, "kube-apiserver", "registry")
    finally:
        cluster.kubectl("delete", "pod", name, "--wait=true", "--timeout=120s", check=False, timeout=150)
    ended = libvirt_log_time(first, "shutting down, reason=crashed")
    starting = libvirt_log_time(second, "starting up")
    parts = None
    if ended is not None and starting is not None:
        parts = (ended - wall0, starting - ended, restart - (starting - wall0))
    return restart, floor, parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--image", default=VM_IMAGE)
    ap.add_argument("--pleg", choices=("both", "generic", "evented"), default="both")
    args = ap.parse_args()
    paths = Paths.default()
    cluster = Cluster(paths=paths, node=node_name(), started_here=False)
    if not BY_NAME["kubelet"].process(paths).pid():
        sys.exit("kubelet of the local cluster is not running: deploy/local/up")
    conn = libvirt.open("qemu:///system")
    modes = ("generic", "evented") if args.pleg == "both" else (args.pleg,)
    results: dict[str, tuple[list[float], list[float]]] = {}
    breakdown: dict[str, list[tuple[float, float, float]]] = {}
    try:
        for mode in modes:
            set_evented_pleg(cluster, mode == "evented")
            restarts: list[float] = []
            floors: list[float] = []
            for i in range(args.rounds):
                r, f, parts = one_round(cluster, conn, args.image)
                where = ""
                if parts:
                    breakdown.setdefault(mode, []).append(parts)
                    where = " (kill -> libvirt saw the end {:.3f}, -> new domain starting {:.3f}, "
                    where = (where + "-> running {:.3f})").format(*parts)
                print(
                    f"{mode} round {i + 1}: restart {r:.3f} s, floor {f:.3f} s{where}",
                    file=sys.stderr,
                    flush=True,
                )
                restarts.append(r)
                floors.append(f)
            results[mode] = (restarts, floors)
    finally:
        conn.close()
        set_evented_pleg(cluster, False)
    ms = lambda x: f"{x * 1000:.0f} ms"  # noqa: E731
    print("| kubelet's PLEG | measure | kubelet restarts the VM (API server, registry stopped) "
          "| virsh start (floor) | ratio |")  # fmt: skip
    print("|---|---|---|---|---|")
    for mode, (restarts, floors) in results.items():
        for label, r, f in (
            ("p50", statistics.median(restarts), statistics.median(floors)),
            ("p95", pct(restarts, 95), pct(floors, 95)),
        ):
            print(
                f"| {mode} | kill -9 of QEMU -> VM running again, {label} "
                f"| {ms(r)} | {ms(f)} | {r / f:.2f}x |"
            )
    if breakdown:
        print("\n| kubelet's PLEG | kill -> libvirt saw QEMU end | -> new domain starting "
              "| -> new domain running |")  # fmt: skip
        print("|---|---|---|---|")
        for mode, rows in breakdown.items():
            cols = [statistics.median(c) for c in zip(*rows, strict=True)]
            print(f"| {mode}, p50 | " + " | ".join(f"{c * 1000:.0f} ms" for c in cols) + " |")
    for mode, (restarts, floors) in results.items():
        print(f"\n{mode} restart (s): {', '.join(f'{x:.3f}' for x in restarts)}")
        print(f"{mode} floor (s): {', '.join(f'{x:.3f}' for x in floors)}")
    print(json.dumps({"image": args.image, "rounds": args.rounds, "pleg": list(modes)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
