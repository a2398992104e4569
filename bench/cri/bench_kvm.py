"""Benchmark of the kvm handler: a VM pod from RunPodSandbox to a running domain, against libvirt
starting the very same domain directly, in the same run.

Against an edgevirt-cri of its own with the local cluster's kvm backend options (VM network,
libvirtd, VM disk dir; `deploy/local/up` first). Per round, alternating which side goes first:

- shim: RunPodSandbox (handler kvm: netns + macvtap CNI ADD) + CreateContainer (image from the cache,
  overlay, seed ISO, define) + StartContainer, until ContainerStatus says RUNNING;
- floor: ``virDomainCreateXML`` (what ``virsh create`` does) of the domain XML the shim defined,
  renamed, with a new UUID, on the same disk, NIC device node and seed, until it is active.

Both stop at "QEMU runs the guest" (the guest's own boot is the same on both sides and not timed).
Also the shim's resident memory idle and with ``--vms`` VM pods running.

Usage: .venv/bin/python bench/cri/bench_kvm.py [--rounds 10] [--vms 5] [--image REF]
Prints a Markdown table for bench/RESULTS.md (section "## edgevirt-cri kvm handler").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import grpc
import libvirt

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deploy" / "local"))
sys.path.insert(0, str(REPO / "deploy" / "images"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from benchkit import pct, status_kib, time_create_xml  # noqa: E402
from helpers.shim import Shim as ShimProcess  # noqa: E402
from helpers.vm_env import VM_IMAGE as IMAGE  # noqa: E402
from helpers.waiting import wait_for  # noqa: E402
from localcluster.components import BY_NAME  # noqa: E402
from localcluster.paths import Paths  # noqa: E402

from cri_shim import protos  # noqa: E402

api = protos.api()
from cri_shim._generated import api_pb2_grpc  # noqa: E402


class Shim:
    def __init__(self, sock: Path) -> None:
        self.rt = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(f"unix://{sock}"))

    def run_vm(self, tmp: Path, image: str) -> tuple[str, str, float]:
        name = f"bench-kvm-{uuid.uuid4().hex[:6]}"
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
        t0 = time.perf_counter()
        sid = self.rt.RunPodSandbox(
            api.RunPodSandboxRequest(config=cfg, runtime_handler="kvm")
        ).pod_sandbox_id
        cid = self.rt.CreateContainer(
            api.CreateContainerRequest(pod_sandbox_id=sid, config=ccfg, sandbox_config=cfg)
        ).container_id
        self.rt.StartContainer(api.StartContainerRequest(container_id=cid))
        status = api.ContainerStatusRequest(container_id=cid)

        def running() -> bool:
            return self.rt.ContainerStatus(status).status.state == api.CONTAINER_RUNNING

        wait_for(f"container {cid} RUNNING", running, 300, 0.001)
        return sid, cid, time.perf_counter() - t0

    def remove(self, sid: str, cid: str) -> None:
        self.rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=0))
        self.rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid))


def floor(conn: libvirt.virConnect, inactive_xml: str) -> float:
    root = ET.fromstring(inactive_xml)
    root.find("name").text = f"bench-floor-{uuid.uuid4().hex[:8]}"  # type: ignore[union-attr]
    root.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
    return time_create_xml(conn, ET.tostring(root, encoding="unicode"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--vms", type=int, default=5)
    ap.add_argument("--image", default=IMAGE)
    args = ap.parse_args()
    paths = Paths.default()
    if not BY_NAME["edgevirt-cri"].process(paths).pid():
        sys.exit("edgevirt-cri of the local cluster is not running: deploy/local/up")
    import build_vm_disk
    import yaml

    build_vm_disk.push(build_vm_disk.build_vm_disk(), args.image)
    # an edgevirt-cri of its own with the cluster's kvm options: kubelet stops sandboxes it does not
    # know on its own endpoint
    kvm = yaml.safe_load((paths.etc / "edgevirt-cri.yaml").read_text())["backends"]["kvm"]
    proc = ShimProcess.create(paths.containerd_sock)
    kvm["options"]["state_dir"] = str(proc.root / "kvm")
    proc.extra_config = {
        "backends": {"containerd": {"type": "containerd", "socket": str(paths.containerd_sock)}, "kvm": kvm},
        "handlers": {"": "containerd", "kvm": "kvm"},
    }
    proc.start()
    try:
        return measure(args, Shim(proc.socket), proc.proc.pid)
    finally:
        proc.close()


def measure(args: argparse.Namespace, shim: Shim, pid: int) -> int:
    conn = libvirt.open("qemu:///system")
    tmp = Path("/tmp/edgevirt-bench-kvm")
    # warm: the image cache and QEMU's capabilities (not timed)
    sid, cid, _ = shim.run_vm(tmp, args.image)
    shim.remove(sid, cid)
    rss_idle = status_kib(pid)
    shim_t: list[float] = []
    floor_t: list[float] = []
    for r in range(args.rounds):
        sid, cid, dt = shim.run_vm(tmp, args.image)
        dom = conn.lookupByName(f"edgevirt-{cid[:20]}")
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        dom.destroy()
        if r % 2 == 0:
            shim_t.append(dt)
            floor_t.append(floor(conn, xml))
        else:  # the floor first this time: start a second shim pod after it
            floor_t.append(floor(conn, xml))
            shim.remove(sid, cid)
            sid, cid, dt = shim.run_vm(tmp, args.image)
            shim_t.append(dt)
        shim.remove(sid, cid)
    pods = [shim.run_vm(tmp, args.image) for _ in range(args.vms)]
    time.sleep(2)
    rss_vms = status_kib(pid)
    for sid, cid, _ in pods:
        shim.remove(sid, cid)
    conn.close()
    s50, f50 = statistics.median(shim_t), statistics.median(floor_t)
    s95, f95 = pct(shim_t, 95), pct(floor_t, 95)
    print("| measure | edgevirt-cri (kvm) | virDomainCreateXML of the same domain | ratio |")
    print("|---|---|---|---|")
    print(f"| to RUNNING, p50 | {s50 * 1000:.0f} ms | {f50 * 1000:.0f} ms | {s50 / f50:.2f}x |")
    print(f"| to RUNNING, p95 | {s95 * 1000:.0f} ms | {f95 * 1000:.0f} ms | {s95 / f95:.2f}x |")
    print(f"| shim VmRSS idle (after one warm-up VM pod) | {rss_idle / 1024:.1f} MiB | | |")
    print(f"| shim VmRSS with {args.vms} VM pods running | {rss_vms / 1024:.1f} MiB | | |")
    print(f"\nshim (s): {', '.join(f'{x:.3f}' for x in shim_t)}")
    print(f"floor (s): {', '.join(f'{x:.3f}' for x in floor_t)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
