"""Which Events a status change tells (vmcrd.status.transition_events) and which VM a pod event is
about (vmcrd.resources.vm_key_of_pod)."""

from __future__ import annotations

from vmcrd import api
from vmcrd.resources import vm_key_of_pod
from vmcrd.status import transition_events


def st(printable, failure="", restart_required=False):
    return {
        "printableStatus": printable,
        "conditions": [
            {"type": api.COND_FAILURE, "status": "True" if failure else "False", "message": failure},
            {"type": api.COND_RESTART_REQUIRED, "status": "True" if restart_required else "False"},
        ],
    }


def test_a_new_vm_tells_its_first_state():
    assert transition_events({}, st(api.STARTING)) == [("Normal", "Starting", "New -> Starting")]


def test_a_failure_tells_its_message_as_a_warning():
    got = transition_events(st(api.STARTING), st(api.UNSCHEDULABLE, failure="0/1 nodes are available"))
    assert got == [("Warning", "Unschedulable", "Starting -> Unschedulable: 0/1 nodes are available")]


def test_no_change_no_event_and_restart_required_told_once():
    assert transition_events(st(api.RUNNING), st(api.RUNNING)) == []
    rr = transition_events(st(api.RUNNING), st(api.RUNNING, restart_required=True))
    assert [(t, r) for t, r, _ in rr] == [("Warning", "RestartRequired")]
    assert (
        transition_events(st(api.RUNNING, restart_required=True), st(api.RUNNING, restart_required=True))
        == []
    )


def test_every_printable_state_has_an_event():
    for printable in (api.STOPPED, api.STARTING, api.RUNNING, api.STOPPING, api.PAUSED, api.FAILED):
        ((etype, reason, _),) = transition_events({"printableStatus": "x"}, st(printable))
        assert etype in ("Normal", "Warning") and reason


def test_pod_events_map_to_their_vm():
    pod = {"metadata": {"name": "web-vm", "labels": {"edgevirt.io/vm": "web"}}}
    assert vm_key_of_pod("ns/web-vm", pod) == "ns/web"
    assert vm_key_of_pod("ns/db-vm", None) == "ns/db"  # deleted: no longer cached, the name tells
    assert vm_key_of_pod("ns/other", {"metadata": {"name": "other", "labels": {}}}) is None


def test_restarts_by_kubelet_are_told_once_with_how_the_guest_ended():
    def running(count, ended=None, pod="web-vm"):
        return {**st(api.RUNNING), "podName": pod, "restartCount": count, "lastTermination": ended}

    crash = {"reason": "Error", "exitCode": 139, "finishedAt": "2026-12-02T08:00:00Z"}
    ((etype, reason, msg),) = transition_events(running(0), running(2, crash))
    assert (etype, reason) == ("Warning", "Restarted")
    assert "Error, exit code 139" in msg and "restart 2" in msg and "2 since the last report" in msg
    assert transition_events(running(2, crash), running(2, crash)) == []
    poweroff = {"reason": "Completed", "exitCode": 0}
    assert [e[:2] for e in transition_events(running(2, crash), running(3, poweroff))] == [
        ("Normal", "Restarted")
    ]
    # a new pod starts counting again: that is no restart by kubelet
    assert transition_events(running(3, poweroff), running(0, None, pod="web-vm")) == []
    assert transition_events(running(3, poweroff, pod=None), running(1, crash)) == []
