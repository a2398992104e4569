"""Benchmark of edgevirt-controller (cluster mode) against the real local API server.

Creates N VirtualMachines (most stopped, a few running) in a fresh namespace, starts the
controller as a subprocess and measures

* the time until every VM has a status for its current generation (all reconciled), and
* the controller's resident memory (VmRSS once settled, and VmHWM, the peak).

References, measured in the same run: the time a plain client needs for the minimum API work of
the same job (one list, then one status patch per VM, serially, no decisions), and the RSS of a
bare Python process that has imported the kubernetes client. Results are printed as a Markdown
section for bench/RESULTS.md.

    .venv/bin/python bench/vmcrd/bench_controller.py [--vms 200] [--running 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from benchkit import status_kib  # noqa: E402
from helpers import processes  # noqa: E402
from helpers.controller import CONTROLLER  # noqa: E402
from helpers.tokens import service_account_kubeconfig  # noqa: E402
from helpers.waiting import wait_for  # noqa: E402
from kubernetes import client  # noqa: E402

from vmcrd import api  # noqa: E402
from vmcrd.kube import api_client  # noqa: E402

KUBECONFIG = REPO / ".local/kubeconfig"
KUBECTL = [str(REPO / ".local/bin/kubectl"), "--kubeconfig", str(KUBECONFIG)]


def make_vms(custom: client.CustomObjectsApi, ns: str, n: int, running: int) -> None:
    for i in range(n):
        body = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": f"vm{i:03d}"},
            # the running ones are pinned to a node that does not exist: their pods stay Pending
            # (Unschedulable), so the bench measures the controller, not this node's kubelet
            "spec": {"running": i < running, "image": "127.0.0.1:5000/vm/alpine-disk:3.20", "memory": "64Mi"}
            | ({"nodeName": "bench-no-such-node"} if i < running else {}),
        }
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL, body)


def all_reconciled(custom: client.CustomObjectsApi, ns: str, n: int) -> bool:
    items = custom.list_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL)["items"]
    done = [
        v for v in items if (v.get("status") or {}).get("observedGeneration") == v["metadata"]["generation"]
    ]
    return len(done) == n


def controller_round(custom, ns: str, n: int, kubeconfig: Path) -> tuple[float, int, int]:
    """One cold start of cluster mode, as its service account (``kubeconfig``), until all ``n`` VMs
    are reconciled; (seconds, RSS KiB, peak RSS KiB)."""
    t0 = time.monotonic()
    lease = f"bench-{uuid.uuid4().hex[:6]}"
    p = subprocess.Popen(
        [
            CONTROLLER,
            "--mode",
            "cluster",
            "--kubeconfig",
            str(kubeconfig),
            "--namespace",
            ns,
            "--lease-namespace",
            "edgevirt-system",  # where its Role lets it keep a Lease
            "--lease-name",
            lease,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def reconciled() -> bool:
        if p.poll() is not None:
            raise SystemExit(f"controller exited with {p.returncode}")
        return all_reconciled(custom, ns, n)

    try:
        wait_for(f"all {n} VMs reconciled", reconciled, 600, 0.1)
        elapsed = time.monotonic() - t0
        time.sleep(2.0)  # settle, then read memory
        rss, hwm = status_kib(p.pid), status_kib(p.pid, "VmHWM")
    finally:
        processes.stop(p, grace=30)
        subprocess.run(
            [*KUBECTL, "delete", "lease", lease, "-n", "edgevirt-system", "--ignore-not-found"],
            capture_output=True,
            timeout=60,
        )
    return elapsed, rss, hwm


def reset_status(custom, ns: str) -> None:
    """Clear every VM's status, so the next round has to reconcile all of them again."""
    for v in custom.list_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL)["items"]:
        custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, ns, api.PLURAL, v["metadata"]["name"], {"status": None}
        )


def reference_round(custom, ns: str) -> float:
    """Minimum API work of a reconcile of all VMs: one list + one status patch each, serially."""
    t0 = time.monotonic()
    items = custom.list_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL)["items"]
    for v in items:
        custom.patch_namespaced_custom_object_status(
            api.GROUP,
            api.VERSION,
            ns,
            api.PLURAL,
            v["metadata"]["name"],
            {"status": {"printableStatus": "Stopped"}},
        )
    return time.monotonic() - t0


