"""Benchmark of ExecSync in a VM pod: `true` through edgevirt-cri's kvm handler into the guest, against
running the same `true` through the guest agent by hand, in the same run.

Against an edgevirt-cri of its own with the local cluster's kvm backend options (VM network,
libvirtd; `deploy/local/up` first; hold the cluster lock), one VM pod of the test disk (its guest
runs qemu-ga). Per round, alternating which side goes first:

- shim: CRI ``ExecSync(cmd=["true"], timeout=10)`` over gRPC (guest-ping, guest-exec of the bounded
  wrapper, guest-exec-status polls until it ended), until the answer;
- virsh: ``virsh qemu-agent-command <domain> '{"execute":"guest-exec",...true...}'``, then
  ``virsh qemu-agent-command ... guest-exec-status`` until it says exited (what an operator would do);
- also, for reference, the same two agent commands through libvirt-python in this process (no
  process starts: the floor of any agent-based exec).

Usage: .venv/bin/python bench/cri/bench_exec.py [--rounds 50] [--image REF]
Prints a Markdown table for bench/RESULTS.md (section "## edgevirt-cri kvm handler: ExecSync").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import libvirt
import libvirt_qemu

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deploy" / "local"))
sys.path.insert(0, str(REPO / "deploy" / "images"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from benchkit import pct  # noqa: E402
from helpers.shim import Shim as ShimProcess  # noqa: E402
from helpers.vm_env import VM_IMAGE as IMAGE  # noqa: E402
from helpers.waiting import wait_for  # noqa: E402
from localcluster.components import BY_NAME  # noqa: E402
from localcluster.paths import Paths  # noqa: E402

from cri_shim import protos  # noqa: E402

api = protos.api()
from cri_shim._generated import api_pb2_grpc  # noqa: E402

GUEST_EXEC = json.dumps({"execute": "guest-exec", "arguments": {"path": "true", "capture-output": True}})


def status_cmd(pid: int) -> str:
    return json.dumps({"execute": "guest-exec-status", "arguments": {"pid": pid}})


class Shim:
    def __init__(self, sock: Path) -> None:
        self.rt = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(f"unix://{sock}"))

    def run_vm(self, tmp: Path, image: str) -> tuple[str, str]:
        name = f"bench-exec-{uuid.uuid4().hex[:6]}"
        (tmp / name).mkdir(parents=True, exist_ok=True)
        cfg = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, namespace="bench", uid=uuid.uuid4().hex),
            log_directory=str(tmp / name),
        )
        ccfg = api.ContainerConfig(
            metadata=api.ContainerMetadata(name="vm"),
            image=api.ImageSpec(image=image),
            log_path="vm.log",
            linux=api.LinuxContainerConfig(
                resources=api.LinuxContainerResources(memory_limit_in_bytes=256 << 20)
            ),
        )
        sid = self.rt.RunPodSandbox(
            api.RunPodSandboxRequest(config=cfg, runtime_handler="kvm")
        ).pod_sandbox_id
        cid = self.rt.CreateContainer(
            api.CreateContainerRequest(pod_sandbox_id=sid, config=ccfg, sandbox_config=cfg)
        ).container_id
        self.rt.StartContainer(api.StartContainerRequest(container_id=cid))
        return sid, cid

    def exec_true(self, cid: str) -> float:
        t0 = time.perf_counter()
        r = self.rt.ExecSync(api.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=10))
        dt = time.perf_counter() - t0
        assert r.exit_code == 0, r
        return dt

    def remove(self, sid: str, cid: str) -> None:
        self.rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=0))
        self.rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid))


def virsh_true(domain: str) -> float:
    """guest-exec of `true`, then guest-exec-status until exited, each a `virsh` process."""

    def virsh(cmd: str) -> dict:
        out = subprocess.run(
            ["virsh", "-c", "qemu:///system", "qemu-agent-command", domain, cmd],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        return json.loads(out)["return"]

    t0 = time.perf_counter()
    pid = virsh(GUEST_EXEC)["pid"]
    while not virsh(status_cmd(pid))["exited"]:
        pass
    return time.perf_counter() - t0


def api_true(dom: libvirt.virDomain) -> float:
    """The same two agent commands through libvirt-python (no process starts)."""
    t0 = time.perf_counter()
    pid = json.loads(libvirt_qemu.qemuAgentCommand(dom, GUEST_EXEC, 5, 0))["return"]["pid"]
    while not json.loads(libvirt_qemu.qemuAgentCommand(dom, status_cmd(pid), 5, 0))["return"]["exited"]:
        pass
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--image", default=IMAGE)
    args = ap.parse_args()
    paths = Paths.default()
    if not BY_NAME["edgevirt-cri"].process(paths).pid():
        sys.exit("edgevirt-cri of the local cluster is not running: deploy/local/up")
    import build_vm_disk
    import yaml

    build_vm_disk.push(build_vm_disk.build_vm_disk(), args.image)
    kvm = yaml.safe_load((paths.etc / "edgevirt-cri.yaml").read_text())["backends"]["kvm"]
    proc = ShimProcess.create(paths.containerd_sock)
    kvm["options"]["state_dir"] = str(proc.root / "kvm")
    proc.extra_config = {
        "backends": {"containerd": {"type": "containerd", "socket": str(paths.containerd_sock)}, "kvm": kvm},
        "handlers": {"": "containerd", "kvm": "kvm"},
    }
    proc.start()
    try:
        return measure(args, Shim(proc.socket))
    finally:
        proc.close()


def measure(args: argparse.Namespace, shim: Shim) -> int:
    sid, cid = shim.run_vm(Path("/tmp/edgevirt-bench-exec"), args.image)
    conn = libvirt.open("qemu:///system")
    try:
        domain = f"edgevirt-{cid[:20]}"

        def agent_answers() -> bool:
            try:
                shim.exec_true(cid)
            except grpc.RpcError:
                return False
            return True

        wait_for("the guest agent to answer", agent_answers, 300, 1)
        dom = conn.lookupByName(domain)
        for _ in range(3):  # warm: every path once (not timed)
            shim.exec_true(cid), virsh_true(domain), api_true(dom)
        shim_t: list[float] = []
        virsh_t: list[float] = []
        api_t: list[float] = []
        for r in range(args.rounds):
            sides = [("shim", lambda: shim.exec_true(cid)), ("virsh", lambda: virsh_true(domain))]
            for side, run in sides if r % 2 == 0 else reversed(sides):
                (shim_t if side == "shim" else virsh_t).append(run())
            api_t.append(api_true(dom))
    finally:
        shim.remove(sid, cid)
        conn.close()
    s50, v50, a50 = statistics.median(shim_t), statistics.median(virsh_t), statistics.median(api_t)
    s95, v95, a95 = pct(shim_t, 95), pct(virsh_t, 95), pct(api_t, 95)
    print(
        "| ExecSync of `true` | edgevirt-cri (kvm) | virsh qemu-agent-command | ratio "
        "| libvirt-python, same commands |"
    )
    print("|---|---|---|---|---|")
    print(f"| p50 | {s50 * 1000:.1f} ms | {v50 * 1000:.1f} ms | {s50 / v50:.2f}x | {a50 * 1000:.1f} ms |")
    print(f"| p95 | {s95 * 1000:.1f} ms | {v95 * 1000:.1f} ms | {s95 / v95:.2f}x | {a95 * 1000:.1f} ms |")
    print(f"\nshim (ms): {', '.join(f'{x * 1000:.0f}' for x in shim_t)}")
    print(f"virsh (ms): {', '.join(f'{x * 1000:.0f}' for x in virsh_t)}")
    print(f"libvirt-python (ms): {', '.join(f'{x * 1000:.0f}' for x in api_t)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
