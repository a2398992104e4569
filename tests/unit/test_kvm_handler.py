"""The kvm handler's bookkeeping with a fake libvirt layer and a fake CNI plugin (the real flows run in
tests/e2e/test_cri_kvm.py): IDs and states survive a restart of the shim, a failure in
CreateContainer removes what it made, a pod left half-made by a kill -9 is undone at start, exit
states never flip back, and bad annotations name the field. And what a hostile pod author cannot
do: reach another namespace's disks, claim old-layout disks, read files through the cloud-init
mount, or learn node paths and digests from error texts; records are private (0600 in 0700)."""

from __future__ import annotations

import dataclasses
import json
import stat
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from cri_shim import protos
from cri_shim.errors import BackendError
from cri_shim.kvm import events, factory, translate
from cri_shim.kvm.contract import CLOUD_INIT_SECRET_PATH
from cri_shim.vm.errors import DomainNotFound, ImageError, VMError
from cri_shim.vm.model import DomainState, DomainStats, VMSpec

api = protos.api()
REPO = Path(__file__).resolve().parents[2]

PLUGIN = """#!/bin/sh
cat > /dev/null
if [ "$CNI_COMMAND" = ADD ]; then
  echo '{"cniVersion":"1.0.0",
  "interfaces":[{"name":"eth0","mac":"02:00:00:00:00:09","sandbox":"'$CNI_NETNS'"}],
  "ips":[{"address":"10.245.0.9/24","gateway":"10.245.0.1","interface":0}]}'
fi
"""


class FakeDomains:
    """The libvirt layer as the handler sees it (cri_shim.kvm.containers.Domains)."""

    def __init__(self) -> None:
        self.domains: dict[str, str] = {}  # name -> phase
        self.fail_create: Exception | None = None
        self.fail_start: Exception | None = None
        self.removed: list[str] = []
        self.specs: dict[str, VMSpec] = {}
        self.legacy: set[str] = set()  # VM UIDs with disks of the layout before namespaces
        self.adopted: list[tuple[str, str]] = []
        self.pod_disks_removed: list[tuple[str, str]] = []

    def connect(self) -> None:
        pass

    def lib_version(self) -> int:
        return 9000000

    def create(self, spec: VMSpec, *, start: bool = True, paused: bool = False) -> str:
        self.domains[spec.name] = "shutoff"
        self.specs[spec.name] = spec
        if self.fail_create:
            raise self.fail_create
        return "uuid"

    def metadata(self, name: str) -> dict[str, str]:
        return {"consoleLog": f"/nonexistent/{name}.log"}

    def start(self, name: str, paused: bool = False) -> None:
        if self.fail_start:
            raise self.fail_start
        self.domains[name] = "running"

    def state(self, name: str) -> DomainState:
        if name not in self.domains:
            raise DomainNotFound(name)
        phase = self.domains[name]
        return DomainState(phase, "shutdown", 0 if phase == "shutoff" else None)

    def stats(self, name: str) -> DomainStats:
        return DomainStats(1, 2, 3, 4, None, None)

    def shutdown(self, name: str, timeout: float = 30.0, poll: float = 0.2) -> str:
        self.domains[name] = "shutoff"
        return "shutdown"

    def destroy(self, name: str) -> None:
        self.domains[name] = "shutoff"

    def remove(self, name: str, delete_disks: bool = False) -> bool:
        self.removed.append(name)
        return self.domains.pop(name, None) is not None

    def console_pty(self, name: str) -> str:
        return "/dev/null"

    def watch_stops(self, on_stop):
        """libvirt's lifecycle events: ``die(name)`` plays QEMU's end (killed: crashed)."""

        def die(name: str) -> None:
            self.domains[name] = "shutoff"
            on_stop(name)

        self.die = die
        return self

    def close(self) -> None:
        pass

    def has_legacy_vm_disks(self, uid: str) -> bool:
        return uid in self.legacy

    def adopt_legacy_vm_disks(self, namespace: str, uid: str) -> bool:
        self.adopted.append((namespace, uid))
        self.legacy.discard(uid)
        return True

    def remove_pod_disks(self, namespace: str, pod_uid: str) -> None:
        self.pod_disks_removed.append((namespace, pod_uid))


