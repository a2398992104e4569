"""The runStrategy decision table (vmcrd.strategy): exhaustive and property-based checks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmcrd import api
from vmcrd.strategy import Action, PodState, decide, pod_state, wants_running

A, S, T, OK, F = PodState.ABSENT, PodState.ACTIVE, PodState.TERMINATING, PodState.SUCCEEDED, PodState.FAILED
C, D, N, H = Action.CREATE, Action.DELETE, Action.NONE, Action.HALT

# KubeVirt's semantics on pods: (strategy, pod state) -> action with no request pending.
TABLE = {
    "Always": {A: C, S: N, T: N, OK: D, F: D},
    "RerunOnFailure": {A: C, S: N, T: N, OK: N, F: D},
    "Manual": {A: N, S: N, T: N, OK: N, F: N},
    "Halted": {A: N, S: D, T: N, OK: D, F: D},
    "Once": {A: C, S: N, T: N, OK: H, F: H},
}


@pytest.mark.parametrize(("strategy", "state"), list(itertools.product(api.STRATEGIES, PodState)))
def test_table_without_requests(strategy, state):
    assert decide(strategy, state).action is TABLE[strategy][state]


@given(
    st.sampled_from(api.STRATEGIES),
    st.sampled_from(list(PodState)),
    st.sampled_from(["", "start", "stop", "restart:x"]),
)
def test_deleting_vm_only_ever_deletes_an_existing_pod(strategy, state, request):
    d = decide(strategy, state, request, deleting=True)
    exists = state in (S, OK, F)
    assert d.action is (D if exists else N)


@given(st.sampled_from(api.STRATEGIES), st.sampled_from(["", "start", "stop", "restart:a"]))
def test_terminating_pod_is_always_waited_for(strategy, request):
    assert decide(strategy, T, request, "").action is N


@pytest.mark.parametrize("strategy", ["Manual", "RerunOnFailure", "Once"])
def test_stop_request_keeps_stopped(strategy):
    assert decide(strategy, S, "stop").action is D
    assert decide(strategy, A, "stop").action is N
    assert not decide(strategy, A, "stop").clear_request  # "stop" persists as the stopped state
    assert not wants_running(strategy, "stop")


@pytest.mark.parametrize("strategy", ["Manual", "RerunOnFailure", "Once"])
def test_start_request_creates_then_is_consumed(strategy):
    d = decide(strategy, A, "start")
    assert d.action is C and d.clear_request
    assert decide(strategy, S, "start") == decide(strategy, S, "start").__class__(N, clear_request=True)
    # a finished pod is removed first; the next round creates
    assert decide(strategy, OK, "start").action is D


def test_manual_never_acts_by_itself():
    for state in PodState:
        assert decide("Manual", state).action is N


@given(st.sampled_from(["Always", "RerunOnFailure", "Manual", "Once"]), st.text(min_size=1, max_size=8))
def test_restart_replaces_only_a_pod_not_made_for_it(strategy, rid):
    req = f"restart:{rid}"
    assert decide(strategy, S, req, pod_request="").action is D
    assert decide(strategy, S, req, pod_request="restart:other" + rid).action is D
    served = decide(strategy, S, req, pod_request=req)
    assert served.action is N and served.clear_request
    created = decide(strategy, A, req)
    assert created.action is C and created.clear_request


def test_restart_of_halted_is_ignored():
    d = decide("Halted", A, "restart:1")
    assert d.action is N and d.clear_request and d.ignored_request


def test_unknown_request_is_ignored_and_cleared():
    d = decide("Always", S, "reboot")
    assert d.ignored_request and d.clear_request and d.action is N


def test_pod_state_classification():
    assert pod_state(None) is A
    assert pod_state({"metadata": {"deletionTimestamp": "x"}, "status": {"phase": "Running"}}) is T
    assert pod_state({"metadata": {}, "status": {"phase": "Succeeded"}}) is OK
    assert pod_state({"metadata": {}, "status": {"phase": "Failed"}}) is F
    assert pod_state({"metadata": {}, "status": {"phase": "Pending"}}) is S
    assert pod_state({"metadata": {}}) is S


@given(st.one_of(st.none(), st.booleans()), st.one_of(st.none(), st.sampled_from(api.STRATEGIES)))
def test_running_maps_to_always_or_halted(running, strategy):
    spec = {}
    if running is not None:
        spec["running"] = running
    if strategy is not None:
        spec["runStrategy"] = strategy
    got = api.run_strategy(spec)
    if strategy is not None:
        assert got == strategy
    else:
        assert got == ("Always" if running else "Halted")
