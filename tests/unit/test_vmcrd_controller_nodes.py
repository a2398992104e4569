"""Cluster mode's reconcile across a drain and a move, with the API as fakes: it never makes a pod while
one of the VM exists (also a terminating one), makes the next one pinned to the same node, reports why
it waits, and pins a stopped VM whose spec.nodeName changed to the new node. The real API server is
the integration tests' part."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vmcrd import api, placement, podspec
from vmcrd.controller import TERMINATING_RECHECK, ClusterController
from vmcrd.strategy import PodState


class Identity:
    def sanitize_for_serialization(self, obj: dict) -> dict:
        return obj


class FakeCore:
    """The pod calls cluster mode makes; ``existing`` is the pod the API server has (if any)."""

    def __init__(self, existing: dict | None = None) -> None:
        self.existing = existing
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.api_client = Identity()

    def create_namespaced_pod(self, namespace: str, body: dict) -> dict:
        if self.existing is not None:  # the name is taken, terminating or not
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(body)
        pod = copy.deepcopy(body)
        pod["metadata"]["uid"] = f"p-{len(self.created)}"
        pod["status"] = {"phase": "Pending"}
        self.existing = pod
        return pod

    def read_namespaced_pod(self, name: str, namespace: str) -> dict:
        assert self.existing is not None
        return self.existing

    def delete_namespaced_pod(self, name: str, namespace: str, body: object = None) -> None:
        self.deleted.append(name)

    def list_namespaced_event(self, namespace: str, field_selector: str = "") -> object:
        return type("EventList", (), {"items": []})()


class FakeVMs:
    def __init__(self) -> None:
        self.status: list[dict] = []

    def patch(self, vm: dict, body: dict) -> dict:
        out = copy.deepcopy(vm)
        for part in ("metadata", "spec"):
            for k, v in (body.get(part) or {}).items():
                if k == "annotations":
                    anns = out[part].setdefault("annotations", {})
                    for ak, av in v.items():
                        anns.pop(ak, None) if av is None else anns.__setitem__(ak, av)
                elif k != "resourceVersion":
                    out[part][k] = v
        return out

    def patch_status(self, vm: dict, fields: dict) -> None:
        self.status.append(fields)

    def remove_finalizer(self, vm: dict) -> None:
        raise AssertionError("a VM that lived on a node keeps its finalizer for node mode")


class FakeEvents:
    def __init__(self) -> None:
        self.told: list[tuple[str, str]] = []

    def emit(self, obj: dict, etype: str, reason: str, message: str) -> None:
        self.told.append((reason, message))


def make_vm(spec: dict, vm_status: dict | None = None, request: str = "") -> dict:
    meta: dict = {
        "name": "web",
        "namespace": "ns",
        "uid": "u-1",
        "generation": 1,
        "resourceVersion": "5",
        "finalizers": [api.FINALIZER],
    }
    if request:
        meta["annotations"] = {api.STATE_REQUEST: request}
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": meta,
        "spec": {"image": "127.0.0.1:5000/vm/d:1", **spec},
        "status": {"nodeName": "n1", **(vm_status or {})},
    }


def node(name: str, ready: str = "True", unschedulable: bool = False) -> dict:
    return placement.node_facts(
        {
            "metadata": {"name": name},
            "spec": {"unschedulable": unschedulable},
            "status": {"conditions": [{"type": "Ready", "status": ready}]},
        }
    )


def controller(vm: dict, pod: dict | None, *nodes: dict) -> ClusterController:
    ctl = ClusterController(client.ApiClient(), namespace="ns")
    ctl.core = FakeCore(pod)  # type: ignore[assignment]
    ctl.vm_api = FakeVMs()  # type: ignore[assignment]
    ctl.events = FakeEvents()  # type: ignore[assignment]
    ctl.vms.cache = {"ns/web": vm}
    ctl.pods.cache = {"ns/web-vm": pod} if pod is not None else {}
    ctl.nodes.cache = {f"/{n['metadata']['name']}": n for n in nodes}
    return ctl


def bound_pod(vm: dict, node_name: str = "n1", phase: str = "Running", terminating: bool = False) -> dict:
    pod = podspec.build_pod(vm, node_name)
    pod["metadata"]["uid"] = "p-0"
    pod["spec"]["nodeName"] = node_name
    pod["status"] = {"phase": phase, "containerStatuses": [{"name": "compute", "state": {"running": {}}}]}
    if terminating:
        pod["metadata"]["deletionTimestamp"] = "2026-05-01T10:00:00Z"
        pod["status"]["conditions"] = [
            {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
        ]
    return pod


def test_cluster_mode_keeps_node_facts_and_waits_for_them_before_reconciling():
    ctl = ClusterController(client.ApiClient())
    assert [i.name for i in ctl.runner.informers] == ["virtualmachines", "pods", "nodes"]
    assert ctl.nodes.transform is placement.node_facts


def test_a_drained_vm_shuts_down_then_waits_pinned_to_its_cordoned_node():
    vm = make_vm({"running": True})
    cordoned = node("n1", unschedulable=True)
    # kubectl drain evicted the pod: it is shutting down (its grace period); nothing is made meanwhile
    ctl = controller(vm, bound_pod(vm, terminating=True), cordoned, node("n2"))
    assert ctl.reconcile("ns/web") == TERMINATING_RECHECK
    assert ctl.core.created == [] and ctl.core.deleted == []
    (stopping,) = ctl.vm_api.status
    assert stopping["printableStatus"] == api.STOPPING and stopping["nodeName"] == "n1"
    ready = next(c for c in stopping["conditions"] if c["type"] == api.COND_READY)
    assert "evicted" in ready["message"]
    # the pod is gone: the next one is pinned to n1 again, tolerates node loss, and waits there
    ctl = controller({**vm, "status": stopping}, None, cordoned, node("n2"))
    ctl.reconcile("ns/web")
    (made,) = ctl.core.created
    assert podspec.pinned_node(made) == "n1" and podspec.tolerates_node_loss(made)
    waiting = ctl.vm_api.status[-1]
    assert waiting["printableStatus"] == api.WAITING_FOR_NODE and waiting["nodeName"] == "n1"
    assert "node n1 is cordoned" in next(
        c["message"] for c in waiting["conditions"] if c["type"] == api.COND_READY
    )
    assert "WaitingForNode" in [reason for reason, _ in ctl.events.told]
    # uncordoned: the same pending pod is no longer said to wait
    pending = ctl.core.existing
    ctl = controller({**vm, "status": waiting}, pending, node("n1"), node("n2"))
    ctl.reconcile("ns/web")
    assert ctl.core.created == [] and ctl.vm_api.status[-1]["printableStatus"] == api.STARTING


@given(
    st.sampled_from(api.STRATEGIES),
    st.sampled_from(["", "start", "stop", "restart:r1", "restart:r2"]),
    st.sampled_from([s for s in PodState if s is not PodState.ABSENT]),
    st.booleans(),
)
def test_no_pod_is_made_while_one_of_the_vm_exists(strategy, request, state, node_lost):
    vm = make_vm({"runStrategy": strategy}, request=request)
    phase = {PodState.SUCCEEDED: "Succeeded", PodState.FAILED: "Failed"}.get(state, "Running")
    pod = bound_pod(vm, phase=phase, terminating=state is PodState.TERMINATING)
    pod["metadata"]["annotations"][podspec.ANN_STATE_REQUEST] = "restart:r1"
    ctl = controller(vm, pod, node("n1", "Unknown" if node_lost else "True"))
    ctl.reconcile("ns/web")
    assert ctl.core.created == []


def test_a_stale_cache_meets_the_pod_the_api_server_still_has_and_makes_no_second_one():
    vm = make_vm({"running": True})
    still_there = bound_pod(vm, terminating=True)
    ctl = controller(vm, None, node("n1"))
    ctl.core.existing = still_there  # the watch has not told us about it yet
    ctl.reconcile("ns/web")
    assert ctl.core.created == []
    assert ctl.vm_api.status[-1]["printableStatus"] == api.STOPPING


@pytest.mark.parametrize(("pin", "where"), [(None, "n1"), ("n2", "n2")])
def test_a_stopped_vm_starts_where_it_lives_unless_spec_node_name_moves_it(pin, where):
    spec = {"running": True, **({"nodeName": pin} if pin else {})}
    vm = make_vm(spec, {"printableStatus": api.STOPPED})
    ctl = controller(vm, None, node("n1"), node("n2"))
    ctl.reconcile("ns/web")
    (made,) = ctl.core.created
    assert podspec.pinned_node(made) == where
    assert ("SuccessfulCreate", f"created VM pod web-vm on {where}") in ctl.events.told


def test_the_controller_account_may_list_and_watch_nodes_and_nothing_more_of_them():
    import yaml

    with open("deploy/manifests/vmcrd-rbac.yaml") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    (role,) = [
        d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "edgevirt-controller"
    ]
    node_rules = [r for r in role["rules"] if "nodes" in r["resources"]]
    assert node_rules == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}]
