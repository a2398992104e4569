"""VirtualMachine status from the VM and its pod: printableStatus, conditions, node, IPs.

Ownership of status fields (each has one writer, so merge patches never fight):

* cluster mode: ``printableStatus``, ``nodeName``, ``podName``, ``ipAddresses``, ``conditions``,
  ``observedGeneration``;
* node mode: ``accel``, ``domainState``, ``volumes``.

The Paused condition is derived by cluster mode from node mode's ``domainState``. What the VM's
node is doing (unreachable, cordoned, not Ready) comes from cluster mode's Node facts through
:mod:`vmcrd.placement`; every function here is pure (``nodes`` None: no Node facts, the pod's word
alone). Each change of printableStatus, a RestartRequired that turns True and a change of node
are also told as Events (:func:`transition_events`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from . import api, placement, podspec
from .api import KubeObject
from .placement import Nodes
from .strategy import PodState, pod_state, wants_running

IMAGE_ERRORS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
FAILURE_STATES = {api.FAILED, api.ERROR_IMAGE, api.UNSCHEDULABLE, api.CRASH_LOOP}
#: Message of RestartRequired=True.
RESTART_MESSAGE = (
    "cpu, memory, image, kernelBoot, cloudInit, networks, nodeName or a non-hotpluggable volume "
    "changed while the VM runs; restart it to apply (kubectl vm restart NAME)"
)
#: RestartRequired's reason -> its message.
RESTART_MESSAGES = {
    "BootSpecChanged": RESTART_MESSAGE,
    "RunStrategyChanged": (
        "runStrategy changed while the VM runs: its pod restarts the guest by the old strategy "
        "(a pod's restartPolicy cannot change); restart the VM to apply (kubectl vm restart NAME)"
    ),
    "PodOutdated": (
        "the VM pod was made by an earlier edgevirt-controller: it lacks the tolerations that keep it "
        "on its node while the node is unreachable (Kubernetes would evict it after 300 s); restart "
        "the VM to apply (kubectl vm restart NAME)"
    ),
}
#: printableStatus values whose transition Event carries the status message (the Ready condition's)
#: although they are no failure.
TOLD_WITH_MESSAGE = {api.STOPPING, api.NODE_UNREACHABLE, api.WAITING_FOR_NODE}
#: printableStatus -> (Event type, Event reason) of a transition into it.
PRINTABLE_EVENTS = {
    api.STOPPED: ("Normal", "Stopped"),
    api.STARTING: ("Normal", "Starting"),
    api.RUNNING: ("Normal", "Started"),
    api.STOPPING: ("Normal", "Stopping"),
    api.PAUSED: ("Normal", "Paused"),
    api.FAILED: ("Warning", "Failed"),
    api.ERROR_IMAGE: ("Warning", "ErrorImage"),
    api.UNSCHEDULABLE: ("Warning", "Unschedulable"),
    api.CRASH_LOOP: ("Warning", "CrashLoop"),
    api.NODE_UNREACHABLE: ("Warning", "NodeUnreachable"),
    api.WAITING_FOR_NODE: ("Normal", "WaitingForNode"),
}


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pod_condition(pod: KubeObject, ctype: str) -> dict[str, Any] | None:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            found: dict[str, Any] = c
            return found
    return None


def _waiting_reason(pod: KubeObject) -> tuple[str, str]:
    st = pod.get("status") or {}
    for cs in (st.get("containerStatuses") or []) + (st.get("initContainerStatuses") or []):
        w = (cs.get("state") or {}).get("waiting")
        if w and w.get("reason"):
            return w["reason"], w.get("message", "")
    return "", ""


def pod_ready(pod: KubeObject | None) -> bool:
    ready = _pod_condition(pod or {}, "Ready")
    return bool(ready and ready.get("status") == "True")


def guest_running(pod: KubeObject) -> bool:
    """The VM pod runs its VM: phase Running and the container started (or the pod Ready).

    Pod readiness alone is not the truth about the guest: after the node's heartbeat lapsed (an API
    server outage, a partition) the node lifecycle controller marks every pod of the node NotReady
    while the VM runs on untouched, until kubelet reports again. The VM stays Running (or Paused)
    then; only its Ready condition follows the pod's.
    """
    st = pod.get("status") or {}
    if st.get("phase") != "Running":
        return False
    running = any((cs.get("state") or {}).get("running") for cs in st.get("containerStatuses") or [])
    return running or pod_ready(pod)


def printable(
    vm: KubeObject,
    pod: KubeObject | None,
    create_error: str = "",
    sandbox_error: str = "",
    nodes: Nodes | None = None,
) -> tuple[str, str]:
    """(printableStatus, message) of a VM given its pod (or None). ``sandbox_error``: kubelet's last
    FailedCreatePodSandBox message for a pod still Pending (kubelet keeps retrying: still Starting).
    ``nodes``: cluster mode's Node facts (:mod:`vmcrd.placement`); a pod on a node that stopped
    reporting is NodeUnreachable whatever it says, one waiting for its cordoned or not Ready node is
    WaitingForNode."""
    spec = vm.get("spec") or {}
    strategy = api.run_strategy(spec)
    request = (vm["metadata"].get("annotations") or {}).get(api.STATE_REQUEST, "")
    state = pod_state(pod)
    if vm["metadata"].get("deletionTimestamp"):
        return (api.STOPPING, "the VM is being deleted") if pod else (api.STOPPED, "the VM is being deleted")
    if state is PodState.ABSENT:
        if create_error:
            return api.FAILED, create_error
        if wants_running(strategy, request):
            return api.STARTING, "creating the VM pod"
        return api.STOPPED, ""
    assert pod is not None
    lost = placement.node_lost(pod, nodes)
    if lost and state in (PodState.ACTIVE, PodState.TERMINATING):
        return lost
    if state is PodState.TERMINATING:
        return api.STOPPING, _stopping_message(pod)
    if state is PodState.SUCCEEDED:
        return api.STOPPED, "the guest shut down"
    if state is PodState.FAILED:
        return api.FAILED, (pod.get("status") or {}).get("message", "") or "the VM pod failed"
    waiting = placement.waiting_for_node(pod, nodes)
    if waiting:
        return waiting
    sched = _pod_condition(pod, "PodScheduled")
    if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        return api.UNSCHEDULABLE, placement.unschedulable_message(pod, sched.get("message", ""))
    reason, message = _waiting_reason(pod)
    if reason in IMAGE_ERRORS:
        return api.ERROR_IMAGE, f"{reason}: {message}".rstrip(": ")
    if reason == "CrashLoopBackOff":
        return api.CRASH_LOOP, message
    if guest_running(pod):
        if ((vm.get("status") or {}).get("domainState") or "").lower() == "paused":
            return api.PAUSED, "the guest is suspended"
        return api.RUNNING, ""
    if sandbox_error:
        return api.STARTING, f"FailedCreatePodSandBox: {sandbox_error}"
    sandbox = _pod_condition(pod, "PodReadyToStartContainers")
    if sandbox and sandbox.get("status") == "False" and sandbox.get("message"):
        return api.STARTING, sandbox["message"]
    return api.STARTING, "waiting for the VM pod to run"


def _stopping_message(pod: KubeObject) -> str:
    """Why a VM pod is shutting down, as far as the pod tells (its DisruptionTarget condition)."""
    disruption = _pod_condition(pod, "DisruptionTarget") or {}
    if disruption.get("status") != "True":
        return "the VM pod is shutting down"
    if disruption.get("reason") == "EvictionByEvictionAPI":
        return (
            "the VM pod was evicted (kubectl drain, or another eviction): the guest is shutting down; "
            "if its runStrategy starts it again, its next pod waits for the same node"
        )
    why = ": ".join(p for p in (disruption.get("reason"), disruption.get("message")) if p)
    return f"the VM pod is shutting down ({why})"


def restart_required(vm: KubeObject, pod: KubeObject | None) -> str:
    """Why the running pod must be made again to follow the VM's spec ("" when it need not): it was
    built from another boot spec (BootSpecChanged), kubelet restarts it by another policy than the
    runStrategy now says (RunStrategyChanged: a pod's restartPolicy cannot change), or it lacks the
    tolerations that keep it on an unreachable node (PodOutdated: made by an earlier controller; a
    pod's tolerations are not the controller's to patch)."""
    if pod_state(pod) is not PodState.ACTIVE:
        return ""
    assert pod is not None
    spec = vm.get("spec") or {}
    have = (pod["metadata"].get("annotations") or {}).get(podspec.ANN_SPEC_HASH)
    if have is not None and have != podspec.spec_hash(spec):
        return "BootSpecChanged"
    policy = (pod.get("spec") or {}).get("restartPolicy")
    if policy is not None and policy != api.restart_policy(spec):
        return "RunStrategyChanged"
    if not podspec.tolerates_node_loss(pod):
        return "PodOutdated"
    return ""


def restarts(pod: KubeObject | None) -> tuple[int, dict[str, Any] | None]:
    """(how often kubelet restarted the VM in its pod, how the guest last ended: reason, exitCode,
    finishedAt, message of the container's last termination)."""
    for cs in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") != podspec.CONTAINER_NAME:
            continue
        last = (cs.get("lastState") or {}).get("terminated")
        ended = None
        if last:
            ended = {
                k: last[k] for k in ("reason", "exitCode", "finishedAt", "message") if last.get(k) is not None
            }
        return int(cs.get("restartCount") or 0), ended
    return 0, None


def set_condition(
    conds: list[dict[str, Any]], ctype: str, status: bool, reason: str, message: str, generation: int
) -> bool:
    """Upsert a condition in place; lastTransitionTime changes only when status does. True if changed."""
    s = "True" if status else "False"
    for c in conds:
        if c["type"] == ctype:
            changed = (c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration")) != (
                s,
                reason,
                message,
                generation,
            )
            if c.get("status") != s:
                c["lastTransitionTime"] = now()
            c.update(status=s, reason=reason, message=message, observedGeneration=generation)
            return changed
    conds.append(
        {
            "type": ctype,
            "status": s,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now(),
            "observedGeneration": generation,
        }
    )
    return True


def compute(
    vm: KubeObject,
    pod: KubeObject | None,
    create_error: str = "",
    sandbox_error: str = "",
    nodes: Nodes | None = None,
) -> dict[str, Any]:
    """The cluster-mode part of the VM's status (a full replacement of those fields): a pure function
    of the VM, its pod, the errors met making it and the Node facts (see :func:`printable`)."""
    old = vm.get("status") or {}
    gen = int(vm["metadata"].get("generation") or 0)
    pstatus, message = printable(vm, pod, create_error, sandbox_error, nodes)
    # the node the VM was actually placed on (its disks are there); a pin alone is not a placement
    node = ((pod or {}).get("spec") or {}).get("nodeName") or old.get("nodeName")
    ips = [p["ip"] for p in ((pod or {}).get("status") or {}).get("podIPs") or [] if p.get("ip")]
    if pod_state(pod) is not PodState.ACTIVE:
        ips = []
    conds = [dict(c) for c in old.get("conditions") or []]
    _set_ready(conds, pstatus, message, pod, gen, placement.not_ready(pod or {}, nodes))
    paused = pstatus == api.PAUSED
    if pstatus != api.NODE_UNREACHABLE or condition_status(old, api.COND_PAUSED) is None:
        # an unreachable node tells nothing new about the guest: Paused stays as it was
        set_condition(
            conds,
            api.COND_PAUSED,
            paused,
            "Suspended" if paused else "NotPaused",
            message if paused else "",
            gen,
        )
    rr = restart_required(vm, pod)
    set_condition(
        conds,
        api.COND_RESTART_REQUIRED,
        bool(rr),
        rr or "UpToDate",
        RESTART_MESSAGES.get(rr, ""),
        gen,
    )
    failed = pstatus in FAILURE_STATES
    reason = pstatus if failed else "NoFailure"
    if sandbox_error and pstatus == api.STARTING:
        failed, reason = True, "FailedCreatePodSandBox"
    set_condition(conds, api.COND_FAILURE, failed, reason, message if failed else "", gen)
    count, ended = restarts(pod)
    out: dict[str, Any] = {
        "printableStatus": pstatus,
        "podName": pod["metadata"]["name"] if pod else None,
        "nodeName": node,
        "ipAddresses": ips,
        "conditions": conds,
        "observedGeneration": gen,
        # kubelet's restarts of the VM in its current pod (a new pod starts again at 0), and how the
        # guest last ended; kept from the last pod while there is none (what happened stays visible)
        "restartCount": count if pod else old.get("restartCount", 0),
        "lastTermination": ended if pod else old.get("lastTermination"),
    }
    return out


def _set_ready(
    conds: list[dict[str, Any]],
    pstatus: str,
    message: str,
    pod: KubeObject | None,
    gen: int,
    node_not_ready: str = "",
) -> None:
    """Ready: the guest runs and its pod is Ready. A running guest whose node reports NotReady says
    so with reason NodeNotReady (``node_not_ready``: the message), one whose pod is not Ready (the
    node has not reported lately, and we know no better) with reason PodNotReady; otherwise the
    reason is the printableStatus (NodeUnreachable, WaitingForNode, ...)."""
    if pstatus == api.RUNNING and node_not_ready:
        set_condition(conds, api.COND_READY, False, "NodeNotReady", node_not_ready, gen)
        return
    if pstatus == api.RUNNING and not pod_ready(pod):
        pod_cond = _pod_condition(pod or {}, "Ready") or {}
        why = pod_cond.get("message") or (
            "the guest runs but its pod is not Ready (the node has not reported to the API server lately)"
        )
        set_condition(conds, api.COND_READY, False, "PodNotReady", why, gen)
        return
    running = pstatus == api.RUNNING
    why = message or ("the guest is running" if running else "")
    set_condition(conds, api.COND_READY, running, pstatus, why, gen)


def differs(vm: KubeObject, new: dict[str, Any]) -> bool:
    """Whether writing ``new`` would change the VM's status (ignoring fields node mode owns)."""
    old = vm.get("status") or {}
    return any(old.get(k) != v for k, v in new.items())


def condition_status(st: dict[str, Any], ctype: str) -> str | None:
    """``status`` ("True"/"False") of the condition ``ctype`` in a status, or None if absent."""
    for c in st.get("conditions") or []:
        if c.get("type") == ctype:
            return str(c.get("status"))
    return None


def transition_events(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events that writing status ``new`` over ``old`` tells."""
    out = []
    if old.get("printableStatus") != new["printableStatus"]:
        etype, reason = PRINTABLE_EVENTS[new["printableStatus"]]
        msg = next(
            (
                c["message"]
                for c in new["conditions"]
                if c["type"] == api.COND_FAILURE and c["status"] == "True"
            ),
            "",
        )
        if not msg and new["printableStatus"] in TOLD_WITH_MESSAGE:
            msg = next((c.get("message") or "" for c in new["conditions"] if c["type"] == api.COND_READY), "")
        change = f"{old.get('printableStatus') or 'New'} -> {new['printableStatus']}"
        out.append((etype, reason, change + (f": {msg}" if msg else "")))
    was, now_on = old.get("nodeName"), new.get("nodeName")
    if was and now_on and was != now_on:
        out.append(("Normal", "NodeChanged", placement.moved_message(was, now_on)))
    before, after = int(old.get("restartCount") or 0), int(new.get("restartCount") or 0)
    if new.get("podName") and new.get("podName") == old.get("podName") and after > before:
        ended = new.get("lastTermination") or {}
        how = f"{ended.get('reason', 'ended')}, exit code {ended.get('exitCode', '?')}"
        out.append(
            (
                "Warning" if ended.get("exitCode") not in (0, None) else "Normal",
                "Restarted",
                f"the guest ended ({how}) and kubelet started it again on its node "
                f"(restart {after} of this pod; {after - before} since the last report)",
            )
        )
    old_rr = condition_status(old, api.COND_RESTART_REQUIRED)
    if condition_status(new, api.COND_RESTART_REQUIRED) == "True" and old_rr != "True":
        out.append(
            (
                "Warning",
                "RestartRequired",
                next(
                    (c.get("message") for c in new["conditions"] if c["type"] == api.COND_RESTART_REQUIRED),
                    RESTART_MESSAGE,
                ),
            )
        )
    return out
