"""The kvm handler's bookkeeping with a fake libvirt layer and a fake CNI plugin (the real flows run in
tests/e2e/test_cri_kvm.py): IDs and states survive a restart of the shim, a failure in
CreateContainer removes what it made, a pod left half-made by a kill -9 is undone at start, exit
states never flip back, and bad annotations name the field."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import grpc
import pytest

from cri_shim import protos
from cri_shim.errors import BackendError
from cri_shim.kvm import factory, translate
from cri_shim.vm.errors import DomainNotFound, ImageError
from cri_shim.vm.model import DomainState, DomainStats, VMSpec

api = protos.api()

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
        self.removed: list[str] = []
        self.specs: dict[str, VMSpec] = {}

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

    def close(self) -> None:
        pass


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
        },
    )

    def make():
        return factory.build_handler("kvm", opts, domains=mgr, netns=netns)

    return make, mgr, netns, tmp_path


def run_pod(b, tmp: Path, annotations=None) -> str:
    cfg = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name="web", namespace="ns", uid="u1"),
        log_directory=str(tmp / "logs"),
        annotations=annotations or {},
    )
    return b.run_pod_sandbox(api.RunPodSandboxRequest(config=cfg, runtime_handler="kvm")).pod_sandbox_id


def create(b, sid: str, image: str = "127.0.0.1:5000/vm/d:1") -> str:
    cfg = api.ContainerConfig(
        metadata=api.ContainerMetadata(name="vm"), image=api.ImageSpec(image=image), log_path="vm/0.log"
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
    assert b.sandboxes.store.get(sid).mac == translate.derived_mac("vm-1")
    cid = create(b, sid, image="sha256:" + "b" * 64)  # the annotation wins over the image ID
    spec = mgr.specs[f"edgevirt-{cid[:20]}"]
    assert (spec.disk_scope, spec.disk_key, spec.uid) == ("vm", "vm-1", "vm-1")
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
    down = factory.build_handler(
        "kvm",
        factory.parse_options("kvm", {"state_dir": str(tmp / "s2"), "cni_conflist": "/nonexistent"}),
        domains=mgr,
    )
    assert "cannot read the VM network's conflist /nonexistent" in (down.unavailable_reason() or "")
