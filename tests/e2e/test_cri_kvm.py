"""The kvm handler of edgevirt-cri on the local cluster, with real libvirt/QEMU (TCG here), the macvtap
CNI plugin on the cluster's VM network (master evvm0; its LAN is the netns edgevirt-vmnet, 10.245.0.1)
and the bootable test disk as an OCI containerDisk in the local registry.

* crictl: runp --runtime kvm, inspectp (IP), create, start, ps, logs (the guest's boot markers), the
  guest answers ping from the VM network's LAN with the IP of the CNI result (it reads it from the
  NoCloud seed), exec in the guest, stop (ACPI: the guest powers off, exit 0), rm, rmp:
  nothing left (netns, tap device node, domain, overlay, IP, record).
* bad input: an image outside the allowed roots and a malformed VM annotation are refused with the
  field named, leaving nothing behind.
* a hostile pod author (the kvm handler trusts nothing it is told): a VM UID copied into a pod of
  another namespace gets disks of its own; every skopeo transport but docker:// is refused and
  leaves nothing in /var/tmp; oversize and too many disks are refused; another namespace's hostDisk
  is refused; secret user data reaches the guest from the pod's own volume only.
* crictl events (GetContainerEvents, what kubelet's evented PLEG reads): every step of a VM pod,
  and a VM whose QEMU was killed as a stop with exit code 139 (crashed) at once.
* kubelet: a pod with runtimeClassName kvm reaches Running, `kubectl logs` shows the boot; kill -9 of
  the shim restarts nothing; deleting the pod leaves nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from helpers.attaching import attach_and_type
from helpers.containerd import PrivateContainerd
from helpers.crictl import Crictl
from helpers.shim import Shim
from helpers.vm_env import domain_names, qemu_pid
from helpers.waiting import wait_for as wait
from localcluster.components import BY_NAME

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

VM_LAN = "edgevirt-vmnet"


def kvm_options(cluster) -> dict:
    cfg = yaml.safe_load((cluster.paths.etc / "edgevirt-cri.yaml").read_text())
    return cfg["backends"]["kvm"]["options"]


def kvm_available(crictl: Crictl, log_file: Path) -> None:
    info = crictl.json("info", "-o", "json")
    names = {h.get("name", "") for h in info.get("runtimeHandlers") or []}
    if "kvm" not in names:
        log = log_file.read_text()[-3000:]
        raise AssertionError(f"edgevirt-cri does not serve the kvm handler on this node; its log:\n{log}")


def leftovers(opts: dict, sid: str, cid: str | None, pod: tuple[str, str] | None = None) -> list[str]:
    """What a removed kvm pod must not leave behind (``opts``: the kvm backend's options; ``pod``:
    its namespace and UID, whose disks go with it)."""
    conf = json.loads(Path(opts["cni_conflist"]).read_text())
    ipam_dir = Path(conf["plugins"][0]["ipam"].get("dataDir", "/var/lib/cni/networks")) / conf["name"]
    vm_state = Path(opts.get("vm_state_dir") or "/var/lib/edgevirt/vm")
    found = []
    if Path(f"/run/netns/cni-kvm-{sid[:12]}").exists():
        found.append("netns")
    if (Path("/run/edgevirt/macvtap") / sid).exists():
        found.append("tap device node dir")
    if ipam_dir.is_dir():
        for f in ipam_dir.iterdir():
            if f.is_file() and sid in f.read_text(errors="replace"):
                found.append(f"IP {f.name}")
    if (Path(opts["state_dir"]) / "sandboxes" / f"{sid}.json").exists():
        found.append("sandbox record")
    if pod and (vm_state / "disks" / "ns" / pod[0] / "pod" / pod[1]).exists():
        found.append("the pod's disks")
    if cid:
        if f"edgevirt-{cid[:20]}" in domain_names():
            found.append("domain")
        if (vm_state / "disks" / "pod" / cid).exists():
            found.append("overlay (old layout)")
        if (Path(opts["state_dir"]) / "containers" / f"{cid}.json").exists():
            found.append("container record")
    return found


class PrivateKvmShim:
    """An edgevirt-cri of its own (socket, records) with the cluster's kvm backend options: crictl
    pods made here are not kubelet's, and kubelet would stop a sandbox it does not know on its own
    endpoint. Shares libvirtd, the VM network and the VM disk dir with the cluster."""

    def __init__(self, cluster, **options: str) -> None:
        self.options = {**kvm_options(cluster), **options}
        # a containerd of its own too, so a test may stop it without touching the cluster's
        self.containerd = PrivateContainerd.create()
        self.cluster_containerd = cluster.paths.containerd_sock
        self.shim = Shim.create(self.containerd.socket)
        self.options["state_dir"] = str(self.shim.root / "kvm")
        # VM disks of OCI images come from that containerd's image store (it pulls what it lacks)
        self.options["containerd_socket"] = str(self.containerd.socket)
        self.options["containerd_root"] = str(self.containerd.paths.data / "containerd")
        # hostDisks and kubelet's pod volumes of this shim's own (the node's are the cluster's)
        self.host_disk_root = self.shim.root / "hostdisks"
        self.kubelet_root = self.shim.root / "kubelet"
        self.options["host_disk_root"] = str(self.host_disk_root)
        self.options["kubelet_root_dir"] = str(self.kubelet_root)
        self.shim.extra_config = {
            "backends": {
                "containerd": {"type": "containerd", "socket": str(self.containerd.socket)},
                "kvm": {"type": "plugin", "factory": "cri_shim.kvm:create", "options": self.options},
            },
            "handlers": {"": "containerd", "runc": "containerd", "kvm": "kvm"},
        }
        # long crictl timeouts: create pulls the VM disk, stop waits for the guest's ACPI shutdown
        self.crictl = Crictl(
            self.shim.endpoint, binary=str(cluster.paths.tool("crictl")), request_timeout="240s", timeout=300
        )

    def start(self) -> PrivateKvmShim:
        self.containerd.start()
        self.shim.start()
        kvm_available(self.crictl, self.shim.log)
        return self

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # crictl checks the image API before any command; with our containerd (the only image
        # backend) stopped, that check goes to the cluster's containerd instead
        ie = "" if self.containerd.running() else f"unix://{self.cluster_containerd}"
        return self.crictl.with_image_endpoint(ie)(*args, check=check)


@pytest.fixture(scope="module")
def cri(cluster):
    p = PrivateKvmShim(cluster)
    try:
        yield p.start()
    finally:
        for sid in p("pods", "-q", check=False).stdout.split():
            p("rmp", "-f", sid, check=False)
        print(p.shim.log.read_text()[-4000:])
        p.shim.close()
        p.containerd.close()


@pytest.fixture
def pod_files(cri, tmp_path):
    name = f"e2e-kvm-{uuid.uuid4().hex[:6]}"
    uid = str(uuid.uuid4())
    # not under /var/log/pods: kubelet removes pod log directories of pods it does not know
    logdir = tmp_path / "pods" / f"e2e_{name}_{uid}"
    pod = {
        "metadata": {"name": name, "namespace": "e2e", "uid": uid, "attempt": 0},
        "log_directory": str(logdir),
        "linux": {},
    }
    (tmp_path / "pod.json").write_text(json.dumps(pod))
    made: list[str] = []
    try:
        yield tmp_path, pod, made
    finally:
        for sid in made:
            cri("rmp", "-f", sid, check=False)
        subprocess.run(["rm", "-rf", str(logdir)], check=False, timeout=60)


def container_json(tmp_path: Path, image: str, name: str = "vm", mounts: list | None = None) -> Path:
    ctr = {
        "mounts": mounts or [],
        "metadata": {"name": name},
        "image": {"image": image},
        "log_path": f"{name}/0.log",
        "linux": {
            "resources": {
                "memory_limit_in_bytes": 256 * 1024 * 1024,
                "cpu_quota": 100000,
                "cpu_period": 100000,
            }
        },
    }
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(ctr))
    return p


def test_crictl_runs_a_vm_pod_that_boots_answers_ping_and_leaves_nothing(cri, vm_image, pod_files):
    tmp, pod, made = pod_files
    sid = cri("runp", "--runtime", "kvm", str(tmp / "pod.json")).stdout.strip()
    made.append(sid)
    status = json.loads(cri("inspectp", sid).stdout)["status"]
    ip = status["network"]["ip"]
    assert ip.startswith("10.245.0."), status
    assert status["state"] == "SANDBOX_READY"
    cid = cri("create", sid, str(container_json(tmp, vm_image)), str(tmp / "pod.json")).stdout.strip()
    cri("start", cid)
    ps = json.loads(cri("ps", "--id", cid, "-o", "json").stdout)["containers"]
    assert [c["state"] for c in ps] == ["CONTAINER_RUNNING"]
    # "up" is the guest init's last line, written after it configured eth0: wait for it, then
    # check the address it configured (waiting on the address line raced the "up" after it)
    wait("the guest to come up", lambda: "EDGEVIRT-GUEST: up" in cri("logs", cid).stdout, 300, 2)
    logs = cri("logs", cid).stdout
    assert f"EDGEVIRT-GUEST: ip eth0 {ip}/24" in logs, logs
    ping = subprocess.run(
        ["ip", "netns", "exec", VM_LAN, "ping", "-c", "3", "-W", "2", ip],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    stats = json.loads(cri("stats", "--id", cid, "-o", "json").stdout)["stats"]
    assert int(stats[0]["cpu"]["usageCoreNanoSeconds"]["value"]) > 0
    # exec runs in the guest through its agent (tests/e2e/test_cri_kvm_exec.py has the details)
    wait("exec in the guest", lambda: cri("exec", "--sync", cid, "true", check=False).returncode == 0, 120, 1)
    # Attach is the serial console, both ways: the test guest says back each line it reads. Two
    # attaches in a row: a detach leaves the VM and its console as they were.
    for word in ("first-attach", "second-attach"):
        out = attach_and_type(
            [cri.crictl.binary, "--config", "/dev/null", "-r", cri.shim.endpoint, "attach", "-i", cid], word
        )
        assert f"EDGEVIRT-GUEST: echo {word}" in out, out
    assert [c["state"] for c in json.loads(cri("ps", "--id", cid, "-o", "json").stdout)["containers"]] == [
        "CONTAINER_RUNNING"
    ]
    cri("stop", "--timeout", "60", cid)
    st = json.loads(cri("inspect", cid).stdout)["status"]
    assert (st["state"], st["exitCode"], st["reason"]) == ("CONTAINER_EXITED", 0, "Completed"), st
    assert "EDGEVIRT-GUEST: acpi power button" in cri("logs", cid).stdout
    cri("rm", cid)
    cri("stopp", sid)
    assert json.loads(cri("inspectp", sid).stdout)["status"]["state"] == "SANDBOX_NOTREADY"
    cri("rmp", sid)
    made.remove(sid)
    assert leftovers(cri.options, sid, cid, ("e2e", pod["metadata"]["uid"])) == []


def test_bad_input_is_refused_naming_the_field_and_leaves_nothing(cri, pod_files):
    tmp, pod, made = pod_files
    before = domain_names()
    sid = cri("runp", "--runtime", "kvm", str(tmp / "pod.json")).stdout.strip()
    made.append(sid)
    r = cri(
        "create",
        sid,
        str(container_json(tmp, "file:///etc/passwd")),
        str(tmp / "pod.json"),
        check=False,
    )
    assert r.returncode != 0
    assert "image" in r.stderr and "outside the node's image roots" in r.stderr, r.stderr
    assert json.loads(cri("ps", "-a", "-p", sid, "-o", "json").stdout)["containers"] == []
    assert domain_names() == before
    cri("rmp", "-f", sid)
    made.remove(sid)
    assert leftovers(cri.options, sid, None) == []

    bad = dict(pod, annotations={"edgevirt.io/vm-uid": "u-1", "edgevirt.io/image": ""})
    (tmp / "bad.json").write_text(json.dumps(bad))
    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    r = cri("runp", "--runtime", "kvm", str(tmp / "bad.json"), check=False)
    assert r.returncode != 0 and "edgevirt.io/image" in r.stderr, r.stderr
    assert (set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()) == netns_before


def test_containerd_down_and_a_libvirtd_restart_leave_vm_pods_running(cri, cluster, vm_image, pod_files):
    """Stop containerd: runc calls fail naming containerd, the VM pod keeps working. Restart libvirtd:
    the VM keeps running (same QEMU), its status stays RUNNING throughout and recovers its stats."""
    tmp, _pod, made = pod_files
    sid = cri("runp", "--runtime", "kvm", str(tmp / "pod.json")).stdout.strip()
    made.append(sid)
    ip = json.loads(cri("inspectp", sid).stdout)["status"]["network"]["ip"]
    cid = cri("create", sid, str(container_json(tmp, vm_image)), str(tmp / "pod.json")).stdout.strip()
    cri("start", cid)
    wait("the guest to come up", lambda: "EDGEVIRT-GUEST: up" in cri("logs", cid).stdout, 300, 2)

    def pings() -> bool:
        r = subprocess.run(
            ["ip", "netns", "exec", VM_LAN, "ping", "-c", "1", "-W", "2", ip], capture_output=True, timeout=60
        )
        return r.returncode == 0

    def state() -> str:
        return json.loads(cri("inspect", cid).stdout)["status"]["state"]

    cri.containerd.stop()
    try:
        runc_pod = tmp / "runc.json"
        runc_pod.write_text(
            json.dumps({**_pod, "metadata": {**_pod["metadata"], "name": "runc-" + _pod["metadata"]["name"]}})
        )
        r = cri("runp", "--runtime", "runc", str(runc_pod), check=False)
        assert r.returncode != 0 and "containerd" in r.stderr and "unavailable" in r.stderr, r.stderr
        assert state() == "CONTAINER_RUNNING" and pings()
        assert [p["id"] for p in json.loads(cri("pods", "-o", "json").stdout)["items"]] == [sid]
    finally:
        cri.containerd.start()

    proc = BY_NAME["libvirtd"].process(cluster.paths)
    pid, qemu_before = proc.pid(), _qemu_pids()
    assert pid, "the local cluster's libvirtd is not running"
    os.kill(pid, signal.SIGTERM)
    wait("libvirtd to stop", lambda: not Path(f"/proc/{pid}").exists(), 30, 0.2)
    assert state() == "CONTAINER_RUNNING" and pings()  # last known state; the guest runs on
    res = cluster.up("libvirtd")
    assert res.returncode == 0, res.stdout + res.stderr
    wait("stats through the new libvirtd", lambda: _cpu(cri, cid) > 0, 60, 1)
    assert state() == "CONTAINER_RUNNING" and pings()
    assert _qemu_pids() == qemu_before  # no VM was restarted
    cri("stop", "--timeout", "60", cid)
    cri("rmp", "-f", sid)
    made.remove(sid)
    assert leftovers(cri.options, sid, cid, ("e2e", _pod["metadata"]["uid"])) == []


def _qemu_pids() -> set[int]:
    out = subprocess.run(
        ["pgrep", "-f", "qemu-system-x86_64"], capture_output=True, text=True, timeout=60
    ).stdout
    return {int(x) for x in out.split()}


def _cpu(cri, cid: str) -> int:
    r = cri("stats", "--id", cid, "-o", "json", check=False)
    if r.returncode != 0:
        return 0
    stats = json.loads(r.stdout).get("stats") or [{}]
    return int(((stats[0].get("cpu") or {}).get("usageCoreNanoSeconds") or {}).get("value") or 0)


# ---------------------------------------------------------------- a hostile pod author (crictl)
#: temporary folders containers/image (skopeo) makes in /var/tmp unless TMPDIR says otherwise
SKOPEO_TMP = re.compile(r"^(oci|docker-tarfile-blob|container_images_|storage|docker-archive|dir)")
TRANSPORTS = (
    "oci:/var/lib/edgevirt/images/layout:1",
    "oci-archive:/etc/shadow",
    "docker-archive:/etc/shadow",
    "dir:/etc",
    "containers-storage:alpine",
    "docker-daemon:alpine:latest",
)


def skopeo_tmp() -> set[str]:
    return {n for n in os.listdir("/var/tmp") if SKOPEO_TMP.match(n)}


def hostile_pod(tmp: Path, namespace: str, annotations: dict[str, str] | None = None) -> tuple[Path, dict]:
    """A pod config of ``namespace`` (a fresh UID) with ``annotations``."""
    uid = str(uuid.uuid4())
    logdir = tmp / "pods" / f"{namespace}_{uid}"
    pod = {
        "metadata": {"name": f"e2e-{uid[:6]}", "namespace": namespace, "uid": uid, "attempt": 0},
        "log_directory": str(logdir),
        "annotations": annotations or {},
        "linux": {},
    }
    path = tmp / f"pod-{uid}.json"
    path.write_text(json.dumps(pod))
    return path, pod


def disk_sources(domain: str) -> list[str]:
    """The files of a domain's disks (its persistent definition)."""
    import xml.etree.ElementTree as ET

    import libvirt
    from helpers.vm_env import connection

    with connection() as conn:
        xml = conn.lookupByName(domain).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    return [s.get("file", "") for s in ET.fromstring(xml).iterfind("devices/disk/source")]


