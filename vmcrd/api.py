"""Names and small accessors of the VirtualMachine API (edgevirt.io/v1alpha1).

Everything that both the controller and the kubectl-vm plugin need to agree on lives here:
the group/version/plural, the annotations users (or the plugin) put on a VirtualMachine to ask
for an action, the finalizer, and the helpers that read a VM's desired run strategy.
"""

from __future__ import annotations

from typing import Any

#: A Kubernetes object as the API server serves it in JSON (camelCase keys): VMs, pods, events.
KubeObject = dict[str, Any]

GROUP = "edgevirt.io"
VERSION = "v1alpha1"
KIND = "VirtualMachine"
PLURAL = "virtualmachines"
API_VERSION = f"{GROUP}/{VERSION}"

#: Finalizer on every VirtualMachine: its node-local disks and state are removed before it goes.
FINALIZER = "edgevirt.io/node-cleanup"

#: Annotation on a VirtualMachine asking for a one-off action (what KubeVirt does with the
#: start/stop/restart subresources; ours is plain metadata so ``kubectl annotate``/``patch`` works):
#: ``start``, ``stop`` or ``restart:<unique id>``. ``start`` and ``restart`` are consumed (removed)
#: by the controller once done; ``stop`` stays as the VM's "keep stopped" state for the strategies
#: whose stop cannot be expressed in spec (Manual, RerunOnFailure, Once) until a ``start`` replaces it.
STATE_REQUEST = "edgevirt.io/state-request"

STRATEGIES = ("Always", "RerunOnFailure", "Manual", "Halted", "Once")

#: Printable states (status.printableStatus).
STOPPED, STARTING, RUNNING, STOPPING, PAUSED, FAILED = (
    "Stopped",
    "Starting",
    "Running",
    "Stopping",
    "Paused",
    "Failed",
)
ERROR_IMAGE, UNSCHEDULABLE, CRASH_LOOP = "ErrorImage", "Unschedulable", "CrashLoop"
#: The VM's node stopped reporting (or its Node is gone): what its pod says is stale (vmcrd.placement).
NODE_UNREACHABLE = "NodeUnreachable"
#: The VM's pod waits for the node it is pinned to: cordoned, not Ready or unreachable (vmcrd.placement).
WAITING_FOR_NODE = "WaitingForNode"

COND_READY, COND_PAUSED, COND_RESTART_REQUIRED, COND_FAILURE = (
    "Ready",
    "Paused",
    "RestartRequired",
    "Failure",
)


def run_strategy(spec: dict[str, Any]) -> str:
    """The effective runStrategy: ``running: true|false`` maps to Always|Halted; neither -> Halted."""
    if spec.get("runStrategy"):
        return str(spec["runStrategy"])
    if "running" in spec and spec["running"] is not None:
        return "Always" if spec["running"] else "Halted"
    return "Halted"


#: What kubelet does on its own when a VM's guest ends (the VM pod's ``restartPolicy``): the part of
#: a runStrategy that holds without the API server (an edge node's uplink may be down for hours).
#: Always: every end (a guest power-off too); RerunOnFailure: a crash or a destroy, not a power-off
#: (exit 0); the others: nothing, the controller decides once it is back.
RESTART_POLICIES = {"Always": "Always", "RerunOnFailure": "OnFailure"}


def restart_policy(spec: dict[str, Any]) -> str:
    """The VM pod's ``restartPolicy`` for the VM's effective runStrategy (see RESTART_POLICIES)."""
    return RESTART_POLICIES.get(run_strategy(spec), "Never")


def parse_request(value: str | None) -> tuple[str, str]:
    """``"restart:abc"`` -> ("restart", "restart:abc"); ``"stop"`` -> ("stop", "stop"); None -> ("", "")."""
    if not value:
        return "", ""
    action = value.split(":", 1)[0].strip()
    return action, value


def pod_name(vm_name: str) -> str:
    """The VM pod's name: deterministic, so a restarted controller never makes a second one."""
    return f"{vm_name}-vm"
