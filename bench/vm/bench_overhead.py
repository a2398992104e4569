"""Per-VM overhead of a kvm pod: what one VM costs the node beyond its guest's memory. The RuntimeClass
``kvm``'s ``overhead.podFixed`` (deploy/manifests/runtimeclasses.yaml) is this figure, rounded up.

Through the real path: an edgevirt-cri of its own with the local cluster's kvm backend options (VM
network, libvirtd, VM disk dir; ``deploy/local/up`` first) runs ``--vms`` VM pods of ``--memory`` MiB
(RunPodSandbox + CreateContainer + StartContainer, handler kvm, the bootable test disk); once every
guest has booted (its console says so) and ``--settle`` seconds passed, per VM:

- memory: QEMU's VmRSS minus the resident part of the guest's RAM mapping (the mapping in
  /proc/PID/smaps whose size is the guest's memory: what the guest touched, which the pod's memory
  limit already pays for), plus (libvirtd + virtlogd VmRSS) / N, their share; and the same with
  PSS, where QEMU's shared pages (its binary and libraries, mapped by every QEMU on the node) are
  split among the processes mapping them, so N VMs add up to what the node really holds;
- CPU: QEMU's own threads (all but the vCPU threads, ``CPU n/TCG`` or ``CPU n/KVM``) over an idle
  ``--window`` of seconds, in millicores; and the same threads' CPU from QEMU's start to the guest
  being up, which a start costs once.

The accelerator is what the node probe says (TCG on these machines: their KVM cannot run a Linux
guest); under KVM the same figures are computed the same way. TCG's translation cache lives in
QEMU's own memory, so TCG's overhead is the larger one; ``--tb-cache 0,32`` measures the kvm
handler's ``tcg_tb_cache_mib`` settings side by side in one run (0: QEMU's default, 1 GiB), with
what each costs in speed: the guest's boot (StartContainer to its "up" on the console) and a
CPU-bound loop in the guest (a shell counting to 200000, through ExecSync).

Usage: .venv/bin/python bench/vm/bench_overhead.py [--vms 5] [--memory 256] [--settle 10] [--window 30]
       [--tb-cache 0,32]
Prints a Markdown table for bench/RESULTS.md (section "## Per-VM overhead (RuntimeClass kvm)").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deploy" / "local"))
sys.path.insert(0, str(REPO / "deploy" / "images"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from benchkit import pct, smaps_rollup_kib, status_kib  # noqa: E402
from helpers.shim import Shim as ShimProcess  # noqa: E402
from helpers.vm_env import VM_IMAGE as IMAGE  # noqa: E402
from helpers.waiting import wait_for  # noqa: E402
from localcluster.components import BY_NAME  # noqa: E402
from localcluster.paths import Paths  # noqa: E402

from cri_shim import protos  # noqa: E402

api = protos.api()
from cri_shim._generated import api_pb2_grpc  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
BOOTED = "EDGEVIRT-GUEST: up"


@dataclass
class Vm:
    sid: str
    cid: str
    log: Path
    started: float  # monotonic, at StartContainer
    pid: int = 0
    boot_s: float = 0.0  # StartContainer -> the guest's "up"


def qemu_pid(domain: str) -> int:
    for d in ("/run/libvirt/qemu", "/var/run/libvirt/qemu"):
        pidfile = Path(d, f"{domain}.pid")
        if pidfile.exists():
            return int(pidfile.read_text().split()[0])
    raise FileNotFoundError(f"no pid file of domain {domain} under /run/libvirt/qemu")


def guest_ram_kib(pid: int, memory_mib: int) -> tuple[int, int, int]:
    """(resident KiB, proportional KiB, number of mappings) of the guest RAM: the mappings of the
    guest's size (QEMU may round a RAM block up to its alignment, hence the small margin; one is
    expected). Guest RAM is private to its QEMU, so both figures agree."""
    want, size, rss, pss, found = memory_mib * 1024, 0, 0, 0, 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "Size":
            size = int(value.split()[0])
        elif key in ("Rss", "Pss") and want <= size <= want + 4096:
            if key == "Rss":
                rss += int(value.split()[0])
                found += 1
            else:
                pss += int(value.split()[0])
    return rss, pss, found


def own_thread_ticks(pid: int) -> int:
    """utime + stime of QEMU's threads that are not vCPUs."""
    ticks = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a thread that just ended
        if comm.startswith("CPU ") and comm.endswith(("/TCG", "/KVM")):
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks


def pids_named(name: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "comm").read_text().strip() == name:
                    out.append(int(p.name))
            except OSError:
                pass
    return out


