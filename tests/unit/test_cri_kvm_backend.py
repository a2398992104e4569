"""The kvm handler's bookkeeping with a fake libvirt layer and a fake CNI plugin (the real flows run in
tests/e2e/test_cri_kvm.py): IDs and states survive a restart of the shim, a failure in
CreateContainer removes what it made, a pod left half-made by a kill -9 is undone at start, exit
states never flip back, and bad annotations name the field."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import grpc
import pytest

from cri_shim import protos
from cri_shim.errors import BackendError
from cri_shim.vm import backend as kvm
from cri_shim.vm.errors import DomainNotFound, ImageError
from cri_shim.vm.model import DomainState

api = protos.api()

PLUGIN = """#!/bin/sh
cat > /dev/null
if [ "$CNI_COMMAND" = ADD ]; then
  echo '{"cniVersion":"1.0.0",
  "interfaces":[{"name":"eth0","mac":"02:00:00:00:00:09","sandbox":"'$CNI_NETNS'"}],
  "ips":[{"address":"10.245.0.9/24","gateway":"10.245.0.1","interface":0}]}'
fi
"""


class FakeManager:
    def __init__(self) -> None:
        self.domains: dict[str, str] = {}  # name -> phase
        self.fail_create: Exception | None = None
        self.removed: list[str] = []
        self.specs: dict[str, object] = {}

    def connect(self) -> None:
        pass

    def lib_version(self) -> int:
        return 9000000

    def create(self, spec, start=True, paused=False):
        self.domains[spec.name] = "shutoff"
        self.specs[spec.name] = spec
        if self.fail_create:
            raise self.fail_create
        return "uuid"

    def metadata(self, name):
        return {"consoleLog": f"/nonexistent/{name}.log"}

    def start(self, name):
        self.domains[name] = "running"

    def state(self, name):
        if name not in self.domains:
            raise DomainNotFound(name)
        phase = self.domains[name]
        return DomainState(phase, "shutdown", 0 if phase == "shutoff" else None)

    def shutdown(self, name, timeout=30):
        self.domains[name] = "shutoff"
        return "shutdown"

    def destroy(self, name):
        self.domains[name] = "shutoff"

    def remove(self, name, delete_disks=False):
        self.removed.append(name)
        return self.domains.pop(name, None) is not None

    def close(self):
        pass


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
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
    netns: set[str] = set()
    monkeypatch.setattr(kvm, "NETNS_DIR", tmp_path / "netns")
    (tmp_path / "netns").mkdir()

    def create(name: str) -> str:
        netns.add(name)
        (tmp_path / "netns" / name).touch()
        return str(tmp_path / "netns" / name)

    def delete(name: str) -> None:
        netns.discard(name)
        (tmp_path / "netns" / name).unlink(missing_ok=True)

    monkeypatch.setattr(kvm.KvmBackend, "_netns_create", staticmethod(create))
    monkeypatch.setattr(kvm.KvmBackend, "_netns_delete", staticmethod(delete))
    mgr = FakeManager()

    def make():
        return kvm.KvmBackend(
            "kvm",
            state_dir=tmp_path / "state",
            vm_state_dir=tmp_path / "vm",
            cni_conflist=tmp_path / "vm.conflist",
            cni_bin_dirs=[bindir],
            manager=mgr,
        )

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
    assert not netns and not mgr.domains
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
    rec = b.sandboxes.get(sid)
    b.sandboxes.put({**rec, "phase": "setup"})  # as if the shim died inside RunPodSandbox
    b2 = make()
    assert b2.sandboxes.get(sid) is None and not netns


def test_vm_annotations_give_a_stable_mac_and_bad_ones_name_the_field(env):
    make, mgr, _netns, tmp = env
    b = make()
    sid = run_pod(b, tmp, {"edgevirt.io/vm-uid": "vm-1", "edgevirt.io/image": "127.0.0.1:5000/vm/d:1"})
    assert b.sandboxes.get(sid)["mac"] == kvm.derived_mac("vm-1")
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
