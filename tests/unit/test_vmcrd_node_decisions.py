"""Node mode's decisions without pods: which VMs are its own, when it acts on a domain, when the
finalizer's cleanup may run. The VirtualMachine API, the Events and libvirt are fakes here; the real
ones are in tests/integration/test_vmcrd_node.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client

from cri_shim.vm import DiskOwner
from vmcrd import api
from vmcrd.node import NO_DOMAIN_RECHECK, POD_GONE_RECHECK, NodeController, vm_node

NODE = "edge-1"
UID = "u-1"
ONE_VOLUME_XML = (
    "<domain><devices><disk device='disk'><target dev='vdb'/><alias name='ua-{name}'/></disk>"
    "</devices></domain>"
)
NO_VOLUMES_XML = "<domain><devices/></domain>"


@dataclass
class FakeState:
    phase: str


class FakeManager:
    """The libvirt layer as node mode uses it: one domain of the VM (or none), a persistent and a live
    definition, suspend/resume and attach/detach recorded."""

    def __init__(self, phase: str | None, persistent: str = NO_VOLUMES_XML, live: str = NO_VOLUMES_XML):
        self.phase, self.persistent, self.live = phase, persistent, live
        self.calls: list[tuple[str, ...]] = []

    def vm_domains(self, namespace: str, uid: str) -> list[str]:
        """The VM's domains by namespace + UID, as the libvirt layer keys them."""
        return ["dom"] if self.phase is not None and (namespace, uid) == ("ns", UID) else []

    def has_legacy_vm_disks(self, uid: str) -> bool:
        return False

    def adopt_legacy_vm_disks(self, namespace: str, uid: str) -> bool:
        return False

    def state(self, dom: str) -> FakeState:
        assert self.phase is not None
        return FakeState(self.phase)

    def facts(self, dom: str) -> dict[str, str]:
        return {"phase": self.state(dom).phase, "accel": "tcg"}

    def xml(self, dom: str, inactive: bool = False) -> str:
        return self.persistent if inactive else self.live

    def suspend(self, dom: str) -> None:
        self.calls.append(("suspend",))

    def resume(self, dom: str) -> None:
        self.calls.append(("resume",))

    def attach_volume(self, dom: str, spec) -> str:
        self.calls.append(("attach", spec.name))
        return "vdc"

    def detach_volume(self, dom: str, name: str) -> None:
        self.calls.append(("detach", name))

    def remove_vm(self, namespace: str, uid: str) -> None:
        """Domains and disks of the VM (namespace, uid); the disks go even without a domain."""
        self.calls.extend(("remove", d) for d in self.vm_domains(namespace, uid))
        self.calls.append(("remove-disks", namespace, uid))


class FakeVMs:
    def __init__(self) -> None:
        self.status: list[dict] = []
        self.finalizer_removed = 0

    def patch_status(self, vm: dict, fields: dict) -> None:
        self.status.append(fields)

    def remove_finalizer(self, vm: dict) -> None:
        self.finalizer_removed += 1


class FakeEvents:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def emit(self, obj: dict, etype: str, reason: str, message: str) -> None:
        self.reasons.append(reason)


class FakeCache:
    def __init__(self, vm: dict) -> None:
        self.vm = vm

    def get(self, key: str) -> dict | None:
        return self.vm if key == "ns/web" else None


def make_vm(status: dict | None = None, spec: dict | None = None, deleting: bool = False) -> dict:
    meta: dict = {"name": "web", "namespace": "ns", "uid": UID, "finalizers": [api.FINALIZER]}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"image": "x", **(spec or {})}, "status": status or {}}


def controller(vm: dict, mgr: FakeManager, tmp_path: Path) -> NodeController:
    ctl = NodeController(client.ApiClient(), NODE, namespace="ns", state_dir=tmp_path)
    ctl._manager = mgr  # type: ignore[assignment]
    ctl.vm_api = FakeVMs()  # type: ignore[assignment]
    ctl.events = FakeEvents()  # type: ignore[assignment]
    ctl.vms = FakeCache(vm)  # type: ignore[assignment]
    return ctl


