"""Where a node process's memory goes before it does any work, offline (no cluster): each entry
point's startup replayed step by step in a fresh interpreter (its imports, and the objects it builds
before its first API call), with VmRSS, ``[heap]`` and anonymous memory after every step.

Entry points: the node-mode controller (``vmcrd.cli`` + ``NodeController``), the labeller
(``cri_shim.node.cli`` label: ``KubeNodeApi`` from a kubeconfig, plus the CRI Status client and the
probe it uses on every pass), the cluster-mode controller, edgevirt-cri's serving imports and the
macvtap daemon's worker imports. The API clients are built against a dummy kubeconfig
(https://127.0.0.1:1): building them sends nothing.

``--root DIR`` replays inside a root filesystem (e.g. the edgevirt image's, unpacked) with its
``/usr/bin/python3``: this checkout's packages are copied to DIR/tmp/edgevirt-src and put first on
the path, the rest (kubernetes, grpc ...) is the image's; without it, this interpreter and its
site-packages. Bytecode is never written by the replay (PYTHONDONTWRITEBYTECODE=1): whether .pyc
files are used is whatever the root holds; ``--bytecode`` compiles the copied checkout too (as
``compileall --invalidation-mode unchecked-hash`` would in an image that ships bytecode).

Usage: .venv/bin/python bench/node/bench_imports.py [--root DIR [--bytecode]] [--tracemalloc]
       [--only node,labeller,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cni_macvtap", "cri_shim", "vmcrd", "runtimeclass")
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""

#: entry point -> its startup steps (Python statements, run in order in one interpreter)
STEPS: dict[str, list[str]] = {
    "node": [
        "import vmcrd.cli",
        # run_node's client: the thin one of cri_shim.kube_http (node mode never imports kubernetes)
        "from cri_shim.kube_http import client_from_config; kube = client_from_config(KUBECONFIG)",
        "import vmcrd.node",
        "ctl = vmcrd.node.NodeController(kube, 'n', state_dir=TMP)",
        "import vmcrd.ops; vmcrd.ops.instrument('node', ctl.runner, vm_filter=ctl.mine)",
        # the disk collector's pass on a node without VMs: the disk layer alone (vmcrd.diskgc)
        "ctl.disks.vm_disk_owners()",
        # the libvirt layer as NodeController.manager builds it on its first VM (DomainManager aside:
        # it connects to libvirtd)
        "from pathlib import Path; from cri_shim.vm import ImageStore;"
        " from cri_shim.vm.containerd_source import DEFAULT_ROOT, ContainerdSource;"
        " ImageStore(Path(TMP), container_disks=ContainerdSource(None, DEFAULT_ROOT))",
        "from cri_shim.vm import DomainManager; import libvirt",  # what connects to libvirtd
    ],
    "labeller": [
        "import cri_shim.node.cli",
        "from cri_shim.node.kubeapi import KubeNodeApi; api = KubeNodeApi(KUBECONFIG)",
        "import cri_shim.node.labeller",  # its CRI Status call runs in a child (cri_shim.node.cri_status)
        "import runtimeclass.probe",
    ],
    "cluster": [
        "import vmcrd.cli",
        "ac = vmcrd.kube.api_client(KUBECONFIG)",
        "from vmcrd.controller import ClusterController; ctl = ClusterController(ac, identity='i')",
        "from vmcrd.leader import LeaderElector; from kubernetes import client;"
        " LeaderElector(client.CoordinationV1Api(ac), 'ns', 'l', 'i')",
    ],
    "edgevirt-cri": [
        "import cri_shim.cli",
        "import grpc; from cri_shim import protos; protos.api()",
        "import cri_shim.server, cri_shim.router, cri_shim.metrics, cri_shim.readiness",
        "import cri_shim.backends.loader",
        "import cri_shim.kvm.handler",
    ],
    "macvtap worker": [
        "import cni_macvtap.cli, cni_macvtap.daemon",
        "import cni_macvtap.plugin, cni_macvtap.add, cni_macvtap.metrics",
        "import pyroute2",
    ],
}

CHILD = r"""
import json, os, sys, time, tracemalloc
KUBECONFIG, TMP = sys.argv[1], sys.argv[2]
if os.environ.get("BENCH_TRACEMALLOC"):
    tracemalloc.start(1)