class Shim:
    def __init__(self, sock: Path, tmp: Path, memory_mib: int) -> None:
        self.rt = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(f"unix://{sock}"))
        self.tmp, self.memory_mib = tmp, memory_mib

    def run_vm(self, image: str) -> Vm:
        name = f"bench-overhead-{uuid.uuid4().hex[:6]}"
        logdir = self.tmp / name
        logdir.mkdir(parents=True, exist_ok=True)
        cfg = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, namespace="bench", uid=uuid.uuid4().hex),
            log_directory=str(logdir),
        )
        ccfg = api.ContainerConfig(
            metadata=api.ContainerMetadata(name="vm"),
            image=api.ImageSpec(image=image),
            log_path="vm.log",
            linux=api.LinuxContainerConfig(
                resources=api.LinuxContainerResources(memory_limit_in_bytes=self.memory_mib << 20)
            ),
        )
        sid = self.rt.RunPodSandbox(
            api.RunPodSandboxRequest(config=cfg, runtime_handler="kvm")
        ).pod_sandbox_id
        cid = self.rt.CreateContainer(
            api.CreateContainerRequest(pod_sandbox_id=sid, config=ccfg, sandbox_config=cfg)
        ).container_id
        self.rt.StartContainer(api.StartContainerRequest(container_id=cid))
        return Vm(sid, cid, logdir / "vm.log", time.monotonic())

    def cpu_loop(self, vm: Vm) -> float:
        """Wall seconds of a CPU-bound shell loop in the guest (ExecSync through its agent)."""
        loop = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo $i"
        t0 = time.perf_counter()
        r = self.rt.ExecSync(api.ExecSyncRequest(container_id=vm.cid, cmd=["sh", "-c", loop], timeout=600))
        took = time.perf_counter() - t0
        assert r.exit_code == 0 and r.stdout.strip() == b"200000", (r.exit_code, r.stdout, r.stderr)
        return took

    def remove(self, vm: Vm) -> None:
        self.rt.StopContainer(api.StopContainerRequest(container_id=vm.cid, timeout=0))
        self.rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=vm.sid))


def booted(vm: Vm) -> bool:
    return vm.log.exists() and BOOTED in vm.log.read_text(errors="replace")


def measure(args: argparse.Namespace, shim: Shim, accel: str) -> dict[str, list[float]]:
    vms: list[Vm] = []
    try:
        for _ in range(args.vms):
            vms.append(shim.run_vm(args.image))
        boot_ticks, boot_mcores = [], []
        for vm in vms:
            vm.pid = qemu_pid(f"edgevirt-{vm.cid[:20]}")
            wait_for(f"the guest of {vm.cid[:12]} to boot", lambda vm=vm: booted(vm), 300, 0.05)
            vm.boot_s = time.monotonic() - vm.started
            boot_ticks.append(own_thread_ticks(vm.pid))
            boot_mcores.append(boot_ticks[-1] / CLK_TCK / (time.monotonic() - vm.started) * 1000)
        time.sleep(args.settle)
        before = {vm.pid: own_thread_ticks(vm.pid) for vm in vms}
        time.sleep(args.window)
        idle_mcores = [
            (own_thread_ticks(vm.pid) - before[vm.pid]) / CLK_TCK / args.window * 1000 for vm in vms
        ]
        daemons = {n: sum(status_kib(p) for p in pids_named(n)) for n in ("libvirtd", "virtlogd")}
        daemons_pss = {
            n: sum(smaps_rollup_kib(p)["Pss"] for p in pids_named(n)) for n in ("libvirtd", "virtlogd")
        }
        share = (daemons["libvirtd"] + daemons["virtlogd"]) / len(vms)
        share_pss = (daemons_pss["libvirtd"] + daemons_pss["virtlogd"]) / len(vms)
        rows = []
        for vm in vms:
            rss, pss = status_kib(vm.pid), smaps_rollup_kib(vm.pid)["Pss"]
            guest, guest_pss, mappings = guest_ram_kib(vm.pid, args.memory)
            assert mappings == 1, (
                f"{mappings} mappings of the guest's size in QEMU {vm.pid}: which is its RAM?"
            )
            rows.append(
                (rss, guest, rss - guest, rss - guest + share, pss - guest_pss, pss - guest_pss + share_pss)
            )
        for vm in vms:  # one at a time: the loop's time is the guest's alone
            wait_for(
                f"the guest agent of {vm.cid[:12]}",
                lambda vm=vm: (
                    shim.rt.ExecSync(
                        api.ExecSyncRequest(container_id=vm.cid, cmd=["true"], timeout=10)
                    ).exit_code
                    == 0
                ),
                120,
                1,
                retry_on=(grpc.RpcError,),
            )
        loops = [shim.cpu_loop(vm) for vm in vms]
    finally:
        for vm in vms:
            shim.remove(vm)
    report(
        args, accel, rows, daemons, daemons_pss, idle_mcores, [t / CLK_TCK for t in boot_ticks], boot_mcores
    )
    boots = [vm.boot_s for vm in vms]
    print(
        f"boot (s): {', '.join(f'{x:.2f}' for x in boots)}; "
        f"cpu loop (s): {', '.join(f'{x:.2f}' for x in loops)}"
    )
    return {
        "overhead": [r[3] / 1024 for r in rows],
        "own": [r[2] / 1024 for r in rows],
        "overhead_pss": [r[5] / 1024 for r in rows],
        "boot": boots,
        "loop": loops,
    }


