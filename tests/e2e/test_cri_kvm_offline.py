"""Edge autonomy at the CRI level: crictl against a private edgevirt-cri of this checkout (the kvm
handler's logic; tests/e2e/test_edge_autonomy.py is the same through kubelet), with its own
containerd and a cold VM disk cache of its own, on the local cluster's libvirtd and VM network.

* QEMU killed (kill -9): the container is EXITED with exit 139 (libvirt: shut off, crashed); a new
  container in the same sandbox (what kubelet does, attempt 1) boots the same disks (a VM's data disk
  still holds what the earlier boot wrote; a plain pod's root overlay is the same file) with the same
  MAC and IP, answering ping; removing the ended container leaves the shared disks alone.
* containerDisks come from containerd's store: with the local registry stopped, an image containerd
  holds is taken out of its content store into the cold disk cache and boots; an image name that
  resolves only through containerd's hosts.toml mirror config works; an image missing everywhere
  fails naming the registry (unreachable, or without that image).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from helpers.vm_env import domain_names, qemu_pid
from helpers.waiting import wait_for as wait
from localcluster.components import BY_NAME
from test_cri_kvm import VM_LAN, PrivateKvmShim, container_json, disk_sources, leftovers

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

TOKEN = re.compile(r"EDGEVIRT-GUEST: data vdb had (\S+) now (boot-[0-9a-f]+)")
#: a name no registry has: containerd's hosts.toml for quay.io mirrors it to the local registry
MIRRORED = "quay.io/vm/test-disk:1"


@pytest.fixture(scope="module")
def cri(cluster, tmp_path_factory):
    """A private edgevirt-cri + containerd whose kvm handler keeps VM disks and images of its own."""
    vm_state = tmp_path_factory.mktemp("vm-state")
    p = PrivateKvmShim(cluster, vm_state_dir=str(vm_state))
    try:
        yield p.start()
    finally:
        for sid in p("pods", "-q", check=False).stdout.split():
            p("rmp", "-f", sid, check=False)
        print(p.shim.log.read_text()[-4000:])
        p.shim.close()
        p.containerd.close()


@pytest.fixture
def pods(cri, tmp_path):
    """Writes pod configs; removes their sandboxes (and so their domains) after the test."""
    made: list[str] = []

    def pod(annotations: dict[str, str] | None = None) -> tuple[Path, dict]:
        uid = str(uuid.uuid4())
        cfg = {
            "metadata": {"name": f"e2e-off-{uid[:6]}", "namespace": "e2e", "uid": uid, "attempt": 0},
            "log_directory": str(tmp_path / "pods" / uid),
            "annotations": annotations or {},
            "linux": {},
        }
        path = tmp_path / f"pod-{uid}.json"
        path.write_text(json.dumps(cfg))
        return path, cfg

    yield pod, made
    for sid in made:
        cri("rmp", "-f", sid, check=False)


def attempt_json(tmp: Path, image: str, attempt: int) -> Path:
    """The container config kubelet sends for restart number ``attempt`` of container ``vm``."""
    path = container_json(tmp, image, name="vm")
    ctr = json.loads(path.read_text())
    ctr["metadata"]["attempt"] = attempt
    ctr["log_path"] = f"vm/{attempt}.log"
    out = tmp / f"vm-{attempt}.json"
    out.write_text(json.dumps(ctr))
    return out


def inspect(cri, cid: str) -> dict:
    return json.loads(cri("inspect", cid).stdout)["status"]


def pings(ip: str) -> bool:
    r = subprocess.run(
        ["ip", "netns", "exec", VM_LAN, "ping", "-c", "2", "-W", "2", ip], capture_output=True, timeout=60
    )
    return r.returncode == 0


def vm_disk_files(domain: str) -> list[str]:
    return sorted(f for f in disk_sources(domain) if "/disks/" in f)


@pytest.mark.parametrize("kind", ["vm", "plain"])
def test_a_killed_vm_comes_back_in_the_same_sandbox_on_its_disks_with_its_ip(cri, vm_image, pods, kind):
    pod, made = pods
    ann = {}
    if kind == "vm":  # a VirtualMachine's pod: a data disk the test guest writes a token to
        vols = [{"name": "data", "emptyDisk": {"capacity": "16Mi"}}]
        vm_uid = str(uuid.uuid4())
        ann = {
            "edgevirt.io/vm-uid": vm_uid,
            "edgevirt.io/image": vm_image,
            "edgevirt.io/volumes": json.dumps(vols),
        }
    pod_path, cfg = pod(ann)
    tmp = pod_path.parent
    sid = cri("runp", "--runtime", "kvm", str(pod_path)).stdout.strip()
    made.append(sid)
    ip = json.loads(cri("inspectp", sid).stdout)["status"]["network"]["ip"]
    first = cri("create", sid, str(attempt_json(tmp, vm_image, 0)), str(pod_path)).stdout.strip()
    cri("start", first)
    logs0 = wait(
        "the first boot", lambda: (t := cri("logs", first).stdout) and "EDGEVIRT-GUEST: up" in t and t, 300, 2
    )
    dom0 = f"edgevirt-{first[:20]}"
    pid0 = qemu_pid(dom0)
    assert pid0, dom0
    os.kill(pid0, signal.SIGKILL)
    st = wait(
        "the container to end",
        lambda: (s := inspect(cri, first))["state"] == "CONTAINER_EXITED" and s,
        60,
        0.5,
    )
    assert (st["exitCode"], st["reason"]) == (139, "Error"), st  # libvirt: shut off, reason crashed
    assert "crashed" in st["message"]
    # what kubelet does for restartPolicy Always/OnFailure: a new container in the same sandbox
    second = cri("create", sid, str(attempt_json(tmp, vm_image, 1)), str(pod_path)).stdout.strip()
    cri("start", second)
    logs1 = wait(
        "the VM to boot again with its IP",
        lambda: (
            (t := cri("logs", second).stdout) and f"EDGEVIRT-GUEST: ip eth0 {ip}/24" in t and "up" in t and t
        ),
        300,
        2,
    )
    dom1 = f"edgevirt-{second[:20]}"
    assert qemu_pid(dom1) not in (None, pid0)
    assert vm_disk_files(dom1) == vm_disk_files(dom0) and vm_disk_files(dom0)  # the same disk files
    if kind == "vm":
        (_, token0) = TOKEN.search(logs0).groups()
        had, _ = TOKEN.search(logs1).groups()
        assert had == token0, logs1  # the guest reads what its earlier boot wrote to its data disk
    assert pings(ip)
    # kubelet removes the ended container later: its domain goes, the shared disks stay
    cri("rm", first)
    assert dom0 not in domain_names("edgevirt-")
    assert all(Path(f).exists() for f in vm_disk_files(dom1)) and pings(ip)
    assert inspect(cri, second)["state"] == "CONTAINER_RUNNING"
    cri("stop", "--timeout", "60", second)
    cri("stopp", sid)
    cri("rmp", sid)
    made.remove(sid)
    assert leftovers(cri.options, sid, second, ("e2e", cfg["metadata"]["uid"])) == []
    if kind == "vm":
        from cri_shim.vm.disks import DiskManager

        DiskManager(Path(cri.options["vm_state_dir"])).remove_vm_disks("e2e", vm_uid)


def cold_cache(cri) -> None:
    """Forget every disk this shim took out of an image (no VM of this module runs now)."""
    images = Path(cri.options["vm_state_dir"]) / "images"
    for d in (images / "refs", images / "blobs" / "sha256"):
        for f in d.iterdir():
            f.unlink()


def test_container_disks_come_from_containerds_store_with_the_registry_stopped(cri, cluster, vm_image, pods):
    pod, made = pods
    cri("pull", vm_image)  # what kubelet does before CreateContainer
    cri("pull", MIRRORED)  # containerd resolves quay.io through its hosts.toml mirror
    cold_cache(cri)
    registry = BY_NAME["registry"].process(cluster.paths)
    assert registry.stop()
    try:
        for image in (vm_image, MIRRORED):
            pod_path, _ = pod()
            sid = cri("runp", "--runtime", "kvm", str(pod_path)).stdout.strip()
            made.append(sid)
            cid = cri(
                "create", sid, str(attempt_json(pod_path.parent, image, 0)), str(pod_path)
            ).stdout.strip()
            cri("start", cid)
            wait(f"{image} to boot", lambda c=cid: "EDGEVIRT-GUEST: up" in cri("logs", c).stdout, 300, 2)
            cri("rmp", "-f", sid)
            made.remove(sid)
        assert "from containerd's content store" in cri.shim.log.read_text()
        pod_path, _ = pod()
        sid = cri("runp", "--runtime", "kvm", str(pod_path)).stdout.strip()
        made.append(sid)
        r = cri(
            "create",
            sid,
            str(attempt_json(pod_path.parent, "127.0.0.1:5000/vm/none:1", 0)),
            str(pod_path),
            check=False,
        )
        assert r.returncode != 0
        assert "could not pull it from registry 127.0.0.1:5000: the registry cannot be reached" in r.stderr, (
            r.stderr
        )
    finally:
        res = cluster.up("registry")
        assert res.returncode == 0, res.stdout + res.stderr
    r = cri(
        "create",
        sid,
        str(attempt_json(pod_path.parent, "127.0.0.1:5000/vm/none:1", 0)),
        str(pod_path),
        check=False,
    )
    assert r.returncode != 0
    assert "could not pull it from registry 127.0.0.1:5000: the registry has no such image" in r.stderr, (
        r.stderr
    )
    assert json.loads(cri("ps", "-a", "-p", sid, "-o", "json").stdout)["containers"] == []