@pytest.fixture
def vm_disks_of(cri):
    """Removes the VM-scoped disks a test made (they outlive pods: node mode's job otherwise)."""
    from cri_shim.vm.disks import DiskManager

    made: list[tuple[str, str]] = []
    yield made.append
    disks = DiskManager(Path(cri.options.get("vm_state_dir") or "/var/lib/edgevirt/vm"))
    for ns, uid in made:
        disks.remove_vm_disks(ns, uid)


def test_a_vm_uid_copied_into_another_namespace_gets_disks_of_its_own(cri, vm_image, pod_files, vm_disks_of):
    """Finding 1: a pod of namespace B carrying a VM UID of namespace A booted A's disks read-write."""
    tmp, _pod, made = pod_files
    vm_uid = str(uuid.uuid4())
    volumes = [{"name": "data", "emptyDisk": {"capacity": "16Mi"}}]
    ann = {
        "edgevirt.io/vm-uid": vm_uid,
        "edgevirt.io/image": vm_image,
        "edgevirt.io/volumes": json.dumps(volumes),
    }
    vm_state = Path(cri.options.get("vm_state_dir") or "/var/lib/edgevirt/vm")
    sources = {}
    for ns in ("e2e-team-a", "e2e-team-b"):
        vm_disks_of((ns, vm_uid))
        pod_path, _ = hostile_pod(tmp, ns, ann)
        sid = cri("runp", "--runtime", "kvm", str(pod_path)).stdout.strip()
        made.append(sid)
        cid = cri("create", sid, str(container_json(tmp, vm_image)), str(pod_path)).stdout.strip()
        sources[ns] = [f for f in disk_sources(f"edgevirt-{cid[:20]}") if "/disks/" in f]
    for ns, files in sources.items():
        assert len(files) == 2, files  # the root overlay and the emptyDisk
        assert all(f.startswith(f"{vm_state}/disks/ns/{ns}/vm/{vm_uid}/") for f in files), files
    assert not set(sources["e2e-team-a"]) & set(sources["e2e-team-b"])


