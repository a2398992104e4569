"""Benchmark of a VirtualMachine's start and stop through the whole chain on the local cluster:
``kubectl patch`` (running true/false) -> the installed controllers (both modes, as
``deploy/local/install-edgevirt`` put them) -> kubelet -> edgevirt-cri's kvm handler -> libvirt, with
two references measured in the same run.

Per cycle, for one VM (the bootable test disk, 256 MiB, TCG):

* patch ``spec.running=true`` -> ``status.printableStatus`` Running (the VM pod runs: QEMU started),
  and -> condition Ready;
* patch ``spec.running=false`` -> Stopped with no pod left (ACPI shutdown of the booted guest
  included);
* floor, right after the VM is Ready: ``virDomainCreateXML`` (what ``virsh create`` does) of the
  VM's own domain XML, renamed, with a new UUID and a fresh overlay on the same base image, without
  the NIC and the seed (both are held by the running VM), until the domain is active;
* a container's start on the same node, through the same kubelet and edgevirt-cri: a plain pod
  (runtimeClassName runc, busybox ``sleep``) created -> phase Running, then deleted (untimed). It
  carries what every pod start costs here (the scheduler, kubelet's sync and its 1 s PLEG relist).

Then a burst: ``--burst`` VMs patched from Halted to Running at once, time until all are Running.

Usage: .venv/bin/python bench/vmcrd/bench_lifecycle.py [--cycles 10] [--burst 10]
Needs `deploy/local/up` and `deploy/local/install-edgevirt`. Prints a Markdown section for
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deploy" / "local"))
sys.path.insert(0, str(REPO / "deploy" / "images"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from benchkit import pct, time_create_xml  # noqa: E402
from helpers.vm_env import VM_IMAGE as IMAGE  # noqa: E402
from helpers.waiting import TimedOut, wait_for  # noqa: E402
from kubernetes import client  # noqa: E402
from localcluster import clusterside  # noqa: E402
from localcluster.paths import Paths  # noqa: E402

from vmcrd import api  # noqa: E402
from vmcrd.kube import api_client  # noqa: E402

KUBECONFIG = REPO / ".local/kubeconfig"
KUBECTL = [str(REPO / ".local/bin/kubectl"), "--kubeconfig", str(KUBECONFIG)]
RUNC_IMAGE = "127.0.0.1:5000/library/busybox:1.35.0"  # the local registry has it (deploy/local/up)


class Bench:
    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.custom = client.CustomObjectsApi(api_client(str(KUBECONFIG)))
        self.core = client.CoreV1Api(self.custom.api_client)

    def vm(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, self.ns, api.PLURAL, name)

    def patch(self, name: str, spec: dict) -> None:
        self.custom.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, self.ns, api.PLURAL, name, {"spec": spec}
        )

    def create(self, name: str, **spec: object) -> None:
        """A stopped VM of the test disk, 256 MiB; ``spec`` adds or overrides spec fields."""
        body = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": name},
            "spec": {"running": False, "image": IMAGE, "memory": "256Mi", **spec},
        }
        self.custom.create_namespaced_custom_object(api.GROUP, api.VERSION, self.ns, api.PLURAL, body)

    def wait(self, what: str, check, timeout: float = 300, interval: float = 0.02) -> float:
        """When ``check`` first held (time.monotonic()); a wait that runs out ends the benchmark."""
        try:
            return wait_for(what, lambda: check() and time.monotonic(), timeout, interval)
        except TimedOut as e:
            raise SystemExit(str(e)) from None

    def status(self, name: str) -> dict:
        return self.vm(name).get("status") or {}

    def ready(self, name: str) -> bool:
        return any(
            c["type"] == "Ready" and c["status"] == "True" for c in self.status(name).get("conditions", [])
        )

    def console(self, name: str) -> str:
        try:
            return self.core.read_namespaced_pod_log(f"{name}-vm", self.ns)
        except client.ApiException:
            return ""

    def pods(self, name: str) -> list:
        return self.core.list_namespaced_pod(self.ns, label_selector=f"edgevirt.io/vm={name}").items

    def runc_pod(self) -> float:
        """A plain runc pod: create -> phase Running (s); deleted again before returning."""
        name = f"runc-{uuid.uuid4().hex[:6]}"
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "runtimeClassName": "runc",
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "c", "image": RUNC_IMAGE, "command": ["sleep", "3600"]}],
            },
        }
        t0 = time.monotonic()
        self.core.create_namespaced_pod(self.ns, body)
        t1 = self.wait(
            "the runc pod Running",
            lambda: self.core.read_namespaced_pod(name, self.ns).status.phase == "Running",
        )
        self.core.delete_namespaced_pod(name, self.ns, grace_period_seconds=0)
        self.wait(
            "the runc pod gone",
            lambda: not self.core.list_namespaced_pod(self.ns, field_selector=f"metadata.name={name}").items,
            120,
            0.2,
        )
        return t1 - t0


def floor(conn: libvirt.virConnect, uid: str, tmp: Path) -> float:
    dom = next(d for d in conn.listAllDomains() if uid in d.XMLDesc(0) and d.isActive())
    root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    root.find("name").text = f"bench-floor-{uuid.uuid4().hex[:8]}"  # type: ignore[union-attr]
    root.find("uuid").text = str(uuid.uuid4())  # type: ignore[union-attr]
    devices = root.find("devices")
    assert devices is not None
    for el in list(devices):
        if el.tag == "interface" or (el.tag == "disk" and el.get("device") == "cdrom"):
            devices.remove(el)
    if (
        cmdline := root.find("qemu:commandline", {"qemu": "http://libvirt.org/schemas/domain/qemu/1.0"})
    ) is not None:
        root.remove(cmdline)  # the tap-fd netdev of the removed NIC
    disk = next(d for d in devices.iter("disk") if d.get("device") == "disk")
    src = disk.find("source")
    assert src is not None
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", src.get("file", "")],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    )
    overlay = tmp / f"{uuid.uuid4().hex[:8]}.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            info.get("backing-filename-format", "qcow2"),
            "-b",
            info["backing-filename"],
            str(overlay),
        ],
        check=True,
        timeout=120,
    )
    src.set("file", str(overlay))
    for log in root.iter("log"):  # the serial console's log file is held by the running VM
        log.set("file", str(tmp / f"{overlay.stem}.console.log"))
    emulator = devices.find("emulator")
    if emulator is not None:
        emulator.text = "/usr/bin/qemu-system-x86_64"  # no NIC: the tap-fd wrapper has nothing to do
    dt = time_create_xml(conn, ET.tostring(root, encoding="unicode"))
    overlay.unlink()
    return dt


def measure(b: Bench, cycles: int, burst_size: int) -> tuple[list, list, list, list, list, float]:
    """(running, ready, stop, floor, runc, burst) seconds: the cycles of one VM, then the burst."""
    conn = libvirt.open("qemu:///system")
    running: list[float] = []
    ready: list[float] = []
    stop: list[float] = []
    floor_t: list[float] = []
    runc: list[float] = []
    logs = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    try:
        b.create("bench")
        uid = b.vm("bench")["metadata"]["uid"]
        for _ in range(cycles + 1):  # the first cycle warms the image cache (not counted)
            t0 = time.monotonic()
            b.patch("bench", {"running": True})
            t_run = b.wait("Running", lambda: b.status("bench").get("printableStatus") == "Running")
            t_ready = b.wait("Ready", lambda: b.ready("bench"))
            f = floor(conn, uid, logs)
            # stop a booted guest (an ACPI button before the guest listens would wait out the grace
            # period): wait, untimed, for its console to say it is up
            b.wait("the guest up", lambda: "EDGEVIRT-GUEST: up" in b.console("bench"), 300, 0.5)
            t1 = time.monotonic()
            b.patch("bench", {"running": False})
            t_stop = b.wait(
                "Stopped",
                lambda: b.status("bench").get("printableStatus") == "Stopped" and not b.pods("bench"),
            )
            runc.append(b.runc_pod())  # the VM is stopped: the node is as quiet as for the VM's start
            running.append(t_run - t0)
            ready.append(t_ready - t0)
            stop.append(t_stop - t1)
            floor_t.append(f)
        running, ready, stop, floor_t, runc = running[1:], ready[1:], stop[1:], floor_t[1:], runc[1:]
        names = [f"burst{i:02d}" for i in range(burst_size)]
        for n in names:
            b.create(n)
        t0 = time.monotonic()
        for n in names:
            b.patch(n, {"running": True})
        t_burst = b.wait(
            "the burst Running",
            lambda: all(b.status(n).get("printableStatus") == "Running" for n in names),
            600,
            0.2,
        )
        burst = t_burst - t0
    finally:
        conn.close()
    return running, ready, stop, floor_t, runc, burst


@contextlib.contextmanager
def installed_controllers_namespace(prefix: str) -> Iterator[Bench]:
    """A fresh namespace on the local cluster with edgevirt installed (both controller modes ready,
    the test disk pushed); on exit its VMs are deleted (finalizers run) and it goes."""
    import build_vm_disk

    paths = Paths.default()
    node = subprocess.run(["hostname"], capture_output=True, text=True, timeout=60).stdout.strip()
    for mode, where in (("cluster", None), ("node", node)):
        if not clusterside.controller_pods(paths, mode, where):
            raise SystemExit(f"no {mode}-mode controller is ready: run deploy/local/install-edgevirt first")
    build_vm_disk.push(build_vm_disk.build_vm_disk(), IMAGE)
    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    subprocess.run([*KUBECTL, "create", "namespace", ns], check=True, capture_output=True, timeout=120)
    try:
        wait_for(
            "the default service account",
            lambda: (
                subprocess.run(
                    [*KUBECTL, "get", "sa", "default", "-n", ns], capture_output=True, timeout=60
                ).returncode
                == 0
            ),
            60,
        )
        yield Bench(ns)
    finally:
        subprocess.run([*KUBECTL, "delete", "vm", "--all", "-n", ns, "--wait=true", "--timeout=300s"],
                       capture_output=True, timeout=330)  # fmt: skip
        subprocess.run(
            [*KUBECTL, "delete", "namespace", ns, "--wait=false"], capture_output=True, timeout=120
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--burst", type=int, default=10)
    args = ap.parse_args()
    with installed_controllers_namespace("bench-vm") as b:
        running, ready, stop, floor_t, runc, burst = measure(b, args.cycles, args.burst)
    f50, r50 = statistics.median(floor_t), statistics.median(runc)
    print(f"| measure ({args.cycles} cycles) | p50 | p95 | p50 / virDomainCreateXML | p50 / runc pod |")
    print("|---|---|---|---|---|")
    for label, xs in (
        ("patch running=true -> Running", running),
        ("patch running=true -> Ready", ready),
        ("patch running=false -> Stopped, pod gone", stop),
        ("floor: virDomainCreateXML of the same domain -> active", floor_t),
        ("reference: a runc pod created -> Running", runc),
    ):
        p50 = statistics.median(xs)
        print(f"| {label} | {p50:.2f} s | {pct(xs, 95):.2f} s | {p50 / f50:.2f}x | {p50 / r50:.2f}x |")
    print(f"| burst: {args.burst} VMs Halted -> all Running | {burst:.2f} s | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