def mem():
    rss = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS'))
    heap = anon = 0; cur = ''
    for l in open('/proc/self/smaps'):
        f = l.split()
        if not f[0].endswith(':'):
            cur = f[5] if len(f) > 5 else ''
        elif f[0] == 'Rss:' and cur == '[heap]':
            heap += int(f[1])
        elif f[0] == 'Anonymous:':
            anon += int(f[1])
    return rss, heap, anon
out = [["(python)", *mem(), len(sys.modules), 0.0]]
for step in json.loads(sys.argv[3]):
    t = time.perf_counter(); exec(step); dt = time.perf_counter() - t
    out.append([step, *mem(), len(sys.modules), dt])
tops = {}
for n in sys.modules:
    tops[n.split('.')[0]] = tops.get(n.split('.')[0], 0) + 1
traced = [x / 2**20 for x in tracemalloc.get_traced_memory()] if tracemalloc.is_tracing() else None
print(json.dumps({"steps": out, "tops": sorted(tops.items(), key=lambda x: -x[1])[:12], "traced": traced}))
"""


def replay(name: str, steps: list[str], root: Path | None, work: Path, trace: bool) -> dict:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    if trace:
        env["BENCH_TRACEMALLOC"] = "1"
    if root is None:
        (work / "kubeconfig").write_text(KUBECONFIG)
        cmd = [sys.executable, "-c", CHILD, str(work / "kubeconfig"), str(work), json.dumps(steps)]
        env["PYTHONPATH"] = f"{REPO}:{REPO / 'deploy' / 'local'}"
    else:
        inner = Path("/tmp/edgevirt-src")
        (root / "tmp" / "kubeconfig").write_text(KUBECONFIG)
        args = ["/usr/bin/python3", "-c", CHILD, "/tmp/kubeconfig", "/tmp", json.dumps(steps)]
        # a private mount namespace with its own /proc: nothing stays mounted afterwards
        script = f'mount -t proc proc {root}/proc && exec chroot {root} "$@"'
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *args]
        env["PYTHONPATH"] = str(inner)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    if res.returncode != 0:
        sys.exit(f"{name}: the replay failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def copy_checkout(root: Path, bytecode: bool) -> None:
    dest = root / "tmp" / "edgevirt-src"
    shutil.rmtree(dest, ignore_errors=True)
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dest / pkg, symlinks=False, ignore=shutil.ignore_patterns("__pycache__"))
    if bytecode:  # with the root's own Python: its bytecode is the one that interpreter loads
        code = "import compileall, py_compile, sys; compileall.compile_dir(sys.argv[1], quiet=2, "
        code += "invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)"
        subprocess.run(["chroot", str(root), "/usr/bin/python3", "-c", code, "/tmp/edgevirt-src"], check=True)


def report(name: str, result: dict) -> None:
    print(f"\n{name}: | step | RSS MiB | +RSS | [heap] | anon | modules | s |")
    print("|---|---|---|---|---|---|---|")
    prev = None
    for step, rss, heap, anon, mods, dt in result["steps"]:
        delta = "" if prev is None else f"+{(rss - prev) / 1024:.1f}"
        cells = [
            f"{rss / 1024:.1f}",
            delta,
            f"{heap / 1024:.1f}",
            f"{anon / 1024:.1f}",
            str(mods),
            f"{dt:.2f}",
        ]
        print(f"| `{step[:70]}` | " + " | ".join(cells) + " |")
        prev = rss
    print("modules by package: " + ", ".join(f"{k} {v}" for k, v in result["tops"]))
    if result.get("traced"):
        now, peak = result["traced"]
        print(f"tracemalloc: {now:.1f} MiB of Python allocations live at the end, {peak:.1f} MiB at the peak")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, help="replay inside this root filesystem (the image's, unpacked)")
    ap.add_argument("--bytecode", action="store_true", help="with --root: compile the copied checkout")
    ap.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace Python's allocations (live and peak at the end; RSS figures then include its cost)",
    )
    ap.add_argument("--only", default=",".join(STEPS), help=f"comma-separated of: {', '.join(STEPS)}")
    args = ap.parse_args()
    if args.root:
        copy_checkout(args.root, args.bytecode)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-imports-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.only.split(","):
            report(name, replay(name, STEPS[name], args.root, work, args.tracemalloc))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