def test_every_skopeo_transport_is_refused_and_leaves_nothing_in_var_tmp(cri, pod_files):
    """Finding 4: oci:, oci-archive:, dir:, ... reached skopeo (an oci: layout outside the roots booted)."""
    tmp, _pod, made = pod_files
    sid = cri("runp", "--runtime", "kvm", str(tmp / "pod.json")).stdout.strip()
    made.append(sid)
    before, domains = skopeo_tmp(), domain_names()
    for ref in TRANSPORTS:
        r = cri("create", sid, str(container_json(tmp, ref)), str(tmp / "pod.json"), check=False)
        assert r.returncode != 0 and "which the kvm handler does not allow" in r.stderr, r.stderr
        assert "registry reference" in r.stderr
    assert skopeo_tmp() <= before and domain_names() == domains
    assert json.loads(cri("ps", "-a", "-p", sid, "-o", "json").stdout)["containers"] == []


def test_oversize_and_too_many_disks_are_refused(cri, vm_image, pod_files, vm_disks_of):
    """Finding 7: 200 x 16Ti empty disks were accepted."""
    tmp, _pod, made = pod_files
    vm_uid = str(uuid.uuid4())
    vm_disks_of(("e2e", vm_uid))
    huge = [{"name": "big", "emptyDisk": {"capacity": "16Ti"}}]
    ann = {
        "edgevirt.io/vm-uid": vm_uid,
        "edgevirt.io/image": vm_image,
        "edgevirt.io/volumes": json.dumps(huge),
    }
    pod_path, _ = hostile_pod(tmp, "e2e", ann)
    sid = cri("runp", "--runtime", "kvm", str(pod_path)).stdout.strip()
    made.append(sid)
    r = cri("create", sid, str(container_json(tmp, vm_image)), str(pod_path), check=False)
    assert r.returncode != 0 and "16Ti is over this node's limit" in r.stderr and "max_disk_bytes" in r.stderr
    vm_state = Path(cri.options.get("vm_state_dir") or "/var/lib/edgevirt/vm")
    assert not (vm_state / "disks" / "ns" / "e2e" / "vm" / vm_uid).exists()
    many = [{"name": f"d{i}", "emptyDisk": {"capacity": "1Mi"}} for i in range(200)]
    pod_path, _ = hostile_pod(tmp, "e2e", {**ann, "edgevirt.io/volumes": json.dumps(many)})
    r = cri("runp", "--runtime", "kvm", str(pod_path), check=False)
    assert r.returncode != 0 and "lists 200 volumes; use at most 32" in r.stderr, r.stderr