def bare_client_rss() -> int:
    code = (
        "import kubernetes, pathlib;"
        "s = pathlib.Path('/proc/self/status').read_text().splitlines();"
        "print([l for l in s if l.startswith('VmRSS')][0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return int(out.split()[1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--running", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    ac = api_client(str(KUBECONFIG))
    core, custom = client.CoreV1Api(ac), client.CustomObjectsApi(ac)
    ns = f"bench-vmcrd-{uuid.uuid4().hex[:6]}"
    kc = service_account_kubeconfig(
        KUBECTL, KUBECONFIG, "edgevirt-controller", Path(tempfile.mkdtemp(prefix=ns)) / "kubeconfig"
    )
    core.create_namespace({"metadata": {"name": ns}})
    ctl, ref, rss, hwm = [], [], [], []
    try:
        print(f"creating {a.vms} VirtualMachines in {ns} ({a.running} running) ...", file=sys.stderr)
        make_vms(custom, ns, a.vms, a.running)
        for r in range(a.rounds):  # alternate controller and reference
            reset_status(custom, ns)
            ref.append(reference_round(custom, ns))
            reset_status(custom, ns)
            e, r_, h = controller_round(custom, ns, a.vms, kc)
            ctl.append(e)
            rss.append(r_)
            hwm.append(h)
            print(
                f"round {r + 1}: controller {e:.2f}s rss {r_} KiB; reference {ref[-1]:.2f}s", file=sys.stderr
            )
        base = bare_client_rss()
    finally:
        # the controller is stopped: drop its finalizers (no node-local state: nothing was placed)
        for v in custom.list_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL)["items"]:
            custom.patch_namespaced_custom_object(
                api.GROUP,
                api.VERSION,
                ns,
                api.PLURAL,
                v["metadata"]["name"],
                {"metadata": {"finalizers": None}},
            )
        core.delete_namespace(ns)
    med = statistics.median
    print(
        json.dumps(
            {
                "vms": a.vms,
                "running": a.running,
                "controller_s": ctl,
                "reference_s": ref,
                "rss_kib": rss,
                "hwm_kib": hwm,
                "bare_client_rss_kib": base,
            }
        ),
        file=sys.stderr,
    )
    today = dt.date.today().isoformat()
    cmd = f".venv/bin/python bench/vmcrd/bench_controller.py --vms {a.vms} --running {a.running}"
    cmd += f" --rounds {a.rounds}"
    t_ctl, t_ref = med(ctl), med(ref)
    lines = [
        "## VirtualMachine controller",
        "",
        f"{today}, `{cmd}` (real local API server; the controller is started fresh each round with every",
        f"VM's status cleared; median of {a.rounds} alternating rounds).",
        "",
        "| measure | edgevirt-controller | reference | ratio |",
        "|---|---|---|---|",
        f"| time until all {a.vms} VMs reconciled (from process start: imports, list, watch) | {t_ctl:.2f} s "
        f"| {t_ref:.2f} s (one list + {a.vms} serial status patches, no logic) | {t_ctl / t_ref:.2f}x |",
        f"| resident memory once settled (VmRSS) | {med(rss) / 1024:.1f} MiB "
        f"| {base / 1024:.1f} MiB (bare Python + `import kubernetes`) | {med(rss) / base:.2f}x |",
        f"| peak resident memory (VmHWM) | {med(hwm) / 1024:.1f} MiB | | |",
        "",
        f"{a.vms - a.running} VMs stopped, {a.running} running (pinned to a missing node, so their pods stay",
        "Pending: the controller's work is measured, not kubelet's). Per VM and round the controller writes",
        "twice (status, one Event for the transition; plus the finalizer in round 1), the reference once.",
        f"Per round: controller {', '.join(f'{x:.2f}' for x in ctl)} s;",
        f"reference {', '.join(f'{x:.2f}' for x in ref)} s.",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
