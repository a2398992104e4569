"""runStrategy: given what the VM asks for and what its pod is doing, what to do next.

A pure decision table (KubeVirt's semantics, on pods instead of VMIs), so it can be tested
exhaustively without a cluster:

============== ============ =========== ============ ============ =============
strategy       no pod       pod active  pod stopping pod Succeeded pod Failed
============== ============ =========== ============ ============ =============
Always         create       -           wait         delete (*)   delete (*)
RerunOnFailure create       -           wait         -            delete (*)
Manual         -            -           wait         -            -
Halted         -            delete      wait         delete       delete
Once           create       -           wait         halt         halt
============== ============ =========== ============ ============ =============

(*) and create again once it is gone. ``halt`` sets ``spec.runStrategy: Halted`` (as KubeVirt does),
after which the Halted row removes the finished pod. Requests (annotation ``edgevirt.io/state-request``):
``start`` creates the pod where the strategy alone would not (Manual, a Succeeded RerunOnFailure),
``stop`` keeps Manual / RerunOnFailure / Once stopped, ``restart:<id>`` deletes a pod not created
for that id and creates one that is. A VM being deleted only ever deletes its pod.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class PodState(enum.Enum):
    ABSENT = "absent"
    ACTIVE = "active"  # Pending or Running, not being deleted
    TERMINATING = "terminating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Action(enum.Enum):
    NONE = "none"
    CREATE = "create"
    DELETE = "delete"
    HALT = "halt"  # set spec.runStrategy to Halted


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    clear_request: bool = False  # remove the state-request annotation (it has been served)
    ignored_request: bool = False  # the request means nothing for this strategy/state


def pod_state(pod: dict[str, Any] | None) -> PodState:
    """Classify a pod (as a dict) for the decision table."""
    if pod is None:
        return PodState.ABSENT
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return PodState.TERMINATING
    phase = (pod.get("status") or {}).get("phase")
    if phase == "Succeeded":
        return PodState.SUCCEEDED
    if phase == "Failed":
        return PodState.FAILED
    return PodState.ACTIVE


#: The table of the module docstring without requests: (strategy, pod state) -> action; a pair not
#: listed (and any strategy the schema would have refused) is Action.NONE.
BY_STRATEGY: dict[str, dict[PodState, Action]] = {
    "Always": {
        PodState.ABSENT: Action.CREATE,
        PodState.SUCCEEDED: Action.DELETE,
        PodState.FAILED: Action.DELETE,
    },
    "RerunOnFailure": {PodState.ABSENT: Action.CREATE, PodState.FAILED: Action.DELETE},
    "Manual": {},
    "Halted": {
        PodState.ACTIVE: Action.DELETE,
        PodState.SUCCEEDED: Action.DELETE,
        PodState.FAILED: Action.DELETE,
    },
    "Once": {PodState.ABSENT: Action.CREATE, PodState.SUCCEEDED: Action.HALT, PodState.FAILED: Action.HALT},
}


def _by_strategy(strategy: str, state: PodState) -> Decision:
    return Decision(BY_STRATEGY.get(strategy, {}).get(state, Action.NONE))


def decide(
    strategy: str,
    state: PodState,
    request: str = "",
    pod_request: str = "",
    deleting: bool = False,
) -> Decision:
    """What to do now. ``request`` is the VM's state-request annotation (``start``, ``stop``,
    ``restart:<id>`` or empty), ``pod_request`` the one the existing pod was created for."""
    exists = state in (PodState.ACTIVE, PodState.SUCCEEDED, PodState.FAILED)
    finished = state in (PodState.SUCCEEDED, PodState.FAILED)
    if deleting:
        return Decision(Action.DELETE if exists else Action.NONE)
    if state is PodState.TERMINATING:
        return Decision(Action.NONE)
    action = request.split(":", 1)[0] if request else ""

    if action == "restart":
        if strategy == "Halted":
            return Decision(Action.NONE, clear_request=True, ignored_request=True)
        if state is PodState.ABSENT:
            return Decision(Action.CREATE, clear_request=True)
        if pod_request != request:
            return Decision(Action.DELETE)
        # the pod was made for this restart: served; continue with the strategy's own rules
        return dataclasses.replace(_by_strategy(strategy, state), clear_request=True)

    if action == "start":
        if strategy in ("Always", "Halted"):
            return dataclasses.replace(
                _by_strategy(strategy, state), clear_request=True, ignored_request=strategy == "Halted"
            )
        if state is PodState.ACTIVE:
            return Decision(Action.NONE, clear_request=True)
        if finished:
            return Decision(Action.DELETE)
        return Decision(Action.CREATE, clear_request=True)

    if action == "stop" and strategy in ("Manual", "RerunOnFailure", "Once"):
        return Decision(Action.DELETE if exists else Action.NONE)

    if action and action not in ("start", "stop", "restart"):
        return dataclasses.replace(_by_strategy(strategy, state), clear_request=True, ignored_request=True)
    return _by_strategy(strategy, state)


def wants_running(strategy: str, request: str = "") -> bool:
    """Whether the VM is meant to be up (for Starting vs Stopped while no pod exists)."""
    action = request.split(":", 1)[0] if request else ""
    if action == "stop" and strategy in ("Manual", "RerunOnFailure", "Once"):
        return False
    if action in ("start", "restart") and strategy != "Halted":
        return True
    return strategy in ("Always", "RerunOnFailure", "Once")