def test_a_hostdisk_of_another_namespace_is_refused(cri, vm_image, pod_files, vm_disks_of):
    """Finding 6: any namespace could use another's hostDisk file, or create files with DiskOrCreate."""
    tmp, _pod, made = pod_files
    root = cri.host_disk_root
    (root / "e2e-team-a").mkdir(parents=True, exist_ok=True)
    (root / "e2e-team-a" / "a.img").write_bytes(b"\0" * 2**20)

    def create(ns: str, host_disk: dict) -> subprocess.CompletedProcess:
        vm_uid = str(uuid.uuid4())  # one VM per pod (one VM's pods share a MAC)
        vm_disks_of((ns, vm_uid))
        vols = [{"name": "h", "hostDisk": host_disk}]
        ann = {
            "edgevirt.io/vm-uid": vm_uid,
            "edgevirt.io/image": vm_image,
            "edgevirt.io/volumes": json.dumps(vols),
        }
        pod_path, _ = hostile_pod(tmp, ns, ann)
        sid = cri("runp", "--runtime", "kvm", str(pod_path)).stdout.strip()
        made.append(sid)
        return cri("create", sid, str(container_json(tmp, vm_image)), str(pod_path), check=False)

    # paths are relative to the VM's namespace folder: another's is out of reach
    r = create("e2e-team-b", {"path": "../e2e-team-a/a.img", "type": "Disk"})
    assert r.returncode != 0 and "is not a clean path" in r.stderr, r.stderr
    r = create("e2e-team-b", {"path": f"{root}/e2e-team-a/a.img", "type": "Disk"})
    assert r.returncode != 0 and "is not a path relative to the namespace's folder" in r.stderr, r.stderr
    r = create("e2e-team-b", {"path": "../e2e-team-a/new.img", "type": "DiskOrCreate", "capacity": "1Mi"})
    assert r.returncode != 0 and not (root / "e2e-team-a" / "new.img").exists()
    r = create("e2e-team-a", {"path": "a.img", "type": "Disk"})
    assert r.returncode == 0, r.stderr  # its own namespace's file: fine (boot-time hostDisk works)
    assert f"{root}/e2e-team-a/a.img" in disk_sources(f"edgevirt-{r.stdout.strip()[:20]}")


