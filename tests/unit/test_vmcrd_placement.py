"""Multi-node behaviour without a cluster (vmcrd.placement, with vmcrd.podspec and vmcrd.status): the
VM pod stays on its node through node loss (tolerations, NodeUnreachable), waits for its cordoned node
after a drain (WaitingForNode), and names its node when it cannot be scheduled; the Node facts
cluster mode keeps are small. A real two-node cluster is the integration tests' part."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmcrd import api, placement, podspec, status
from vmcrd.kube import Informer
from vmcrd.resources import node_informer

UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
names = st.from_regex(r"[a-z]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)


def make_vm(spec: dict | None = None, vm_status: dict | None = None) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "web", "namespace": "ns", "uid": "u-1", "generation": 2},
        "spec": {"image": "127.0.0.1:5000/vm/d:1", "running": True, **(spec or {})},
        "status": vm_status or {},
    }


def vm_pod(vm: dict, node: str = "n1", bound: bool = True, running: bool = True, **status_extra) -> dict:
    """The controller's pod for ``vm`` pinned to ``node``; bound there and running, or Pending."""
    pod = podspec.build_pod(vm, node)
    pod["metadata"]["uid"] = "p-1"
    if bound:
        pod["spec"]["nodeName"] = node
    if running:
        pod["status"] = {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "compute", "ready": True, "state": {"running": {}}}],
            "podIPs": [{"ip": "10.0.0.7"}],
        }
    else:
        pod["status"] = {"phase": "Pending"}
    pod["status"].update(status_extra)
    return pod


def node(name: str = "n1", ready: str | None = "True", unschedulable: bool = False, **ready_extra) -> dict:
    """A Node as the API serves it, heartbeat and images included."""
    conds = [{"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": "2026-05-01T10:00:00Z"}]
    if ready is not None:
        conds.append(
            {
                "type": "Ready",
                "status": ready,
                "lastHeartbeatTime": "2026-05-01T10:00:00Z",
                "lastTransitionTime": "2026-05-01T09:00:00Z",
                **ready_extra,
            }
        )
    n = {
        "metadata": {"name": name, "resourceVersion": "7", "labels": {"edgevirt.io/kvm-handler": "true"}},
        "spec": {"unschedulable": True} if unschedulable else {},
        "status": {
            "conditions": conds,
            "images": [{"names": [f"registry/img-{i}:1"], "sizeBytes": 1000 + i} for i in range(50)],
        },
    }
    return n


def nodes(*objs: dict) -> dict[str, dict]:
    return {o["metadata"]["name"]: placement.node_facts(o) for o in objs}


UNKNOWN = {"reason": "NodeStatusUnknown", "message": "Kubelet stopped posting node status."}


def cond(st_: dict, ctype: str) -> dict:
    return next(c for c in st_["conditions"] if c["type"] == ctype)


# ------------------------------------------------------------------ the pod


@given(names, st.one_of(st.none(), names))
def test_every_vm_pod_tolerates_node_loss_forever_and_names_its_pin(vm_name, pin):
    vm = make_vm()
    vm["metadata"]["name"] = vm_name
    pod = podspec.build_pod(vm, pin)
    tolerations = pod["spec"]["tolerations"]
    assert {(t["key"], t["operator"], t["effect"]) for t in tolerations} == {
        (UNREACHABLE_TAINT, "Exists", "NoExecute"),
        (NOT_READY_TAINT, "Exists", "NoExecute"),
    }
    assert all("tolerationSeconds" not in t for t in tolerations)  # forever, not the default 300 s
    assert podspec.tolerates_node_loss(pod)
    assert podspec.pinned_node(pod) == pin


