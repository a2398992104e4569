"""Benchmark of edgevirt-cri's containerd passthrough against containerd itself, in the same run.

One private containerd (tests/helpers/containerd.py: own root, socket, pod network) and one
edgevirt-cri in front of it. The same Python gRPC client (stubs generated from cri-api) calls both
endpoints, alternating call by call, so client cost and machine noise fall on both sides alike:

- lifecycle: RunPodSandbox + CreateContainer + StartContainer of a runc busybox pod (timed as one),
  then Stop/Remove (not timed);
- list: ListPodSandbox and ListContainers (no filter) with `--pods` pods running;
- the shim's resident memory (VmRSS) idle after start, and after the benchmark.

Usage: .venv/bin/python bench/cri/bench.py [--rounds 20] [--pods 50] [--list-calls 300] [--json OUT]
Prints a Markdown table for bench/RESULTS.md (section "## edgevirt-cri").
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "deploy" / "local"))
sys.path.insert(0, str(REPO))

from benchkit import pct, status_kib  # noqa: E402
from helpers.containerd import PrivateContainerd  # noqa: E402
from helpers.shim import Shim  # noqa: E402

from cri_shim import protos  # noqa: E402

api = protos.api()
from cri_shim._generated import api_pb2_grpc  # noqa: E402

IMAGE = "docker.io/library/busybox:latest"


class Client:
    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.img = api_pb2_grpc.ImageServiceStub(self.channel)


def pod_config(tmp: Path, name: str) -> api.PodSandboxConfig:
    logdir = tmp / name
    logdir.mkdir(parents=True, exist_ok=True)
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, namespace="bench", uid=uuid.uuid4().hex),
        log_directory=str(logdir),
        linux=api.LinuxPodSandboxConfig(),
    )


def start_pod(c: Client, tmp: Path, name: str) -> tuple[str, str]:
    cfg = pod_config(tmp, name)
    sid = c.rt.RunPodSandbox(
        api.RunPodSandboxRequest(config=cfg, runtime_handler="runc"), timeout=120
    ).pod_sandbox_id
    ccfg = api.ContainerConfig(
        metadata=api.ContainerMetadata(name="main"),
        image=api.ImageSpec(image=IMAGE),
        command=["sleep", "3600"],
        log_path="main.log",
        linux=api.LinuxContainerConfig(),
    )
    cid = c.rt.CreateContainer(
        api.CreateContainerRequest(pod_sandbox_id=sid, config=ccfg, sandbox_config=cfg), timeout=120
    ).container_id
    c.rt.StartContainer(api.StartContainerRequest(container_id=cid), timeout=120)
    return sid, cid


def remove_pod(c: Client, sid: str) -> None:
    c.rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    c.rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)


def summary(name: str, direct: list[float], shim: list[float]) -> dict:
    d50, s50 = statistics.median(direct), statistics.median(shim)
    return {
        "measure": name,
        "n": len(direct),
        "containerd_p50_ms": d50 * 1e3,
        "containerd_p95_ms": pct(direct, 95) * 1e3,
        "shim_p50_ms": s50 * 1e3,
        "shim_p95_ms": pct(shim, 95) * 1e3,
        "ratio_p50": s50 / d50,
        "added_p50_ms": (s50 - d50) * 1e3,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20, help="lifecycle runs per endpoint")
    ap.add_argument("--pods", type=int, default=50, help="pods running during the List benchmark")
    ap.add_argument("--list-calls", type=int, default=300, help="calls per List method and endpoint")
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args()
    tmp = Path("/var/tmp") / f"edgevirt-cri-bench-{uuid.uuid4().hex[:6]}"
    ctd = PrivateContainerd.create()
    shim = None
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv}
    try:
        ctd.start()
        shim = Shim.create(ctd.socket).start()
        direct, via = Client(f"unix://{ctd.socket}"), Client(shim.endpoint)
        direct.img.PullImage(api.PullImageRequest(image=api.ImageSpec(image=IMAGE)), timeout=300)
        time.sleep(2)
        results["shim_rss_idle_kib"] = status_kib(shim.proc.pid)
        # Warm-up: first calls set up connections and caches on both sides.
        for c in (direct, via):
            remove_pod(c, start_pod(c, tmp, f"warm-{uuid.uuid4().hex[:6]}")[0])
        life: dict[str, list[float]] = {"direct": [], "shim": []}
        for i in range(args.rounds):
            order = [("direct", direct), ("shim", via)] if i % 2 == 0 else [("shim", via), ("direct", direct)]
            for key, c in order:
                t0 = time.perf_counter()
                sid, _ = start_pod(c, tmp, f"life-{key}-{i}")
                life[key].append(time.perf_counter() - t0)
                remove_pod(c, sid)
        results["lifecycle"] = summary(
            "RunPodSandbox + CreateContainer + StartContainer", life["direct"], life["shim"]
        )
        sids = [start_pod(direct if i % 2 else via, tmp, f"list-{i}")[0] for i in range(args.pods)]
        lists = {}
        for method, req in (
            ("ListPodSandbox", api.ListPodSandboxRequest()),
            ("ListContainers", api.ListContainersRequest()),
        ):
            t: dict[str, list[float]] = {"direct": [], "shim": []}
            for i in range(args.list_calls):
                order = (
                    [("direct", direct), ("shim", via)] if i % 2 == 0 else [("shim", via), ("direct", direct)]
                )
                for key, c in order:
                    t0 = time.perf_counter()
                    resp = getattr(c.rt, method)(req, timeout=60)
                    t[key].append(time.perf_counter() - t0)
                    n = len(resp.items if method == "ListPodSandbox" else resp.containers)
                    assert n == args.pods, f"{method} via {key} returned {n} items, expected {args.pods}"
            lists[method] = summary(f"{method} ({args.pods} pods)", t["direct"], t["shim"])
        results["list"] = lists
        results["shim_rss_after_kib"] = status_kib(shim.proc.pid)
        for sid in sids:
            remove_pod(direct, sid)
    finally:
        if shim is not None:
            shim.close()
        ctd.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [results["lifecycle"], *results["list"].values()]
    print(f"date: {results['date']}; command: {' '.join(['.venv/bin/python', *sys.argv])}")
    print("| measure | n | containerd p50 / p95 | edgevirt-cri p50 / p95 | ratio (p50) | added (p50) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['measure']} | {r['n']} | {r['containerd_p50_ms']:.2f} / {r['containerd_p95_ms']:.2f} ms "
            f"| {r['shim_p50_ms']:.2f} / {r['shim_p95_ms']:.2f} ms | {r['ratio_p50']:.3f}x "
            f"| {r['added_p50_ms']:+.2f} ms |"
        )
    print(
        f"edgevirt-cri resident memory: {results['shim_rss_idle_kib'] / 1024:.1f} MiB idle after start, "
        f"{results['shim_rss_after_kib'] / 1024:.1f} MiB after the benchmark"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