def test_secret_user_data_reaches_the_guest_from_the_pods_own_volume_only(cri, vm_image, pod_files):
    """Finding 8: user data from the Secret mounted at /run/edgevirt/cloud-init, not from pod metadata."""
    tmp, pod, made = pod_files
    uid = pod["metadata"]["uid"]
    vol = cri.kubelet_root / "pods" / uid / "volumes" / "kubernetes.io~secret" / "cloud-init"
    vol.mkdir(parents=True)
    (vol / "userdata").write_text("#cloud-config\n# edgevirt.poweroff: 2\n")  # the guest powers off
    mount = [{"container_path": "/run/edgevirt/cloud-init", "host_path": str(vol), "readonly": True}]
    sid = cri("runp", "--runtime", "kvm", str(tmp / "pod.json")).stdout.strip()
    made.append(sid)
    other_path, _ = hostile_pod(tmp, "e2e-team-b")
    other = cri("runp", "--runtime", "kvm", str(other_path)).stdout.strip()
    made.append(other)
    r = cri("create", other, str(container_json(tmp, vm_image, mounts=mount)), str(other_path), check=False)
    assert r.returncode != 0 and "is not a volume of this pod" in r.stderr and str(vol) not in r.stderr
    cid = cri(
        "create", sid, str(container_json(tmp, vm_image, mounts=mount)), str(tmp / "pod.json")
    ).stdout.strip()
    cri("start", cid)

    def ended() -> dict | None:
        st = json.loads(cri("inspect", cid).stdout)["status"]
        return st if st["state"] == "CONTAINER_EXITED" else None

    st = wait("the guest to power off as its secret user data says", ended, 300, 2)
    assert (st["exitCode"], st["reason"]) == (0, "Completed"), st
    records = Path(cri.options["state_dir"])
    assert "edgevirt.poweroff" not in "".join(p.read_text() for p in records.rglob("*.json"))