@pytest.mark.parametrize(
    ("tolerations", "forever"),
    [
        # what the DefaultTolerationSeconds admission plugin gave pods made before
        (
            [
                {"key": k, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
                for k in (NOT_READY_TAINT, UNREACHABLE_TAINT)
            ],
            False,
        ),
        ([{"key": UNREACHABLE_TAINT, "operator": "Exists", "effect": "NoExecute"}], False),
        ([{"operator": "Exists"}], True),  # tolerates everything
        ([{"operator": "Exists", "effect": "NoExecute"}], True),
        (None, False),
    ],
)
def test_what_counts_as_tolerating_node_loss(tolerations, forever):
    assert podspec.tolerates_node_loss({"spec": {"tolerations": tolerations}}) is forever


def test_a_running_pod_made_before_the_tolerations_asks_for_a_restart():
    vm = make_vm()
    pod = vm_pod(vm)
    assert status.restart_required(vm, pod) == ""
    pod["spec"]["tolerations"] = [
        {"key": k, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
        for k in (NOT_READY_TAINT, UNREACHABLE_TAINT)
    ]
    assert status.restart_required(vm, pod) == "PodOutdated"
    rr = cond(status.compute(vm, pod), api.COND_RESTART_REQUIRED)
    assert rr["status"] == "True" and "300 s" in rr["message"] and "kubectl vm restart" in rr["message"]


# ------------------------------------------------------------------ the Node facts


def test_only_the_ready_condition_and_the_cordon_of_a_node_are_kept():
    facts = placement.node_facts(node("n1", "Unknown", unschedulable=True, **UNKNOWN))
    assert facts == {
        "metadata": {"name": "n1"},
        "ready": "Unknown",
        "reason": "NodeStatusUnknown",
        "message": "Kubelet stopped posting node status.",
        "since": "2026-05-01T09:00:00Z",
        "unschedulable": True,
        "taints": [],
    }
    assert placement.node_facts(node("n2", ready=None))["ready"] == "Unknown"  # registering
    assert placement.node_facts(node("n3"))["unschedulable"] is False
    tainted = node("n4")
    tainted["spec"]["taints"] = [
        {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"},  # the Ready condition says it
        {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
        {"key": "gpu", "value": "x", "effect": "NoSchedule"},
        {"key": "soft", "effect": "PreferNoSchedule"},
    ]
    assert placement.node_facts(tainted)["taints"] == ["gpu", "node.kubernetes.io/unschedulable"]


class ListWatchOf:
    """A ListWatch serving one list, then one watch of ``events``, after which it sets ``done``."""

    def __init__(self, items: list[dict], events: list[dict]) -> None:
        self.items, self.events = items, events
        self.done = threading.Event()

    def list(self) -> dict:
        return {"items": self.items, "metadata": {"resourceVersion": "10"}}

    def watch(self, resource_version: str, timeout_seconds: int):
        yield from self.events
        self.done.set()


class Queued:
    """The work queue as the informers use it: what was added, in order."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def add(self, key: str) -> None:
        self.keys.append(key)


def test_the_node_informer_keeps_facts_and_wakes_only_the_vms_of_a_node_whose_facts_changed():
    on_n1 = make_vm(vm_status={"nodeName": "n1"})
    pinned_n1 = make_vm({"nodeName": "n1"}, {"nodeName": "n0"})  # moved: its next pod goes to n1
    pinned_n1["metadata"]["name"] = "db"
    elsewhere = make_vm(vm_status={"nodeName": "n2"})
    elsewhere["metadata"]["name"] = "other"
    vms = Informer("virtualmachines", ListWatchOf([on_n1, pinned_n1, elsewhere], []), lambda k: None)
    vms.relist()
    heartbeat_only = node("n1")
    heartbeat_only["metadata"]["resourceVersion"] = "11"
    heartbeat_only["status"]["conditions"][1]["lastHeartbeatTime"] = "2026-05-01T10:00:40Z"
    events = [
        {"type": "MODIFIED", "object": heartbeat_only},
        {"type": "MODIFIED", "object": node("n1", "Unknown", **UNKNOWN)},
    ]
    queue = Queued()
    source = ListWatchOf([node("n1"), node("n2")], events)
    inf = node_informer(queue, vms, source)  # type: ignore[arg-type]
    rv = inf.relist()
    assert sorted(queue.keys) == ["ns/db", "ns/other", "ns/web"]
    queue.keys.clear()
    inf.watch(rv, source.done)
    assert sorted(queue.keys) == ["ns/db", "ns/web"]  # the Ready change, once; not the heartbeat
    assert inf.get("/n1") == placement.node_facts(node("n1", "Unknown", **UNKNOWN))
    by_name = placement.NodesByName(inf)
    assert set(by_name) == {"n1", "n2"} and len(by_name) == 2 and by_name.get("n3") is None
    assert by_name["n1"]["ready"] == "Unknown"


# ------------------------------------------------------------------ node loss


def test_a_vm_on_a_node_that_stopped_reporting_is_node_unreachable_and_comes_back_by_itself():
    vm = make_vm(vm_status={"nodeName": "n1"})
    pod = vm_pod(vm)
    up = nodes(node("n1"), node("n2"))
    before = status.compute(vm, pod, nodes=up)
    assert before["printableStatus"] == api.RUNNING and cond(before, api.COND_READY)["status"] == "True"
    vm["status"] = {**before, "domainState": "Paused"}
    vm["status"]["conditions"] = [
        {**c, "status": "True"} if c["type"] == api.COND_PAUSED else c for c in before["conditions"]
    ]
    # the node lifecycle controller: Ready Unknown on the Node, the pod's Ready False (MarkPodsNotReady
    # changes the status only), the pod's phase and containers as kubelet last said
    pod["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    lost = nodes(node("n1", "Unknown", **UNKNOWN), node("n2"))
    s = status.compute(vm, pod, nodes=lost)
    assert s["printableStatus"] == api.NODE_UNREACHABLE
    ready = cond(s, api.COND_READY)
    assert ready["status"] == "False" and ready["reason"] == api.NODE_UNREACHABLE
    assert "node n1 is unreachable since 2026-05-01T09:00:00Z" in ready["message"]
    assert "NodeStatusUnknown" in ready["message"] and "not started elsewhere" in ready["message"]
    assert cond(s, api.COND_FAILURE)["status"] == "False"
    assert cond(s, api.COND_PAUSED)["status"] == "True"  # no news about the guest: kept
    assert s["nodeName"] == "n1" and s["podName"] == "web-vm" and s["ipAddresses"] == ["10.0.0.7"]
    # kubelet reports again: the pod is Ready, and so is the VM
    vm["status"] = {**s, "domainState": "Running"}
    pod["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    again = status.compute(vm, pod, nodes=up)
    assert again["printableStatus"] == api.RUNNING and cond(again, api.COND_READY)["status"] == "True"


@pytest.mark.parametrize("pod_ready", [True, False])
def test_whatever_the_stale_pod_says_its_unreachable_node_wins(pod_ready):
    vm = make_vm(vm_status={"nodeName": "n1"})
    for pod in (
        vm_pod(vm),
        vm_pod(vm, running=False),  # was still starting
        vm_pod(vm, containerStatuses=[{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}]),
    ):
        pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if pod_ready else "False"}]
        assert status.printable(vm, pod, nodes=nodes(node("n1", "Unknown")))[0] == api.NODE_UNREACHABLE


def test_a_vm_whose_node_was_deleted_or_whose_pod_is_stopping_there_says_so():
    vm = make_vm(vm_status={"nodeName": "n1"})
    gone, msg = status.printable(vm, vm_pod(vm), nodes=nodes(node("n2")))
    assert gone == api.NODE_UNREACHABLE and "node n1 no longer exists" in msg
    stopping = vm_pod(vm)
    stopping["metadata"]["deletionTimestamp"] = "2026-05-01T10:01:00Z"
    pstatus, msg = status.printable(vm, stopping, nodes=nodes(node("n1", "Unknown")))
    assert pstatus == api.NODE_UNREACHABLE and "web-vm is being deleted" in msg
    # a finished pod is final, whatever its node does; without Node facts the pod alone speaks
    assert status.printable(vm, vm_pod(vm, phase="Succeeded"), nodes=nodes(node("n1", "Unknown")))[0] == (
        api.STOPPED
    )
    assert status.printable(vm, vm_pod(vm))[0] == api.RUNNING


def test_a_running_vm_on_a_node_that_reports_not_ready_stays_running_but_not_ready():
    vm = make_vm(vm_status={"nodeName": "n1"})
    sick = node("n1", "False", reason="KubeletNotReady", message="container runtime is down")
    s = status.compute(vm, vm_pod(vm), nodes=nodes(sick))
    ready = cond(s, api.COND_READY)
    assert s["printableStatus"] == api.RUNNING
    assert (ready["status"], ready["reason"]) == ("False", "NodeNotReady")
    assert "node n1 is not Ready" in ready["message"] and "container runtime is down" in ready["message"]


# ------------------------------------------------------------------ drain


def test_an_evicted_pod_says_so_and_its_successor_waits_for_the_cordoned_node():
    vm = make_vm(vm_status={"nodeName": "n1"})
    evicted = vm_pod(vm)
    evicted["metadata"]["deletionTimestamp"] = "2026-05-01T10:00:00Z"
    evicted["status"]["conditions"].append(
        {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "EvictionByEvictionAPI",
            "message": "Eviction API: evicting",
        }
    )
    cordoned = nodes(node("n1", unschedulable=True), node("n2"))
    pstatus, msg = status.printable(vm, evicted, nodes=cordoned)
    assert pstatus == api.STOPPING and "evicted" in msg and "kubectl drain" in msg
    # the controller makes the pod again, pinned to n1; the scheduler cannot place it there
    successor = vm_pod(vm, bound=False, running=False)
    successor["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/2 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, "
            "1 node(s) were unschedulable.",
        }
    ]
    s = status.compute(vm, successor, nodes=cordoned)
    assert s["printableStatus"] == api.WAITING_FOR_NODE
    ready = cond(s, api.COND_READY)
    assert ready["reason"] == api.WAITING_FOR_NODE and cond(s, api.COND_FAILURE)["status"] == "False"
    assert "node n1 is cordoned (unschedulable)" in ready["message"]
    assert "kubectl uncordon n1" in ready["message"] and "docs/virtualmachine.md" in ready["message"]
    assert s["nodeName"] == "n1" and s["ipAddresses"] == []
    # uncordoned: the scheduler's verdict is from before (it found only the cordon in the way) and
    # its retry comes: still waiting, no Unschedulable in between (seen on a real drain + uncordon)
    up = nodes(node("n1"), node("n2"))
    pstatus, msg = status.printable(vm, successor, nodes=up)
    assert pstatus == api.WAITING_FOR_NODE and "node n1 takes pods again (uncordoned)" in msg
    # a retry between the uncordon and the removal of the cordon's taint fails on a taint (the
    # message does not say which; seen on a real drain): waiting while the node has no other taint
    successor["status"]["conditions"][0]["message"] = (
        "0/2 nodes are available: 1 node(s) didn't satisfy plugin(s) [NodeAffinity], 1 node(s) had "
        "untolerated taint(s). no new claims to deallocate, preemption: 0/2 nodes are available: 2 "
        "Preemption is not helpful for scheduling."
    )
    lifting = node("n1")
    lifting["spec"]["taints"] = [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]
    assert status.printable(vm, successor, nodes=nodes(lifting, node("n2")))[0] == api.WAITING_FOR_NODE
    assert status.printable(vm, successor, nodes=up)[0] == api.WAITING_FOR_NODE
    # ... but a node with a taint of its own keeps the VM off: the scheduler's word
    lifting["spec"]["taints"].append({"key": "maintenance", "effect": "NoSchedule"})
    assert status.printable(vm, successor, nodes=nodes(lifting, node("n2")))[0] == api.UNSCHEDULABLE
    successor["status"]["conditions"] = []
    assert status.printable(vm, successor, nodes=up)[0] == api.STARTING
    # a verdict with another reason than the cordon is the scheduler's word
    successor["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/2 nodes are available: 1 Insufficient memory, 1 node(s) were unschedulable. "
            "preemption: 0/2 nodes are available: 2 Preemption is not helpful for scheduling.",
        }
    ]
    assert status.printable(vm, successor, nodes=up)[0] == api.UNSCHEDULABLE


@pytest.mark.parametrize(("ready", "word"), [("Unknown", "unreachable"), ("False", "not Ready")])
def test_a_new_pod_for_a_node_that_is_not_ready_waits_for_it(ready, word):
    vm = make_vm(vm_status={"nodeName": "n1"})
    pstatus, msg = status.printable(
        vm, vm_pod(vm, bound=False, running=False), nodes=nodes(node("n1", ready), node("n2"))
    )
    assert pstatus == api.WAITING_FOR_NODE and f"node n1 is {word}" in msg


def test_unschedulable_names_the_node_the_vm_is_pinned_to():
    vm = make_vm({"nodeName": "n1"})
    pod = vm_pod(vm, bound=False, running=False)
    pod["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/2 nodes: memory"}
    ]
    for known in (None, nodes(node("n1"), node("n2"))):
        s = status.compute(vm, pod, nodes=known)
        assert s["printableStatus"] == api.UNSCHEDULABLE
        assert cond(s, api.COND_FAILURE)["message"] == (
            "the VM is pinned to node n1 (status.nodeName or spec.nodeName): 0/2 nodes: memory"
        )
    pstatus, msg = status.printable(vm, pod, nodes=nodes(node("n2")))
    assert pstatus == api.UNSCHEDULABLE and "pinned to node n1, which does not exist" in msg
    # a first start (no pin): the scheduler's word as it is
    free = make_vm()
    first = vm_pod(free, bound=False, running=False)
    del first["spec"]["affinity"]
    first["status"]["conditions"] = pod["status"]["conditions"]
    assert status.printable(free, first, nodes=nodes(node("n1")))[1] == "0/2 nodes: memory"


# ------------------------------------------------------------------ Events


def test_node_states_are_told_with_their_message_and_a_new_node_is_told_once():
    vm = make_vm(vm_status={"nodeName": "n1"})
    running = status.compute(vm, vm_pod(vm), nodes=nodes(node("n1")))
    lost = status.compute({**vm, "status": running}, vm_pod(vm), nodes=nodes(node("n1", "Unknown")))
    ((etype, reason, msg),) = status.transition_events(running, lost)
    assert (etype, reason) == ("Warning", "NodeUnreachable")
    assert msg.startswith("Running -> NodeUnreachable: node n1 is unreachable")
    waiting = status.compute(
        {**vm, "status": running}, vm_pod(vm, bound=False, running=False), nodes=nodes(node("n1", "Unknown"))
    )
    ((etype, reason, msg),) = status.transition_events(running, waiting)
    assert (etype, reason) == ("Normal", "WaitingForNode") and "node n1 is unreachable" in msg
    # spec.nodeName moved the stopped VM to n2: its first pod there is bound
    moved = make_vm({"nodeName": "n2"}, running)
    on_n2 = status.compute(moved, vm_pod(moved, node="n2"), nodes=nodes(node("n1"), node("n2")))
    assert on_n2["nodeName"] == "n2"
    told = status.transition_events(running, on_n2)
    assert [(t, r) for t, r, _ in told] == [("Normal", "NodeChanged")]
    assert "was n1" in told[0][2] and "stay there until the VM is deleted" in told[0][2]
    assert status.transition_events(on_n2, on_n2) == []


def test_every_new_printable_state_is_in_the_crd_enum_and_has_an_event():
    import yaml

    with open("deploy/manifests/virtualmachine-crd.yaml") as f:
        crd = yaml.safe_load(f)
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    enum = props["status"]["properties"]["printableStatus"]["enum"]
    assert set(enum) == set(status.PRINTABLE_EVENTS)
    assert {api.NODE_UNREACHABLE, api.WAITING_FOR_NODE} <= set(enum)