class FakeNetns:
    """Network namespaces as files in a directory (no ip netns, no root)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()

    def path(self, name: str) -> Path:
        return self.root / name

    def create(self, name: str) -> str:
        self.path(name).touch()
        return str(self.path(name))

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def names(self) -> set[str]:
        return {p.name for p in self.root.iterdir()}


@pytest.fixture
def env(tmp_path: Path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "macvtap").write_text(PLUGIN)
    (bindir / "macvtap").chmod(0o755 | stat.S_IXUSR)
    conf = {
        "cniVersion": "1.0.0",
        "name": "vmnet",
        "plugins": [{"type": "macvtap", "capabilities": {"mac": True}}],
    }
    (tmp_path / "vm.conflist").write_text(json.dumps(conf))
    netns = FakeNetns(tmp_path / "netns")
    mgr = FakeDomains()
    opts = factory.parse_options(
        "kvm",
        {
            "state_dir": str(tmp_path / "state"),
            "vm_state_dir": str(tmp_path / "vm"),
            "cni_conflist": str(tmp_path / "vm.conflist"),
            "cni_bin_dirs": [str(bindir)],
            "kubelet_root_dir": str(tmp_path / "kubelet"),
        },
    )

    def make():
        return factory.build_handler("kvm", opts, domains=mgr, netns=netns)

    return make, mgr, netns, tmp_path


def run_pod(b, tmp: Path, annotations=None, namespace: str = "ns", uid: str = "u1") -> str:
    cfg = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name="web", namespace=namespace, uid=uid),
        log_directory=str(tmp / "logs"),
        annotations=annotations or {},
    )
    return b.run_pod_sandbox(api.RunPodSandboxRequest(config=cfg, runtime_handler="kvm")).pod_sandbox_id


def create(b, sid: str, image: str = "127.0.0.1:5000/vm/d:1", mounts=()) -> str:
    cfg = api.ContainerConfig(
        metadata=api.ContainerMetadata(name="vm"),
        image=api.ImageSpec(image=image),
        log_path="vm/0.log",
        mounts=[api.Mount(container_path=c, host_path=h, readonly=True) for c, h in mounts],
    )
    return b.create_container(api.CreateContainerRequest(pod_sandbox_id=sid, config=cfg)).container_id


def cstate(b, cid: str) -> int:
    return b.container_status(api.ContainerStatusRequest(container_id=cid)).status.state


def test_ids_and_states_survive_a_restart_and_exits_never_flip(env):
    make, mgr, netns, tmp = env
    b = make()
    sid = run_pod(b, tmp)
    st = b.pod_sandbox_status(api.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
    assert st.network.ip == "10.245.0.9" and st.state == api.SANDBOX_READY
    cid = create(b, sid)
    assert cstate(b, cid) == api.CONTAINER_CREATED
    b.start_container(api.StartContainerRequest(container_id=cid))
    b2 = make()  # a restarted shim
    assert [p.id for p in b2.list_pod_sandbox(api.ListPodSandboxRequest()).items] == [sid]
    assert [(c.id, c.state) for c in b2.list_containers(api.ListContainersRequest()).containers] == [
        (cid, api.CONTAINER_RUNNING)
    ]
    mgr.domains[f"edgevirt-{cid[:20]}"] = "shutoff"  # the guest powered itself off
    st = b2.container_status(api.ContainerStatusRequest(container_id=cid)).status
    assert (st.state, st.exit_code, st.reason) == (api.CONTAINER_EXITED, 0, "Completed")
    mgr.domains[f"edgevirt-{cid[:20]}"] = "running"  # whatever libvirt says later: it stays exited
    assert cstate(b2, cid) == api.CONTAINER_EXITED
    b2.remove_pod_sandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert not netns.names() and not mgr.domains
    assert b2.list_pod_sandbox(api.ListPodSandboxRequest()).items == []
    with pytest.raises(BackendError) as e:
        b2.pod_sandbox_status(api.PodSandboxStatusRequest(pod_sandbox_id=sid))
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_a_failed_create_removes_the_domain_and_the_record(env):
    make, mgr, _netns, tmp = env
    b = make()
    sid = run_pod(b, tmp)
    mgr.fail_create = ImageError("image: no /disk/ file in 127.0.0.1:5000/vm/d:1")
    with pytest.raises(BackendError) as e:
        create(b, sid)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "/disk/" in e.value.message
    assert not mgr.domains and b.list_containers(api.ListContainersRequest()).containers == []
    mgr.fail_create = None
    assert create(b, sid)  # the pod still works


def test_one_vm_per_pod_and_image_ids_are_refused(env):
    make, _mgr, _netns, tmp = env
    b = make()
    sid = run_pod(b, tmp)
    create(b, sid)
    with pytest.raises(BackendError, match="one container"):
        create(b, sid)
    sid2 = run_pod(b, tmp)
    with pytest.raises(BackendError, match="image ID"):
        create(b, sid2, image="sha256:" + "a" * 64)


def test_a_pod_left_half_made_is_undone_at_start(env):
    make, _mgr, netns, tmp = env
    b = make()
    sid = run_pod(b, tmp)
    rec = b.sandboxes.store.get(sid)
    b.sandboxes.store.put(dataclasses.replace(rec, phase="setup"))  # the shim died inside RunPodSandbox
    b2 = make()
    assert b2.sandboxes.store.get(sid) is None and not netns.names()


def test_vm_annotations_give_a_stable_mac_and_bad_ones_name_the_field(env):
    make, mgr, _netns, tmp = env
    b = make()
    sid = run_pod(b, tmp, {"edgevirt.io/vm-uid": "vm-1", "edgevirt.io/image": "127.0.0.1:5000/vm/d:1"})
    assert b.sandboxes.store.get(sid).mac == translate.derived_mac("ns", "vm-1")
    cid = create(b, sid, image="sha256:" + "b" * 64)  # the annotation wins over the image ID
    spec = mgr.specs[f"edgevirt-{cid[:20]}"]
    assert (spec.namespace, spec.disk_scope, spec.disk_key, spec.uid) == ("ns", "vm", "vm-1", "vm-1")
    with pytest.raises(BackendError, match=r"edgevirt.io/mac"):
        run_pod(b, tmp, {"edgevirt.io/mac": "not-a-mac"})
    with pytest.raises(BackendError, match=r"edgevirt.io/image"):
        run_pod(b, tmp, {"edgevirt.io/vm-uid": "vm-2"})
    assert len(b.list_pod_sandbox(api.ListPodSandboxRequest()).items) == 1


def test_status_reports_libvirt_and_the_cni_plugins(env):
    make, _mgr, _netns, tmp = env
    b = make()
    st = b.status(api.StatusRequest())
    assert {c.type: c.status for c in st.status.conditions} == {"RuntimeReady": True, "NetworkReady": True}
    assert [h.name for h in st.runtime_handlers] == ["kvm"]
    (tmp / "bin" / "macvtap").unlink()
    conds = {c.type: (c.status, c.message) for c in b.status(api.StatusRequest()).status.conditions}
    assert conds["NetworkReady"] == (False, "macvtap")


def test_create_container_uses_the_contract_parsed_at_run_pod_sandbox(env):
    make, mgr, _netns, tmp = env
    b = make()
    sid = run_pod(b, tmp, {"edgevirt.io/vm-uid": "vm-1", "edgevirt.io/image": "127.0.0.1:5000/vm/d:1"})
    rec = b.sandboxes.store.get(sid)
    # the raw annotations in the record no longer matter: CreateContainer never reads them
    b.sandboxes.store.put(dataclasses.replace(rec, annotations={"edgevirt.io/image": "other"}))
    spec = mgr.specs[f"edgevirt-{create(b, sid)[:20]}"]
    assert (spec.image, spec.disk_key) == ("127.0.0.1:5000/vm/d:1", "vm-1")


def test_a_pods_whole_life_leaves_no_lock_behind(env):
    """The per-ID locks live only while a call holds them: the long-run bench found one kept per
    sandbox and container ID for the life of the shim, growing with every VM that ever ran."""
    make, _mgr, _netns, tmp = env
    b = make()
    for i in range(3):
        sid = run_pod(b, tmp, uid=f"u{i}")
        cid = create(b, sid)
        b.start_container(api.StartContainerRequest(container_id=cid))
        b.stop_container(api.StopContainerRequest(container_id=cid, timeout=10))
        b.remove_container(api.RemoveContainerRequest(container_id=cid))
        b.stop_pod_sandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid))
        b.remove_pod_sandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    assert len(b._lock) == 0


def test_stop_records_the_exit_and_stats_only_for_a_running_vm(env):
    make, _mgr, _netns, tmp = env
    b = make()
    cid = create(b, run_pod(b, tmp))
    stats = b.container_stats(api.ContainerStatsRequest(container_id=cid)).stats
    assert stats.attributes.id == cid and not stats.HasField("cpu")
    b.start_container(api.StartContainerRequest(container_id=cid))
    stats = b.container_stats(api.ContainerStatsRequest(container_id=cid)).stats
    assert (stats.cpu.usage_core_nano_seconds.value, stats.memory.rss_bytes.value) == (2, 4 * 1024)
    assert len(b.list_container_stats(api.ListContainerStatsRequest()).stats) == 1
    b.stop_container(api.StopContainerRequest(container_id=cid, timeout=10))
    st = b.container_status(api.ContainerStatusRequest(container_id=cid)).status
    assert (st.state, st.exit_code, st.reason) == (api.CONTAINER_EXITED, 0, "Completed")
    with pytest.raises(BackendError, match="has already run") as e:
        b.start_container(api.StartContainerRequest(container_id=cid))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert b.list_container_stats(api.ListContainerStatsRequest()).stats == []
    with pytest.raises(BackendError) as e:
        b.attach(api.AttachRequest(container_id=cid, stdout=True))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_container_events_carry_the_pods_state_and_a_vm_that_died_is_reported_at_once(env):
    """GetContainerEvents as kubelet's evented PLEG reads it: every event holds the sandbox status
    and all container statuses of the moment; a domain that stopped on its own is an event."""
    make, mgr, _netns, tmp = env
    b = make()
    stream = b.events(b"")
    got: list = []
    reader = threading.Thread(
        target=lambda: got.extend(api.ContainerEventResponse.FromString(e) for e in stream)
    )
    reader.start()
    sid = run_pod(b, tmp)
    cid = create(b, sid)
    b.start_container(api.StartContainerRequest(container_id=cid))
    mgr.die(f"edgevirt-{cid[:20]}")  # QEMU ended: libvirt's lifecycle event
    deadline = time.monotonic() + 10
    while len(got) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    kinds = [(e.container_id, api.ContainerEventType.Name(e.container_event_type)) for e in got]
    assert kinds == [
        (sid, "CONTAINER_CREATED_EVENT"),
        (sid, "CONTAINER_STARTED_EVENT"),
        (cid, "CONTAINER_CREATED_EVENT"),
        (cid, "CONTAINER_STARTED_EVENT"),
        (cid, "CONTAINER_STOPPED_EVENT"),
    ]
    stopped = got[-1]
    assert stopped.pod_sandbox_status.id == sid and stopped.pod_sandbox_status.metadata.uid == "u1"
    assert [(c.id, c.state) for c in stopped.containers_statuses] == [(cid, api.CONTAINER_EXITED)]
    assert stopped.created_at >= got[-2].created_at > 0
    b.remove_pod_sandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    b.close()  # ends the stream
    reader.join(10)
    assert not reader.is_alive()
    tail = [(e.container_id, api.ContainerEventType.Name(e.container_event_type)) for e in got[5:]]
    assert (sid, "CONTAINER_DELETED_EVENT") in tail
    deleted = next(
        e for e in got[5:] if e.container_id == sid and e.container_event_type == api.CONTAINER_DELETED_EVENT
    )
    assert deleted.pod_sandbox_status.id == sid  # built while it still existed: kubelet drops the pod


def test_a_vm_that_fails_to_boot_ends_its_container_and_the_next_one_may_come(env):
    """As containerd records a failed start (exit 128, StartError): kubelet's next CreateContainer
    in the same sandbox is not refused for a container that never ran."""
    make, mgr, _netns, tmp = env
    b = make()
    sid = run_pod(b, tmp)
    cid = create(b, sid)
    mgr.fail_start = VMError(
        "starting domain failed: internal error: process exited while connecting to monitor"
    )
    with pytest.raises(BackendError, match="process exited"):
        b.start_container(api.StartContainerRequest(container_id=cid))
    st = b.container_status(api.ContainerStatusRequest(container_id=cid)).status
    assert (st.state, st.exit_code, st.reason) == (api.CONTAINER_EXITED, 128, "StartError")
    assert "process exited while connecting to monitor" in st.message
    with pytest.raises(BackendError, match="has already run"):
        b.start_container(api.StartContainerRequest(container_id=cid))
    mgr.fail_start = None
    again = create(b, sid)
    b.start_container(api.StartContainerRequest(container_id=again))
    assert cstate(b, again) == api.CONTAINER_RUNNING


def test_event_streams_are_bounded():
    hub = events.ContainerEvents(max_subscribers=2, max_queued=3)
    first, second, third = hub.subscribe(), hub.subscribe(), hub.subscribe()
    assert first.ended and "over 2 event streams" in first.ended
    for i in range(5):
        hub.publish(lambda i=i: b"e%d" % i)
    assert second.ended == "the client fell 3 events behind"
    assert list(first) == [] and list(second) == [b"e0", b"e1", b"e2"]
    hub.close()
    assert list(third) == [b"e0", b"e1", b"e2"]
    assert not hub.listening


def test_a_domain_that_vanished_is_an_exit_and_the_factory_names_bad_options(env):
    make, mgr, _netns, tmp = env
    b = make()
    cid = create(b, run_pod(b, tmp))
    b.start_container(api.StartContainerRequest(container_id=cid))
    mgr.domains.clear()
    st = b.container_status(api.ContainerStatusRequest(container_id=cid)).status
    assert (st.state, st.exit_code, st.reason) == (api.CONTAINER_EXITED, 137, "DomainGone")
    with pytest.raises(ValueError, match=r"backends\.kvm\.options: unknown key\(s\) \['bogus'\]"):
        factory.parse_options("kvm", {"state_dir": "/x", "cni_conflist": "/y", "bogus": 1})
    with pytest.raises(ValueError, match=r"backends\.kvm\.options\.cni_conflist is required"):
        factory.parse_options("kvm", {"state_dir": "/x"})
    with pytest.raises(ValueError, match=r"backends\.kvm\.options\.max_disk_bytes: 'huge' is not a size"):
        factory.parse_options("kvm", {"state_dir": "/x", "cni_conflist": "/y", "max_disk_bytes": "huge"})
    with pytest.raises(ValueError, match=r"backends\.kvm\.options\.max_volumes: 0 is not a positive number"):
        factory.parse_options("kvm", {"state_dir": "/x", "cni_conflist": "/y", "max_volumes": 0})
    for bad in (-1, 4096, "32"):
        with pytest.raises(ValueError, match=r"options\.tcg_tb_cache_mib: .* from 1 to 2048, or 0"):
            factory.parse_options("kvm", {"state_dir": "/x", "cni_conflist": "/y", "tcg_tb_cache_mib": bad})
    default = factory.parse_options("kvm", {"state_dir": "/x", "cni_conflist": "/y"})
    assert factory.domain_manager(default).tcg_tb_cache_mib == 16
    qemus = factory.parse_options("kvm", {"state_dir": "/x", "cni_conflist": "/y", "tcg_tb_cache_mib": 0})
    assert factory.domain_manager(qemus).tcg_tb_cache_mib is None
    no_host_disks = factory.parse_options(
        "kvm", {"state_dir": "/x", "cni_conflist": "/y", "host_disk_root": ""}
    )
    assert no_host_disks.host_disk_root is None
    example = yaml.safe_load((REPO / "deploy/cri/edgevirt-cri.yaml").read_text())
    opts = factory.parse_options("kvm", example["backends"]["kvm"]["options"])
    assert (opts.host_disk_root, opts.max_disk_bytes, opts.min_free_bytes) == (
        Path("/var/lib/edgevirt/hostdisks"),
        256 * 2**30,
        2 * 2**30,
    )
    down = factory.build_handler(
        "kvm",
        factory.parse_options("kvm", {"state_dir": str(tmp / "s2"), "cni_conflist": "/nonexistent"}),
        domains=mgr,
    )
    assert "cannot read the VM network's conflist /nonexistent" in (down.unavailable_reason() or "")


VM_A = {"edgevirt.io/vm-uid": "vm-a", "edgevirt.io/image": "127.0.0.1:5000/vm/d:1"}


def test_a_pod_of_another_namespace_with_a_vms_uid_gets_its_own_disks(env):
    """Finding 1, through the CRI calls: the namespace of the disks is kubelet's, never an annotation's."""
    make, mgr, _netns, tmp = env
    b = make()
    spec_a = mgr.specs[f"edgevirt-{create(b, run_pod(b, tmp, VM_A, 'team-a', 'pod-a'))[:20]}"]
    spec_b = mgr.specs[f"edgevirt-{create(b, run_pod(b, tmp, VM_A, 'team-b', 'pod-b'))[:20]}"]
    assert (spec_a.namespace, spec_a.disk_key) == ("team-a", "vm-a")
    assert (spec_b.namespace, spec_b.disk_key) == ("team-b", "vm-a")


def test_old_layout_disks_are_claimed_only_by_the_pods_that_ran_them(env):
    make, mgr, _netns, tmp = env
    b = make()
    sid = run_pod(b, tmp, VM_A, "team-a")
    mgr.legacy.add("vm-a")  # disks of this VM in the layout before namespaces
    with pytest.raises(
        BackendError, match=r"not yet claimed for namespace team-a: the node-mode controller"
    ) as e:
        create(b, sid)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and not mgr.specs
    make()  # a restarted (upgraded) shim: its own VM pod of team-a claims them
    assert mgr.adopted == [("team-a", "vm-a")]
    assert create(b, sid)
    mgr.legacy.add("vm-b")
    run_pod(b, tmp, {**VM_A, "edgevirt.io/vm-uid": "vm-b"}, "team-a")
    run_pod(b, tmp, {**VM_A, "edgevirt.io/vm-uid": "vm-b"}, "team-b")  # who is it? node mode knows
    make()
    assert ("team-a", "vm-b") not in mgr.adopted and ("team-b", "vm-b") not in mgr.adopted


def test_a_plain_pods_disks_go_with_its_last_sandbox(env):
    make, mgr, _netns, tmp = env
    b = make()
    first = run_pod(b, tmp, uid="pod-1")
    create(b, first)
    second = run_pod(b, tmp, uid="pod-1")  # kubelet made a new sandbox for the same pod
    b.remove_pod_sandbox(api.RemovePodSandboxRequest(pod_sandbox_id=first))
    assert mgr.pod_disks_removed == []
    b.remove_pod_sandbox(api.RemovePodSandboxRequest(pod_sandbox_id=second))
    assert mgr.pod_disks_removed == [("ns", "pod-1")]
    vm = run_pod(b, tmp, VM_A, uid="pod-2")
    b.remove_pod_sandbox(api.RemovePodSandboxRequest(pod_sandbox_id=vm))
    assert mgr.pod_disks_removed == [("ns", "pod-1")]  # a VM's disks stay: node mode removes them


def test_secret_user_data_comes_from_this_pods_volume_only(env):
    make, mgr, _netns, tmp = env
    b = make()
    vol = tmp / "kubelet/pods/pod-a/volumes/kubernetes.io~secret/ci"
    vol.mkdir(parents=True)
    (vol / "userdata").write_text("#cloud-config\npassword: s3cr3t\n")
    sid = run_pod(b, tmp, VM_A, "team-a", "pod-a")
    cid = create(b, sid, mounts=[(CLOUD_INIT_SECRET_PATH, str(vol))])
    assert mgr.specs[f"edgevirt-{cid[:20]}"].cloud_init.user_data == "#cloud-config\npassword: s3cr3t\n"
    assert "s3cr3t" not in "".join(p.read_text() for p in (tmp / "state").rglob("*.json"))  # in no record
    other = run_pod(b, tmp, VM_A, "team-b", "pod-b")  # another pod mounting pod-a's volume by host path
    with pytest.raises(BackendError) as e:
        create(b, other, mounts=[(CLOUD_INIT_SECRET_PATH, str(vol))])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message.startswith(f"config.mounts[{CLOUD_INIT_SECRET_PATH}]: is not a volume of this pod")
    assert str(tmp) not in e.value.message


def test_error_texts_hold_no_node_paths_or_digests(env, caplog):
    """Finding 2: a failure's text reaches the pod's events; its details stay in the node's log."""
    make, mgr, _netns, tmp = env
    b = make()
    sid = run_pod(b, tmp)
    blob = tmp / "vm" / "images" / "blobs" / "sha256" / ("e" * 64)
    mgr.fail_create = VMError(f"starting domain failed: Could not open '{blob}': Permission denied")
    req = api.CreateContainerRequest(
        pod_sandbox_id=sid,
        config=api.ContainerConfig(
            metadata=api.ContainerMetadata(name="vm"), image=api.ImageSpec(image="r.example/x:1")
        ),
    )
    with pytest.raises(BackendError) as e:
        b.invoke("CreateContainer", req.SerializeToString())
    assert e.value.message == "starting domain failed: Could not open '<node path>': Permission denied"
    assert str(blob) in caplog.text  # the node's log has it
    mgr.fail_create = ImageError(f"image: sha256:{'f' * 64} is bad", detail=f"the detail {tmp}")
    with pytest.raises(BackendError) as e:
        b.invoke("CreateContainer", req.SerializeToString())
    assert e.value.message == "image: sha256:<digest> is bad" and f"the detail {tmp}" in caplog.text
    mgr.fail_create = RuntimeError(f"unexpected in {tmp / 'state'}")
    with pytest.raises(BackendError) as e:
        b.invoke("CreateContainer", req.SerializeToString())
    assert e.value.code == grpc.StatusCode.UNKNOWN and str(tmp) not in e.value.message


def test_malformed_annotations_are_refused_naming_the_field(env):
    """Finding 9: {"kernel": 5} raised TypeError."""
    make, _mgr, netns, tmp = env
    b = make()
    with pytest.raises(BackendError) as e:
        run_pod(b, tmp, {**VM_A, "edgevirt.io/kernel-boot": '{"kernel": 5}'})
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message == (
        "config.annotations: edgevirt.io/kernel-boot.kernel: must be a string, not int; "
        "write it as a JSON string"
    )
    assert not netns.names()


def test_records_are_private(env):
    make, _mgr, _netns, tmp = env
    b = make()
    cid = create(b, run_pod(b, tmp, {**VM_A, "edgevirt.io/cloud-init-user-data": "#cloud-config\n"}))
    assert cid
    state = tmp / "state"
    files = [p for p in state.rglob("*") if p.is_file()]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}
    assert {oct(p.stat().st_mode & 0o777) for p in [state, *(p for p in state.rglob("*") if p.is_dir())]} == {
        "0o700"
    }
