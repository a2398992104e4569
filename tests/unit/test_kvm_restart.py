"""kubelet restarting a VM in the same sandbox, with a fake libvirt layer (the real flows:
tests/e2e/test_edge_autonomy.py and test_cri_kvm.py): after QEMU dies the container is EXITED with a
non-zero code, a new container of the same sandbox (attempt + 1) gets a new domain on the same disks
and the same NIC, the ended container's domain stays until kubelet removes it, and removing it
leaves the shared disks alone. Only the guest's own power-off is exit 0."""

from __future__ import annotations

import pytest
from test_kvm_handler import FakeDomains, api, create, env, run_pod  # noqa: F401 (env: a fixture)

from cri_shim.kvm.containers import container_end
from cri_shim.vm.model import DomainState


class EndingDomains(FakeDomains):
    """FakeDomains whose ended domains carry the reason libvirt gives."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: dict[str, str] = {}
        self.removed_with_disks: list[tuple[str, bool]] = []

    def state(self, name: str) -> DomainState:
        st = super().state(name)
        if st.phase == "shutoff":
            reason = self.reasons.get(name, "shutdown")
            return DomainState("shutoff", reason, 0 if reason == "shutdown" else 139)
        return st

    def remove(self, name: str, delete_disks: bool = False) -> bool:
        self.removed_with_disks.append((name, delete_disks))
        return super().remove(name, delete_disks)


@pytest.fixture
def restart_env(env):  # noqa: F811 (the fixture imported above)
    make, _mgr, _netns, tmp = env
    ending = EndingDomains()
    b = make()
    b.domains = b.containers.domains = ending
    return b, ending, tmp


def status(b, cid: str):
    return b.container_status(api.ContainerStatusRequest(container_id=cid)).status


def create_attempt(b, sid: str, attempt: int) -> str:
    cfg = api.ContainerConfig(
        metadata=api.ContainerMetadata(name="vm", attempt=attempt),
        image=api.ImageSpec(image="127.0.0.1:5000/vm/d:1"),
        log_path=f"vm/{attempt}.log",
    )
    return b.create_container(api.CreateContainerRequest(pod_sandbox_id=sid, config=cfg)).container_id


@pytest.mark.parametrize(
    "annotations",
    [{}, {"edgevirt.io/vm-uid": "vm-1", "edgevirt.io/image": "127.0.0.1:5000/vm/d:1"}],
    ids=["plain pod", "VirtualMachine pod"],
)
def test_a_killed_vm_comes_back_in_the_same_sandbox_on_the_same_disks_and_nic(restart_env, annotations):
    b, mgr, tmp = restart_env
    sid = run_pod(b, tmp, annotations)
    first = create_attempt(b, sid, 0)
    b.start_container(api.StartContainerRequest(container_id=first))
    old = f"edgevirt-{first[:20]}"
    mgr.domains[old], mgr.reasons[old] = "shutoff", "crashed"  # QEMU got kill -9
    st = status(b, first)
    assert (st.state, st.exit_code, st.reason) == (api.CONTAINER_EXITED, 139, "Error")
    assert "killed or crashed" in st.message
    # kubelet: a new container in the same sandbox, attempt 1
    second = create_attempt(b, sid, 1)
    b.start_container(api.StartContainerRequest(container_id=second))
    new = f"edgevirt-{second[:20]}"
    assert new != old and mgr.domains == {old: "shutoff", new: "running"}
    a, z = mgr.specs[old], mgr.specs[new]
    assert (z.namespace, z.disk_scope, z.disk_key, z.uid) == (a.namespace, a.disk_scope, a.disk_key, a.uid)
    assert z.disk_scope == ("vm" if annotations else "pod")
    assert z.nics and [(n.mac, n.tap_device) for n in z.nics] == [(n.mac, n.tap_device) for n in a.nics]
    assert z.cni_result == a.cni_result and z.image == a.image
    assert status(b, second).metadata.attempt == 1 and status(b, second).state == api.CONTAINER_RUNNING
    # the ended container stays (kubelet reads its status) until kubelet removes it; its removal
    # leaves the disks both domains share
    assert status(b, first).state == api.CONTAINER_EXITED
    b.remove_container(api.RemoveContainerRequest(container_id=first))
    assert mgr.removed_with_disks == [(old, False)] and mgr.pod_disks_removed == []
    assert mgr.domains == {new: "running"} and status(b, second).state == api.CONTAINER_RUNNING


def test_a_second_vm_waits_until_the_first_has_ended(restart_env):
    b, mgr, tmp = restart_env
    sid = run_pod(b, tmp)
    first = create(b, sid)
    b.start_container(api.StartContainerRequest(container_id=first))
    with pytest.raises(Exception, match="a VM pod has one container"):
        create_attempt(b, sid, 1)
    mgr.domains[f"edgevirt-{first[:20]}"] = "shutoff"  # the guest powered off
    st = status(b, first)
    assert (st.exit_code, st.reason) == (0, "Completed")
    assert create_attempt(b, sid, 1)


@pytest.mark.parametrize(
    ("phase", "reason", "code", "cri_reason"),
    [
        ("shutoff", "shutdown", 0, "Completed"),  # the guest powered off
        ("shutoff", "crashed", 139, "Error"),  # QEMU killed (kill -9) or crashed
        ("shutoff", "destroyed", 137, "Error"),  # virsh destroy, StopContainer's timeout
        ("shutoff", "failed", 1, "Error"),
        ("shutoff", "daemon", 137, "Error"),
        ("shutoff", "unknown", 1, "Error"),  # never a success by default
        ("crashed", "panicked", 139, "Error"),
        ("crashed", "unknown", 1, "Error"),
    ],
)
def test_only_a_guest_power_off_is_exit_0(phase, reason, code, cri_reason):
    got = container_end(DomainState(phase, reason))
    assert got[:2] == (code, cri_reason) and f"domain {phase} ({reason})" in got[2]