KVM_POD = """apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  runtimeClassName: kvm
  terminationGracePeriodSeconds: 30
  restartPolicy: Never
  containers:
  - name: vm
    image: {image}
    resources:
      limits: {{cpu: "1", memory: 256Mi}}
      requests: {{cpu: 10m, memory: 256Mi}}  # a 2-core node also runs edgevirt's own pods
"""


def test_kubelet_runs_a_kvm_pod_survives_a_shim_kill9_and_deletes_cleanly(cluster, vm_image):
    kvm_available(cluster.cri(via_shim=True), cluster.paths.logs / "edgevirt-cri.log")
    name = f"e2e-kvm-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("apply", "-f", "-", input=KVM_POD.format(name=name, image=vm_image))
    sid = cid = pod_key = None
    try:
        cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=300s", timeout=320)
        pod = cluster.kubectl_json("get", "pod", name)
        assert pod["status"]["podIP"].startswith("10.245.0.")
        wait(
            "kubectl logs to show the boot",
            lambda: "EDGEVIRT-GUEST: up" in cluster.kubectl("logs", name, check=False).stdout,
            300,
            2,
        )
        sb = cluster.cri(via_shim=True).json("pods", "--name", name, "-o", "json")["items"]
        sid = sb[0]["id"]
        pod_key = ("default", pod["metadata"]["uid"])
        cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]

        proc = BY_NAME["edgevirt-cri"].process(cluster.paths)
        pid = proc.pid()
        os.kill(pid, signal.SIGKILL)
        wait("edgevirt-cri to die", lambda: not Path(f"/proc/{pid}").exists(), 10, 0.1)
        res = cluster.up("edgevirt-cri")
        assert res.returncode == 0, res.stdout + res.stderr
        time.sleep(25)  # several kubelet sync periods through the new shim
        after = cluster.kubectl_json("get", "pod", name)
        cs = after["status"]["containerStatuses"][0]
        assert cs["containerID"].endswith(cid) and cs["restartCount"] == 0 and "running" in cs["state"]
        assert cluster.cri(via_shim=True).json("inspectp", sid)["status"]["state"] == "SANDBOX_READY"
        # kubectl attach -i: API server -> kubelet -> the shim's streaming server -> the serial console
        kubectl = [str(cluster.paths.tool("kubectl")), "--kubeconfig", str(cluster.paths.kubeconfig)]
        out = attach_and_type([*kubectl, "attach", "-i", name], "kubectl-attach")
        assert "EDGEVIRT-GUEST: echo kubectl-attach" in out, out
    finally:
        cluster.kubectl("delete", "pod", name, "--wait=true", "--timeout=120s", check=False, timeout=150)
    if sid:
        opts = kvm_options(cluster)
        wait("kubelet to remove the sandbox", lambda: leftovers(opts, sid, cid, pod_key) == [], 120, 2)


