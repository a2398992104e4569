"""Runs critest (cri-tools, pinned in deploy/versions.env) against containerd directly and against
edgevirt-cri in front of that same containerd, in one run, and compares the results per spec.

Both endpoints use a private containerd (own root, socket and pod network, see
tests/helpers/containerd.py), so critest never touches the shared local cluster's pods or images.
The images critest pulls are built locally and pushed to the local registry first
(deploy/cri/critest_images.py); the local registry must be running (deploy/local/up registry).

Usage: python deploy/cri/run_critest.py [--focus REGEX] [--skip REGEX] [--out DIR]
Writes DIR/{containerd,edgevirt-cri}.json (ginkgo JSON reports) and logs, prints pass/fail/skip
counts for both endpoints and every spec whose outcome differs. Exit 1 if the shim fails a spec
containerd passes.

``--runtime-handler kvm`` instead runs critest with that handler against an edgevirt-cri of its own
whose kvm backend has the local cluster's options (VM network, libvirtd; `deploy/local/up` first)
and prints which specs pass: critest's containers are busybox images, which are not VM disks, so
only specs that need no container of their own can pass there.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "deploy" / "local"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import critest_images  # noqa: E402
from helpers.containerd import PrivateContainerd  # noqa: E402
from helpers.shim import Shim  # noqa: E402

CRITEST = str(REPO / ".local" / "bin" / "critest")
# The one test image that cannot exist offline: it is named by the digest of upstream bytes.
DEFAULT_SKIP = r"public image with digest"


def run_critest(
    endpoint: str, report: Path, focus: str | None, skip: str, log: Path, handler: str = ""
) -> int:
    argv = [
        CRITEST,
        *([f"--runtime-handler={handler}"] if handler else []),
        f"--runtime-endpoint={endpoint}",
        f"--image-endpoint={endpoint}",
        f"--ginkgo.json-report={report}",
        "--ginkgo.no-color",
        f"--ginkgo.skip={skip}",
    ]
    if focus:
        argv.append(f"--ginkgo.focus={focus}")
    print(f"[run-critest] {' '.join(argv)}  (log {log})", flush=True)
    with open(log, "wb") as f:
        return subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=report.parent).returncode


def outcomes(report: Path) -> dict[str, str]:
    """spec full text -> passed|failed|skipped|pending|..."""
    out: dict[str, str] = {}
    for suite in json.loads(report.read_text()):
        for spec in suite.get("SpecReports") or []:
            if spec.get("LeafNodeType") != "It":
                continue
            name = " ".join([*spec.get("ContainerHierarchyTexts", []), spec.get("LeafNodeText", "")])
            out[name] = spec.get("State", "unknown")
    return out


def counts(res: dict[str, str]) -> dict[str, int]:
    c: dict[str, int] = {}
    for state in res.values():
        c[state] = c.get(state, 0) + 1
    return c


def run_both(focus: str | None, skip: str, out: Path) -> dict[str, dict[str, str]]:
    """critest against a fresh private containerd, then against edgevirt-cri in front of it."""
    out.mkdir(parents=True, exist_ok=True)
    ctd = PrivateContainerd.create()
    shim = None
    results: dict[str, dict[str, str]] = {}
    try:
        ctd.start()
        shim = Shim.create(ctd.socket).start()
        for name, endpoint in (("containerd", f"unix://{ctd.socket}"), ("edgevirt-cri", shim.endpoint)):
            t0 = time.monotonic()
            rc = run_critest(endpoint, out / f"{name}.json", focus, skip, out / f"{name}.log")
            results[name] = outcomes(out / f"{name}.json")
            print(
                f"[run-critest] {name}: exit {rc}, {counts(results[name])} in {time.monotonic() - t0:.0f}s",
                flush=True,
            )
    finally:
        if shim is not None:
            (out / "edgevirt-cri.server.log").write_bytes(shim.log.read_bytes() if shim.log.exists() else b"")
            shim.close()
        ctd.close()
    return results


def compare(focus: str | None, skip: str, out: Path) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(containerd's outcomes, the shim's, specs the shim fails that containerd passes). A spec that
    differs is run once more on both endpoints (critest has timing-sensitive specs, e.g. OOM on 2
    busy cores); it counts only if it differs again."""
    critest_images.ensure()
    results = run_both(focus, skip, out)
    ref, ours = results["containerd"], results["edgevirt-cri"]
    worse = sorted(k for k, v in ref.items() if v == "passed" and ours.get(k) != "passed")
    if worse:
        print(f"[run-critest] running {len(worse)} differing spec(s) once more on both endpoints", flush=True)
        again = run_both("|".join(re.escape(k.rsplit("] ", 1)[-1]) for k in worse), skip, out / "retry")
        still = [
            k
            for k in worse
            if again["containerd"].get(k) == "passed" and again["edgevirt-cri"].get(k) != "passed"
        ]
        for k in sorted(set(worse) - set(still)):
            print(f"[run-critest] flaky (passed on the second run): {k}")
        worse = still
    return ref, ours, worse


