"""Routing of edgevirt-cri with in-process fake backends: handler -> backend, ID -> backend (and its
persistence across a restart of the router), List merging with filters, unknown handlers, a backend
that is down, UNIMPLEMENTED from a backend lacking a method, and Version/Status answers."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
from cri_fake import FakeBackend, api

from cri_shim import runtime_status as local
from cri_shim.errors import BackendError
from cri_shim.router import Router
from cri_shim.state import IdIndex


def make_router(tmp_path, ctd=None, vm=None) -> tuple[Router, FakeBackend, FakeBackend]:
    ctd = ctd or FakeBackend("containerd", images=True)
    vm = vm or FakeBackend("kvm")
    r = Router(
        {"containerd": ctd, "kvm": vm},
        {"": "containerd", "runc": "containerd", "kata": "containerd", "kvm": "kvm"},
        IdIndex(tmp_path / "state"),
    )
    return r, ctd, vm


def run_pod(r: Router, handler: str, name: str, labels: dict | None = None) -> str:
    req = api.RunPodSandboxRequest(
        runtime_handler=handler,
        config=api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, namespace="default", uid=name), labels=labels or {}
        ),
    )
    return api.RunPodSandboxResponse.FromString(
        r.call("RunPodSandbox", req.SerializeToString())
    ).pod_sandbox_id


def create_ctr(r: Router, sid: str, name: str) -> str:
    req = api.CreateContainerRequest(
        pod_sandbox_id=sid, config=api.ContainerConfig(metadata=api.ContainerMetadata(name=name))
    )
    return api.CreateContainerResponse.FromString(
        r.call("CreateContainer", req.SerializeToString())
    ).container_id


def list_pods(r: Router, **filt) -> list:
    req = api.ListPodSandboxRequest(filter=api.PodSandboxFilter(**filt) if filt else None)
    return list(
        api.ListPodSandboxResponse.FromString(r.call("ListPodSandbox", req.SerializeToString())).items
    )


def list_ctrs(r: Router, **filt) -> list:
    req = api.ListContainersRequest(filter=api.ContainerFilter(**filt) if filt else None)
    return list(
        api.ListContainersResponse.FromString(r.call("ListContainers", req.SerializeToString())).containers
    )


def test_run_pod_sandbox_goes_to_the_handlers_backend(tmp_path):
    r, ctd, vm = make_router(tmp_path)
    s_default = run_pod(r, "", "a")
    s_runc = run_pod(r, "runc", "b")
    s_kvm = run_pod(r, "kvm", "c")
    assert set(ctd.sandboxes) == {s_default, s_runc}
    assert set(vm.sandboxes) == {s_kvm}


def test_unknown_handler_is_rejected_listing_the_known_ones(tmp_path):
    r, ctd, vm = make_router(tmp_path)
    with pytest.raises(BackendError) as e:
        run_pod(r, "gvisor", "x")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    msg = e.value.message
    assert "RunPodSandboxRequest.runtime_handler" in msg and '"gvisor"' in msg
    for h in ('""', '"kata"', '"kvm"', '"runc"'):
        assert h in msg
    assert not ctd.sandboxes and not vm.sandboxes


def test_unavailable_handler_says_why(tmp_path):
    ctd = FakeBackend("containerd", images=True)
    r = Router(
        {"containerd": ctd},
        {"": "containerd"},
        IdIndex(tmp_path / "s"),
        unavailable={"kvm": "handler 'kvm' is configured, but no /dev/kvm and no qemu"},
    )
    with pytest.raises(BackendError) as e:
        run_pod(r, "kvm", "x")
    assert "no /dev/kvm and no qemu" in e.value.message


def test_later_calls_follow_the_sandbox_and_container_ids(tmp_path):
    r, ctd, vm = make_router(tmp_path)
    s_ctd, s_vm = run_pod(r, "runc", "a"), run_pod(r, "kvm", "b")
    c_ctd, c_vm = create_ctr(r, s_ctd, "x"), create_ctr(r, s_vm, "y")
    assert c_ctd in ctd.containers and c_vm in vm.containers
    for cid, owner in ((c_ctd, ctd), (c_vm, vm)):
        r.call("StartContainer", api.StartContainerRequest(container_id=cid).SerializeToString())
        assert owner.containers[cid].state == api.CONTAINER_RUNNING
    r.call("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=s_vm).SerializeToString())
    assert vm.sandboxes[s_vm].state == api.SANDBOX_NOTREADY
    assert ctd.sandboxes[s_ctd].state == api.SANDBOX_READY
    # No call probed the other backend: routing came from the index.
    assert "PodSandboxStatus" not in ctd.calls + vm.calls and "ContainerStatus" not in ctd.calls + vm.calls


def test_id_mapping_survives_a_restart(tmp_path):
    r, ctd, vm = make_router(tmp_path)
    s_vm = run_pod(r, "kvm", "b")
    c_vm = create_ctr(r, s_vm, "y")
    r.close()
    # A new router over the same state dir and the same (still running) backends.
    r2, _, _ = make_router(tmp_path, ctd=ctd, vm=vm)
    ctd.calls.clear()
    vm.calls.clear()
    r2.call("StartContainer", api.StartContainerRequest(container_id=c_vm).SerializeToString())
    r2.call("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=s_vm).SerializeToString())
    assert vm.calls == ["StartContainer", "StopPodSandbox"]
    assert ctd.calls == []


def test_removing_a_sandbox_forgets_it_and_its_containers(tmp_path):
    r, _ctd, _vm = make_router(tmp_path)
    s = run_pod(r, "kvm", "b")
    c = create_ctr(r, s, "y")
    assert (tmp_path / "state" / "sandboxes" / s).exists() and (
        tmp_path / "state" / "containers" / c
    ).exists()
    r.call("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=s).SerializeToString())
    assert not (tmp_path / "state" / "sandboxes" / s).exists()
    assert not (tmp_path / "state" / "containers" / c).exists()
    # Removing again is idempotent: the ID is unknown everywhere; the default backend answers (success).
    r.call("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=s).SerializeToString())


def test_an_id_missing_from_the_index_is_found_by_asking_the_backends(tmp_path):
    r, _ctd, vm = make_router(tmp_path)
    s = run_pod(r, "kvm", "b")
    # Lose the record (e.g. created by an older shim without state).
    r.index.remove_sandbox(s)
    r.call("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=s).SerializeToString())
    assert vm.sandboxes[s].state == api.SANDBOX_NOTREADY
    assert r.index.sandbox_backend(s) == "kvm"


def test_an_unknown_id_gets_the_default_backends_not_found(tmp_path):
    r, ctd, _vm = make_router(tmp_path)
    with pytest.raises(BackendError) as e:
        r.call("StartContainer", api.StartContainerRequest(container_id="f" * 64).SerializeToString())
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert ctd.calls[-1] == "StartContainer"


def test_empty_id_is_invalid_argument_naming_the_field(tmp_path):
    r, _, _ = make_router(tmp_path)
    with pytest.raises(BackendError) as e:
        r.call("StartContainer", api.StartContainerRequest().SerializeToString())
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "StartContainerRequest.container_id" in e.value.message


def test_lists_fan_out_and_merge_with_filters(tmp_path):
    r, _ctd, vm = make_router(tmp_path)
    a = run_pod(r, "runc", "a", {"app": "web"})
    b = run_pod(r, "kvm", "b", {"app": "web"})
    c = run_pod(r, "kvm", "c", {"app": "db"})
    assert {p.id for p in list_pods(r)} == {a, b, c}
    assert {p.id for p in list_pods(r, label_selector={"app": "web"})} == {a, b}
    assert {p.id for p in list_pods(r, id=c)} == {c}
    r.call("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=b).SerializeToString())
    ready = api.PodSandboxStateValue(state=api.SANDBOX_READY)
    assert {p.id for p in list_pods(r, state=ready)} == {a, c}
    ca, cb = create_ctr(r, a, "x"), create_ctr(r, b, "y")
    assert {x.id for x in list_ctrs(r)} == {ca, cb}
    assert {x.id for x in list_ctrs(r, pod_sandbox_id=b)} == {cb}
    # Images: only backends with an image store are asked.
    imgs = api.ListImagesResponse.FromString(
        r.call("ListImages", api.ListImagesRequest().SerializeToString())
    )
    assert [i.id for i in imgs.images] == ["sha256:containerd"]
    assert "ListImages" not in vm.calls


def test_a_backend_that_is_down_does_not_hide_the_others(tmp_path):
    r, ctd, vm = make_router(tmp_path)
    a = run_pod(r, "runc", "a")
    b = run_pod(r, "kvm", "b")
    assert {p.id for p in list_pods(r)} == {a, b}
    ctd.down = True
    # containerd's pods come from its last answer to the same request: they do not vanish.
    assert {p.id for p in list_pods(r)} == {a, b}
    # A request containerd never answered before: only the live backend's items.
    assert {p.id for p in list_pods(r, label_selector={"never": "asked"})} == set()
    assert {p.id for p in list_pods(r, id=b)} == {b}
    # Calls for containerd's sandbox fail UNAVAILABLE; the VM backend keeps working.
    with pytest.raises(BackendError) as e:
        r.call("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=a).SerializeToString())
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    r.call("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=b).SerializeToString())
    c = run_pod(r, "kvm", "c")
    assert c in vm.sandboxes
    # When every backend is down, the default backend's error is returned.
    vm.down = True
    with pytest.raises(BackendError) as e:
        list_pods(r)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "containerd" in e.value.message


def test_a_backend_lacking_a_method_answers_unimplemented(tmp_path):
    r, ctd, _vm = make_router(tmp_path)
    s = run_pod(r, "kvm", "b")
    c = create_ctr(r, s, "y")
    with pytest.raises(BackendError) as e:
        r.call("ExecSync", api.ExecSyncRequest(container_id=c, cmd=["true"]).SerializeToString())
    assert e.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert "kvm" in e.value.message and "ExecSync" in e.value.message
    # In a fan-out, a backend without the method is left out, not an error...
    ctd.list_container_stats = lambda req: api.ListContainerStatsResponse(
        stats=[api.ContainerStats(attributes=api.ContainerAttributes(id="c1"))]
    )
    resp = r.call("ListContainerStats", api.ListContainerStatsRequest().SerializeToString())
    assert [s.attributes.id for s in api.ListContainerStatsResponse.FromString(resp).stats] == ["c1"]
    # ...and when no backend has it, the answer is UNIMPLEMENTED.
    with pytest.raises(BackendError) as e:
        r.call("ListPodSandboxMetrics", api.ListPodSandboxMetricsRequest().SerializeToString())
    assert e.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_version_answers_edgevirt():
    v = api.VersionResponse.FromString(local.version(api.VersionRequest(version="v1").SerializeToString()))
    assert (v.version, v.runtime_name, v.runtime_version, v.runtime_api_version) == (
        "0.1.0",
        "edgevirt",
        "0.1.0",
        "v1",
    )


def _status(r: Router) -> api.StatusResponse:
    return api.StatusResponse.FromString(local.status(r, api.StatusRequest(verbose=True).SerializeToString()))


def test_status_lists_handlers_whose_backend_is_up(tmp_path):
    r, _ctd, vm = make_router(tmp_path)
    st = _status(r)
    conds = {c.type: c.status for c in st.status.conditions}
    assert conds == {"RuntimeReady": True, "NetworkReady": True}
    assert sorted(h.name for h in st.runtime_handlers) == ["", "kata", "kvm", "runc"]
    vm.down = True
    st = _status(r)
    assert sorted(h.name for h in st.runtime_handlers) == ["", "kata", "runc"]
    assert {c.type: c.status for c in st.status.conditions}["RuntimeReady"] is True
    info = json.loads(st.info["edgevirt"])
    assert info["backends"]["kvm"]["ready"] is False and "down" in info["backends"]["kvm"]["error"]


def test_status_is_not_ready_when_the_default_backend_is_down(tmp_path):
    r, ctd, _vm = make_router(tmp_path)
    ctd.down = True
    st = _status(r)
    conds = {c.type: c for c in st.status.conditions}
    assert conds["RuntimeReady"].status is False and conds["NetworkReady"].status is False
    assert "containerd" in conds["RuntimeReady"].message
    assert sorted(h.name for h in st.runtime_handlers) == ["kvm"]


def test_status_asks_the_backends_on_long_lived_threads_not_new_ones_per_call(tmp_path, monkeypatch):
    # kubelet asks Status every 5 s: a thread started and ended per call leaves allocator memory
    # behind each time (edgevirt-cri grew idle in issue 12's long run)
    r, _ctd, _vm = make_router(tmp_path)
    _status(r)  # the router's fan-out threads start on first use
    started = []
    real_start = threading.Thread.start

    def counting_start(self):
        started.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    for _ in range(20):
        _status(r)
    assert len(started) <= 2, started  # at most the pool growing to one thread per backend


def test_removes_of_unknown_ids_succeed_as_cri_requires(tmp_path):
    r, ctd, _vm = make_router(tmp_path)

    def not_found(req):
        raise BackendError(grpc.StatusCode.NOT_FOUND, "an error occurred when try to find sandbox: not found")

    ctd.stop_pod_sandbox = not_found  # what containerd 1.6 answers for an unknown sandbox
    unknown = "e" * 64
    assert (
        r.call("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=unknown).SerializeToString()) == b""
    )
    assert (
        r.call("RemoveContainer", api.RemoveContainerRequest(container_id=unknown).SerializeToString()) == b""
    )
    # Not for calls that must report a missing object.
    with pytest.raises(BackendError) as e:
        r.call("PodSandboxStatus", api.PodSandboxStatusRequest(pod_sandbox_id=unknown).SerializeToString())
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_prune_drops_records_of_ids_the_backend_no_longer_has(tmp_path):
    r, ctd, vm = make_router(tmp_path)
    a, b = run_pod(r, "runc", "a"), run_pod(r, "kvm", "b")
    ca = create_ctr(r, a, "x")
    # Removed behind the shim's back (e.g. crictl rmp straight to containerd while the shim was down).
    del ctd.sandboxes[a]
    del ctd.containers[ca]
    vm.down = True  # a backend that does not answer keeps its records
    assert r.prune() == 2
    assert r.index.sandbox_backend(a) is None and r.index.container_backend(ca) is None
    assert r.index.sandbox_backend(b) == "kvm"
