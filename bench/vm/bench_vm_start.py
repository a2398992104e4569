"""Benchmark of a VM pod's start, CreateContainer -> RUNNING, with a cold and a warm disk cache, with
the disk of the OCI image taken from containerd's store (the kvm handler) or downloaded again with
skopeo (the former path, kept in bench/vm/skopeo_source.py only).

Two edgevirt-cri processes of their own (this checkout), one per source, with the local cluster's kvm
options, each with a VM state dir of its own (its disk cache), both in front of the cluster's
containerd (which holds the image, as after kubelet's pull; `deploy/local/up` first). Per round and
source, alternating which goes first: RunPodSandbox (not timed), then CreateContainer +
StartContainer until ContainerStatus says RUNNING; cold: the source's disk cache emptied before.
Then, with the cluster's registry stopped, one cold start per source (skopeo cannot).

Usage: .venv/bin/python bench/vm/bench_vm_start.py [--rounds 5] [--image REF]
Prints a Markdown table for bench/RESULTS.md (section "## VM start: disk cache and image source").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[2]
for p in (REPO, REPO / "deploy/local", REPO / "tests", REPO / "bench", REPO / "bench/vm"):
    sys.path.insert(0, str(p))

from benchkit import pct  # noqa: E402
from helpers.shim import Shim as ShimProcess  # noqa: E402
from helpers.vm_env import VM_IMAGE  # noqa: E402
from helpers.waiting import wait_for  # noqa: E402
from localcluster.components import BY_NAME  # noqa: E402
from localcluster.paths import Paths  # noqa: E402

from cri_shim import protos  # noqa: E402
from cri_shim._generated import api_pb2_grpc  # noqa: E402

api = protos.api()
FACTORIES = {"containerd": "cri_shim.kvm:create", "skopeo": "skopeo_source:create"}


class KvmShim:
    """A private edgevirt-cri whose kvm backend takes images from ``source``."""

    def __init__(self, paths: Paths, source: str) -> None:
        import yaml

        kvm = yaml.safe_load((paths.etc / "edgevirt-cri.yaml").read_text())["backends"]["kvm"]
        self.proc = ShimProcess.create(paths.containerd_sock)
        self.vm_state = self.proc.root / "vm"
        kvm["factory"] = FACTORIES[source]
        kvm["options"].update(
            state_dir=str(self.proc.root / "kvm"),
            vm_state_dir=str(self.vm_state),
            containerd_socket=str(paths.containerd_sock),
            containerd_root=str(paths.data / "containerd"),
        )
        self.proc.extra_config = {
            "backends": {
                "containerd": {"type": "containerd", "socket": str(paths.containerd_sock)},
                "kvm": kvm,
            },
            "handlers": {"": "containerd", "kvm": "kvm"},
        }
        self.proc.start()
        self.rt = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(f"unix://{self.proc.socket}"))

    def cold(self) -> None:
        """Empty the disk cache (no VM of this shim runs)."""
        images = self.vm_state / "images"
        for d in (images / "refs", images / "blobs" / "sha256"):
            for f in d.iterdir() if d.is_dir() else ():
                f.unlink()

    def start_vm(self, image: str) -> tuple[str, str, float]:
        name = f"bench-start-{uuid.uuid4().hex[:6]}"
        logs = Path("/tmp/edgevirt-bench-start") / name
        logs.mkdir(parents=True, exist_ok=True)
        cfg = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, namespace="bench", uid=uuid.uuid4().hex),
            log_directory=str(logs),
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
        t0 = time.perf_counter()
        cid = self.rt.CreateContainer(
            api.CreateContainerRequest(pod_sandbox_id=sid, config=ccfg, sandbox_config=cfg), timeout=900
        ).container_id
        self.rt.StartContainer(api.StartContainerRequest(container_id=cid))
        status = api.ContainerStatusRequest(container_id=cid)
        wait_for(
            "RUNNING",
            lambda: self.rt.ContainerStatus(status).status.state == api.CONTAINER_RUNNING,
            300,
            0.001,
        )
        return sid, cid, time.perf_counter() - t0

    def remove(self, sid: str, cid: str) -> None:
        self.rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=0))
        self.rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid))

    def timed(self, image: str, cold: bool) -> float:
        if cold:
            self.cold()
        sid, cid, dt = self.start_vm(image)
        self.remove(sid, cid)
        return dt

    def close(self) -> None:
        self.proc.close()


def offline(paths: Paths, shims: dict[str, KvmShim], image: str) -> dict[str, str]:
    """One cold start per source with the cluster's registry stopped."""
    out = {}
    registry = BY_NAME["registry"].process(paths)
    registry.stop()
    try:
        for source, shim in shims.items():
            try:
                out[source] = f"{shim.timed(image, cold=True) * 1000:.0f} ms"
            except grpc.RpcError as e:
                out[source] = f"fails: {e.details()[:90]}"
    finally:
        import subprocess

        subprocess.run(
            [str(REPO / "deploy/local/up"), "registry"], capture_output=True, timeout=600, check=True
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--image", default=VM_IMAGE)
    args = ap.parse_args()
    paths = Paths.default()
    if not BY_NAME["containerd"].process(paths).pid():
        sys.exit("the local cluster's containerd is not running: deploy/local/up")
    import build_vm_disk

    build_vm_disk.push(build_vm_disk.build_vm_disk(), args.image)
    from helpers.crictl import Crictl

    Crictl(f"unix://{paths.containerd_sock}", binary=paths.tool("crictl"))(
        "pull", args.image
    )  # kubelet's pull
    os.environ["PYTHONPATH"] = str(REPO / "bench" / "vm")  # the skopeo shim's factory
    shims: dict[str, KvmShim] = {}
    try:
        for source in FACTORIES:
            shims[source] = KvmShim(paths, source)
        times: dict[tuple[str, bool], list[float]] = {(s, c): [] for s in FACTORIES for c in (True, False)}
        for shim in shims.values():
            shim.timed(args.image, cold=True)  # QEMU capabilities, first connections (not timed)
        for r in range(args.rounds):
            order = list(FACTORIES) if r % 2 == 0 else list(reversed(FACTORIES))
            for cold in (True, False):
                for source in order:
                    times[(source, cold)].append(shims[source].timed(args.image, cold))
        off = offline(paths, shims, args.image)
    finally:
        for shim in shims.values():
            shim.close()
    report(times, off, args.rounds)
    return 0


def report(times: dict[tuple[str, bool], list[float]], off: dict[str, str], rounds: int) -> None:
    print("| CreateContainer -> RUNNING | containerd's store | skopeo (former) | ratio p50 |")
    print("|---|---|---|---|")
    for cold in (True, False):
        c, s = times[("containerd", cold)], times[("skopeo", cold)]
        label = "cold disk cache" if cold else "warm disk cache"
        c50, s50 = statistics.median(c), statistics.median(s)
        both = (f"{x50 * 1000:.0f} / {pct(xs, 95) * 1000:.0f} ms" for x50, xs in ((c50, c), (s50, s)))
        print(f"| {label}, p50 / p95 ({rounds} rounds) | {' | '.join(both)} | {c50 / s50:.2f}x |")
    print(f"| cold disk cache, the registry stopped | {off['containerd']} | {off['skopeo']} | |")
    for (source, cold), xs in times.items():
        print(f"\n{source} {'cold' if cold else 'warm'} (s): {', '.join(f'{x:.3f}' for x in xs)}")


if __name__ == "__main__":
    sys.exit(main())