def run_kvm(focus: str | None, skip: str, out: Path, handler: str) -> int:
    """critest with ``handler`` against a private edgevirt-cri carrying the cluster's kvm backend."""
    import yaml

    critest_images.ensure()
    out.mkdir(parents=True, exist_ok=True)
    cluster_cfg = Path("/var/lib/edgevirt/local-cluster/etc/edgevirt-cri.yaml")
    if not cluster_cfg.is_file():
        sys.exit(f"{cluster_cfg} missing: bring the local cluster up first (deploy/local/up)")
    kvm = yaml.safe_load(cluster_cfg.read_text())["backends"]["kvm"]
    ctd = PrivateContainerd.create()
    shim = None
    try:
        ctd.start()
        shim = Shim.create(ctd.socket)
        kvm = {**kvm, "options": {**kvm["options"], "state_dir": str(shim.root / "kvm")}}
        shim.extra_config = {
            "backends": {"containerd": {"type": "containerd", "socket": str(ctd.socket)}, handler: kvm},
            "handlers": {"": "containerd", "runc": "containerd", handler: handler},
        }
        shim.start()
        rc = run_critest(shim.endpoint, out / f"{handler}.json", focus, skip, out / f"{handler}.log", handler)
        res = outcomes(out / f"{handler}.json")
    finally:
        if shim is not None:
            (out / "edgevirt-cri.server.log").write_bytes(shim.log.read_bytes() if shim.log.exists() else b"")
            shim.close()
        ctd.close()
    for state in ("passed", "failed"):
        for k in sorted(k for k, v in res.items() if v == state):
            print(f"[run-critest] {handler}: {state}: {k}")
    print(f"[run-critest] {handler}: exit {rc}, {counts(res)}; reports in {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime-handler", default="", help="run against the kvm backend with this handler")
    ap.add_argument("--focus")
    ap.add_argument("--skip", default=DEFAULT_SKIP)
    ap.add_argument("--out", default=str(REPO / ".local" / "critest" / time.strftime("%Y%m%dT%H%M%S")))
    args = ap.parse_args()
    out = Path(args.out)
    if args.runtime_handler:
        return run_kvm(args.focus, args.skip, out, args.runtime_handler)
    ref, ours, worse = compare(args.focus, args.skip, out)
    differ = sorted(k for k in set(ref) | set(ours) if ref.get(k) != ours.get(k))
    for k in differ:
        print(f"[run-critest] differs: {k}: containerd={ref.get(k)} edgevirt-cri={ours.get(k)}")
    for k in sorted(k for k, v in ref.items() if v != "passed" and v != "skipped"):
        print(f"[run-critest] containerd itself: {ref[k]}: {k}")
    print(f"[run-critest] reports in {out}")
    if worse:
        for k in worse:
            print(f"[run-critest] edgevirt-cri fails, containerd passes: {k}")
        print(f"[run-critest] edgevirt-cri fails {len(worse)} spec(s) containerd passes")
        return 1
    print("[run-critest] edgevirt-cri passes every spec containerd passes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