def test_crictl_events_report_every_step_and_a_killed_vm_at_once(cri, vm_image, pod_files):
    """GetContainerEvents (`crictl events`), what kubelet's evented PLEG reads: each step of a VM
    pod, and QEMU killed with kill -9 as a stop with exit code 139 (crashed), the pod's state in the event."""
    tmp, _pod, made = pod_files
    argv = [cri.crictl.binary, "--config", "/dev/null", "-r", cri.shim.endpoint, "events", "-o", "json"]
    stream = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[dict] = []

    def read_events() -> None:
        buf, dec = "", json.JSONDecoder()
        assert stream.stdout is not None
        for line in stream.stdout:
            buf += line
            with contextlib.suppress(json.JSONDecodeError):
                while buf.strip():
                    obj, end = dec.raw_decode(buf.lstrip())
                    seen.append(obj)
                    buf = buf.lstrip()[end:]

    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()
    try:
        time.sleep(1)  # the stream is open before the pod is made
        sid = cri("runp", "--runtime", "kvm", str(tmp / "pod.json")).stdout.strip()
        made.append(sid)
        cid = cri("create", sid, str(container_json(tmp, vm_image)), str(tmp / "pod.json")).stdout.strip()
        cri("start", cid)
        pid = wait("QEMU of the VM", lambda: qemu_pid(f"edgevirt-{cid[:20]}"), 60)
        os.kill(pid, signal.SIGKILL)

        def stopped() -> dict | None:
            return next(
                (
                    e
                    for e in seen
                    if e.get("containerId") == cid
                    and e.get("containerEventType") == "CONTAINER_STOPPED_EVENT"
                ),
                None,
            )

        ev = wait("the stop event of the killed VM", stopped, 30, 0.2, explain=lambda: f"events: {seen}")
        statuses = {s["id"]: s for s in ev["containersStatuses"]}
        assert statuses[cid]["state"] == "CONTAINER_EXITED" and statuses[cid]["exitCode"] == 139, ev
        assert ev["podSandboxStatus"]["id"] == sid and ev["podSandboxStatus"]["state"] == "SANDBOX_READY"
        steps = [(e["containerId"], e["containerEventType"]) for e in seen]
        assert steps[:4] == [
            (sid, "CONTAINER_CREATED_EVENT"),
            (sid, "CONTAINER_STARTED_EVENT"),
            (cid, "CONTAINER_CREATED_EVENT"),
            (cid, "CONTAINER_STARTED_EVENT"),
        ], steps
        cri("rmp", "-f", sid)
        wait(
            "the pod's deletion event",
            lambda: (
                (sid, "CONTAINER_DELETED_EVENT")
                in [(e["containerId"], e["containerEventType"]) for e in seen]
            ),
            30,
            0.2,
        )
    finally:
        stream.terminate()
        stream.wait(10)