def report(args, accel, rows, daemons, daemons_pss, idle_mcores, boot_cpu, boot_mcores) -> None:
    def mib(kib: float) -> str:
        return f"{kib / 1024:.1f} MiB"

    def line(what: str, values: list[float], fmt) -> None:
        print(f"| {what} | {fmt(pct(values, 50))} | {fmt(max(values))} |")

    def col(i: int) -> list[float]:
        return [r[i] for r in rows]

    print(f"{args.vms} VMs of {args.memory} MiB, accel {accel}")
    print("| measure (per VM) | p50 | max |")
    print("|---|---|---|")
    line("QEMU VmRSS", col(0), mib)
    line("guest RAM resident (touched by the guest)", col(1), mib)
    line("QEMU's own memory (VmRSS - guest RAM)", col(2), mib)
    line(f"+ (libvirtd + virtlogd) / {args.vms} = **overhead (RSS)**", col(3), mib)
    line("QEMU's own memory, PSS (its shared pages split among the QEMUs sharing them)", col(4), mib)
    line(f"+ (libvirtd + virtlogd PSS) / {args.vms} = **overhead (PSS)**", col(5), mib)
    line(f"QEMU's own threads, idle ({args.window:g} s)", idle_mcores, lambda x: f"{x:.1f} m")
    line("QEMU's own threads, start to guest up", boot_cpu, lambda x: f"{x:.2f} CPU-s")
    line("QEMU's own threads, start to guest up, on average", boot_mcores, lambda x: f"{x:.0f} m")
    print(
        f"\nlibvirtd {mib(daemons['libvirtd'])}, virtlogd {mib(daemons['virtlogd'])} (VmRSS with the VMs); "
        f"PSS {mib(daemons_pss['libvirtd'])}, {mib(daemons_pss['virtlogd'])}"
    )
    print(
        "per VM (VmRSS, guest RAM, own, overhead, own PSS, overhead PSS): "
        + "; ".join(" ".join(mib(x) for x in r) for r in rows)
    )
    print("idle own-thread CPU (m): " + ", ".join(f"{x:.1f}" for x in idle_mcores))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=5)
    ap.add_argument("--memory", type=int, default=256, help="MiB per VM (the container's memory limit)")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after the last boot before measuring")
    ap.add_argument("--window", type=float, default=30.0, help="seconds of idle CPU measured")
    ap.add_argument("--image", default=IMAGE)
    ap.add_argument(
        "--tb-cache",
        default="",
        help="comma-separated tcg_tb_cache_mib settings to compare (0: QEMU's default)",
    )
    args = ap.parse_args()
    paths = Paths.default()
    if not BY_NAME["edgevirt-cri"].process(paths).pid():
        sys.exit("edgevirt-cri of the local cluster is not running: deploy/local/up")
    import build_vm_disk
    import yaml

    from runtimeclass.probe import DEFAULT_CACHE, probe

    build_vm_disk.push(build_vm_disk.build_vm_disk(), args.image)
    accel = probe(cache_file=DEFAULT_CACHE).accel
    settings: list[int | None] = [int(x) for x in args.tb_cache.split(",")] if args.tb_cache else [None]
    results = {}
    for tb in settings:
        kvm = yaml.safe_load((paths.etc / "edgevirt-cri.yaml").read_text())["backends"]["kvm"]
        if tb is not None:
            kvm["options"]["tcg_tb_cache_mib"] = tb
        proc = ShimProcess.create(paths.containerd_sock)
        kvm["options"]["state_dir"] = str(proc.root / "kvm")
        proc.extra_config = {
            "backends": {
                "containerd": {"type": "containerd", "socket": str(paths.containerd_sock)},
                "kvm": kvm,
            },
            "handlers": {"": "containerd", "kvm": "kvm"},
        }
        proc.start()
        try:
            print(f"\n### tcg_tb_cache_mib: {'the handler default' if tb is None else tb}\n")
            results[tb] = measure(args, Shim(proc.socket, proc.root / "pods", args.memory), accel)
        finally:
            proc.close()
    if len(results) > 1:
        print(
            "\n| tcg_tb_cache_mib | overhead p50 (RSS) | overhead p50 (PSS) | QEMU's own p50 (RSS) "
            "| boot p50 | CPU loop p50 |"
        )
        print("|---|---|---|---|---|---|")
        for tb, r in results.items():
            name = "0 (QEMU's default, 1 GiB)" if tb == 0 else str(tb)
            print(
                f"| {name} | {pct(r['overhead'], 50):.1f} MiB | {pct(r['overhead_pss'], 50):.1f} MiB "
                f"| {pct(r['own'], 50):.1f} MiB "
                f"| {pct(r['boot'], 50):.2f} s | {pct(r['loop'], 50):.2f} s |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