def test_node_mode_reads_no_pods(tmp_path):
    ctl = NodeController(client.ApiClient(), NODE, state_dir=tmp_path)
    assert [i.name for i in ctl.runner.informers] == ["virtualmachines"]
    assert not hasattr(ctl, "pods")


@pytest.mark.parametrize(
    ("status", "spec", "node"),
    [
        ({"nodeName": NODE}, {}, NODE),
        ({"nodeName": NODE}, {"nodeName": "other"}, NODE),  # the pin moved: the VM is still here
        ({"nodeName": "other"}, {"nodeName": NODE}, "other"),  # ... and not mine although pinned here
        ({}, {"nodeName": NODE}, NODE),
        ({}, {}, None),
    ],
)
def test_a_vm_lives_where_its_status_says_else_where_it_is_pinned(status, spec, node):
    assert vm_node(make_vm(status, spec)) == node


def test_a_vm_on_another_node_is_left_alone(tmp_path):
    vm = make_vm({"nodeName": "other", "printableStatus": "Running"}, {"nodeName": NODE})
    mgr = FakeManager("running")
    ctl = controller(vm, mgr, tmp_path)
    assert ctl.reconcile("ns/web") is None
    assert mgr.calls == [] and ctl.vm_api.status == []


@pytest.mark.parametrize("printable", ["Stopped", "Starting", "Stopping", "Failed", "CrashLoop", None])
def test_nothing_is_done_unless_cluster_mode_reports_the_vm_running(tmp_path, printable):
    vm = make_vm({"nodeName": NODE, "printableStatus": printable}, {"paused": True})
    mgr = FakeManager("running")
    ctl = controller(vm, mgr, tmp_path)
    assert ctl.reconcile("ns/web") is None
    assert mgr.calls == [] and ctl.vm_api.status == []


@pytest.mark.parametrize("printable", ["Stopped", "Starting", "Stopping", "Failed", "CrashLoop", None])
def test_a_vm_of_this_node_that_is_not_running_needs_no_libvirt(tmp_path, printable):
    """Node mode builds its libvirt layer (the libvirt module and a connection) only when a VM of its
    node runs, or its disks are in the layout of before namespaces (tests/unit/test_vmcrd_diskgc.py:
    the disk collector likewise)."""
    vm = make_vm({"nodeName": NODE, "printableStatus": printable})
    ctl = controller(vm, FakeManager("running"), tmp_path)
    ctl._manager = None
    assert ctl.reconcile("ns/web") is None
    assert ctl._manager is None


@pytest.mark.parametrize(
    ("key", "status", "deleting"),
    [
        ("ns/gone", {}, False),  # not in the informer (deleted meanwhile)
        ("ns/web", {"nodeName": "other", "printableStatus": "Running"}, False),
        ("ns/web", {"nodeName": "other"}, True),  # another node's cleanup
        ("ns/web", {}, False),  # not placed yet
    ],
)
def test_a_vm_that_is_not_on_this_node_needs_neither_libvirt_nor_the_disks(tmp_path, key, status, deleting):
    ctl = controller(make_vm(status, deleting=deleting), FakeManager("running"), tmp_path)
    ctl._manager = None
    assert ctl.reconcile(key) is None
    assert ctl._manager is None and ctl._disks is None


def test_a_new_node_controller_has_built_neither_layer_and_the_libvirt_one_shares_the_disks(tmp_path):
    ctl = NodeController(client.ApiClient(), NODE, state_dir=tmp_path, libvirt_uri="test:///default")
    assert ctl._disks is None and ctl._manager is None
    disks = ctl.disks
    assert ctl._manager is None
    assert ctl.manager.disks is disks and ctl.manager is ctl.manager


