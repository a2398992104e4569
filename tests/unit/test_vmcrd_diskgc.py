"""Node mode's collection of VM disks no VirtualMachine owns (vmcrd.diskgc), with a real disk folder
layout (cri_shim.vm.DiskManager) and a stand-in for libvirt."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from cri_shim.vm import DiskManager, DiskOwner
from vmcrd.diskgc import DiskCollector, orphans

REPO = Path(__file__).resolve().parents[2]


def vm(ns: str, uid: str) -> dict:
    return {"metadata": {"namespace": ns, "name": f"vm-{uid}", "uid": uid}}


def test_orphans_are_owners_without_a_vm_and_only_in_the_watched_namespace():
    owners = [("a", "u1"), ("a", "u2"), ("b", "u1"), ("b", "u3")]
    vms = [vm("a", "u1"), vm("b", "u3")]
    # u1 of namespace b is not a's u1: the pair is the identity
    assert orphans(owners, vms) == [("a", "u2"), ("b", "u1")]
    assert orphans(owners, vms, namespace="a") == [("a", "u2")]


@dataclass
class State:
    phase: str


class FakeManager:
    """The part of DomainManager the collector uses: real disks, domains as a dict."""

    def __init__(self, disks: DiskManager, running: dict[tuple[str, str], str]) -> None:
        self.disks = disks
        self.running = running
        self.removed: list[tuple[str, str]] = []

    def vm_domains(self, ns: str, uid: str) -> list[str]:
        return [f"dom-{uid}"] if (ns, uid) in self.running else []

    def state(self, name: str) -> State:
        return State(next(p for (_, u), p in self.running.items() if f"dom-{u}" == name))

    def remove_vm(self, ns: str, uid: str) -> None:
        self.removed.append((ns, uid))
        self.disks.remove_vm_disks(ns, uid)


class FakeInformer:
    def __init__(self, vms: list[dict]) -> None:
        self.synced = threading.Event()
        self._vms = vms

    def values(self) -> list[dict]:
        return list(self._vms)


def test_collects_old_unowned_disks_that_no_running_domain_uses(tmp_path: Path):
    disks = DiskManager(tmp_path / "state")
    for ns, uid in (("a", "owned"), ("a", "gone"), ("a", "young"), ("a", "busy"), ("b", "gone")):
        disks.empty_disk(DiskOwner("vm", uid, ns), "d", "1Mi")
    disks.empty_disk(DiskOwner("pod", "p1", "a"), "d", "1Mi")  # a plain pod's: never judged here
    old = 1_000_000.0
    for ns, uid in (("a", "owned"), ("a", "gone"), ("a", "busy"), ("b", "gone")):
        os.utime(disks.dir_for("vm", uid, ns), (old, old))
    mgr = FakeManager(disks, running={("a", "busy"): "running"})
    informer = FakeInformer([vm("a", "owned")])
    gc = DiskCollector(lambda: disks, lambda: mgr, informer, namespace=None, grace=600)  # type: ignore[arg-type,return-value]
    assert gc.collect_once(now=old + 10_000) == []  # not synced yet: judges nothing
    informer.synced.set()
    assert gc.collect_once(now=old + 10_000) == [("a", "gone"), ("b", "gone")]
    left = set(disks.vm_disk_owners())
    assert left == {("a", "owned"), ("a", "young"), ("a", "busy")}
    assert disks.dir_for("pod", "p1", "a").is_dir()
    # watching one namespace only: the other namespace's disks are not its to judge
    disks.empty_disk(DiskOwner("vm", "gone2", "b"), "d", "1Mi")
    os.utime(disks.dir_for("vm", "gone2", "b"), (old, old))
    gc_a = DiskCollector(lambda: disks, lambda: mgr, informer, namespace="a", grace=600)  # type: ignore[arg-type,return-value]
    assert gc_a.collect_once(now=old + 10_000) == []
    assert ("b", "gone2") in disks.vm_disk_owners()


def test_libvirt_is_needed_only_when_there_are_unowned_disks_to_judge(tmp_path: Path):
    """A node without VM disks, or with only owned or young ones, never builds the DomainManager
    (libvirt's module and a connection): the collector lists the folders with the disk layer alone."""
    disks = DiskManager(tmp_path / "state")
    built: list[FakeManager] = []

    def manager() -> FakeManager:
        built.append(FakeManager(disks, running={}))
        return built[-1]

    informer = FakeInformer([vm("a", "owned")])
    informer.synced.set()
    gc = DiskCollector(lambda: disks, manager, informer, grace=600)  # type: ignore[arg-type]
    now = 1_000_000.0
    assert gc.collect_once(now=now) == [] and built == []  # no disks at all
    disks.empty_disk(DiskOwner("vm", "owned", "a"), "d", "1Mi")
    disks.empty_disk(DiskOwner("vm", "young", "a"), "d", "1Mi")
    os.utime(disks.dir_for("vm", "owned", "a"), (now - 10_000, now - 10_000))
    os.utime(disks.dir_for("vm", "young", "a"), (now - 10, now - 10))
    assert gc.collect_once(now=now) == [] and built == []  # owned, or too young to judge
    os.utime(disks.dir_for("vm", "young", "a"), (now - 10_000, now - 10_000))
    assert gc.collect_once(now=now) == [("a", "young")] and len(built) == 1


def test_node_mode_s_collector_loads_libvirt_only_for_an_old_unowned_disk_folder(tmp_path: Path):
    """The collector NodeController.run starts, in a fresh interpreter: on a node without VM disks its
    pass leaves libvirt unloaded; an unowned folder older than the grace builds the DomainManager (over
    libvirt's in-process test driver here), which shares the controller's disk layer."""
    code = f"""
import os, sys, threading
from pathlib import Path
from cri_shim.vm import DiskOwner
from vmcrd import diskgc
from vmcrd.node import NodeController
class Kube:  # never called: the informer is not started
    pass
started = []
diskgc.DiskCollector.start = lambda self, stop: started.append(self)
ctl = NodeController(Kube(), "n", state_dir=Path({str(tmp_path / "state")!r}), libvirt_uri="test:///default")
ctl.runner.run = lambda stop: None
ctl.run(threading.Event())
(gc,) = started
ctl.vms.synced.set()
assert gc.collect_once() == []
print("libvirt" in sys.modules, ctl._manager is None)
ctl.disks.empty_disk(DiskOwner("vm", "gone", "a"), "d", "1Mi")
assert gc.collect_once() == [] and ctl._manager is None  # too young to judge
os.utime(ctl.disks.dir_for("vm", "gone", "a"), (0, 0))
assert gc.collect_once() == [("a", "gone")]
print("libvirt" in sys.modules, ctl.manager.disks is ctl.disks, ctl.disks.vm_disk_owners())
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["False True", "True True []"]