@pytest.mark.parametrize("phase", [None, "shutoff"])
def test_disks_of_the_old_layout_are_moved_only_while_the_vm_has_no_domain(tmp_path, phase):
    """Disks in the layout of before namespaces are what makes a VM that does not run need libvirt:
    a defined domain names its disk files by path, so they move only while it has none."""
    vm = make_vm({"nodeName": NODE, "printableStatus": "Stopped"})
    mgr = FakeManager(phase)
    ctl = controller(vm, mgr, tmp_path)
    mgr.adopt_legacy_vm_disks = ctl.disks.adopt_legacy_vm_disks  # type: ignore[method-assign]
    ctl.disks.empty_disk(DiskOwner("vm", UID), "d", "1Mi")
    assert ctl.reconcile("ns/web") is None
    moved = phase is None
    assert ctl.disks.has_legacy_vm_disks(UID) is not moved
    assert ctl.disks.vm_disk_owners() == ([("ns", UID)] if moved else [])


@pytest.mark.parametrize("phase", [None, "shutoff"])
def test_a_running_vm_whose_domain_is_not_up_yet_is_looked_at_again(tmp_path, phase):
    vm = make_vm({"nodeName": NODE, "printableStatus": "Running"})
    ctl = controller(vm, FakeManager(phase), tmp_path)
    assert ctl.reconcile("ns/web") == NO_DOMAIN_RECHECK
    assert ctl.vm_api.status == []


def test_pause_and_the_domain_facts_of_a_running_vm(tmp_path):
    vm = make_vm({"nodeName": NODE, "printableStatus": "Running"}, {"paused": True})
    mgr = FakeManager("running")
    ctl = controller(vm, mgr, tmp_path)
    mgr.suspend = lambda dom: setattr(mgr, "phase", "paused")  # type: ignore[method-assign]
    assert ctl.reconcile("ns/web") is None
    assert ctl.vm_api.status == [{"accel": "tcg", "domainState": "Paused", "volumes": []}]
    assert ctl.events.reasons == ["Suspended"]


def test_boot_volumes_come_from_the_persistent_definition_and_stay(tmp_path):
    """``cold`` is in the domain's persistent definition (booted with it): gone from the spec it still
    needs a restart; ``hot`` was hot-plugged (live only) and is detached when removed."""
    live = (
        "<domain><devices>"
        "<disk device='disk'><target dev='vdb'/><alias name='ua-cold'/></disk>"
        "<disk device='disk'><target dev='vdc'/><alias name='ua-hot'/></disk>"
        "</devices></domain>"
    )
    vm = make_vm({"nodeName": NODE, "printableStatus": "Running"}, {"volumes": []})
    mgr = FakeManager("running", persistent=ONE_VOLUME_XML.format(name="cold"), live=live)
    ctl = controller(vm, mgr, tmp_path)
    ctl.reconcile("ns/web")
    assert mgr.calls == [("detach", "hot")]


def test_cleanup_waits_while_cluster_mode_still_reports_the_pod(tmp_path):
    vm = make_vm({"nodeName": NODE, "podName": "web-vm"}, deleting=True)
    mgr = FakeManager("shutoff")
    ctl = controller(vm, mgr, tmp_path)
    assert ctl.reconcile("ns/web") == POD_GONE_RECHECK
    assert mgr.calls == [] and ctl.vm_api.finalizer_removed == 0


@pytest.mark.parametrize("phase", ["running", "paused"])
def test_cleanup_waits_while_a_domain_of_the_vm_runs_here(tmp_path, phase):
    """The pod is gone as far as the status says, but the guest still runs: its disks stay."""
    vm = make_vm({"nodeName": NODE, "podName": None}, deleting=True)
    mgr = FakeManager(phase)
    ctl = controller(vm, mgr, tmp_path)
    assert ctl.reconcile("ns/web") == POD_GONE_RECHECK
    assert mgr.calls == [] and ctl.vm_api.finalizer_removed == 0


@pytest.mark.parametrize("phase", [None, "shutoff"])
def test_cleanup_removes_the_domain_and_then_the_finalizer(tmp_path, phase):
    vm = make_vm({"nodeName": NODE}, deleting=True)
    mgr = FakeManager(phase)
    ctl = controller(vm, mgr, tmp_path)
    assert ctl.reconcile("ns/web") is None
    disks = ("remove-disks", "ns", UID)
    assert mgr.calls == ([disks] if phase is None else [("remove", "dom"), disks])
    assert ctl.vm_api.finalizer_removed == 1 and ctl.events.reasons == ["NodeStateRemoved"]
