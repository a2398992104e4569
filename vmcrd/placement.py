"""Where a VM runs: its node, what cluster mode knows of that node, and what that means for its status.

A VM's first pod is placed by the scheduler among the nodes labelled ``edgevirt.io/kvm-handler=true``
(RuntimeClass kvm's nodeSelector), or on ``spec.nodeName``; from then on every pod of the VM is pinned
to that node (``status.nodeName``) by a required node affinity (:mod:`vmcrd.podspec`), because its
writable disks are node-local. The VM never moves by itself:

* **node loss**: the pod tolerates the node lifecycle controller's NoExecute taints forever
  (:data:`vmcrd.podspec.TOLERATIONS`), so it is not evicted and nothing starts elsewhere; while the
  node's Ready condition is Unknown (or its Node is gone) the VM is ``NodeUnreachable``
  (:func:`node_lost`): what its pod says is stale. When the node reports again so does the pod, and
  the status follows by itself;
* **drain**: the eviction ends the pod gracefully; the controller makes it again, pinned to the same
  node, where it waits (``WaitingForNode``, :func:`waiting_for_node`) while the node is cordoned,
  unreachable or not Ready, and starts once the node takes pods again.

Cluster mode watches Nodes but keeps only what this needs (:func:`node_facts`: the Ready condition
and the cordon, not the whole Node), by node name (:class:`NodesByName`). All else here is pure: a
function of the pod and those facts (``nodes`` None: no knowledge of Nodes, nothing is said).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from . import api, podspec
from .api import KubeObject

if TYPE_CHECKING:
    from .kube import Informer

#: Node name -> :func:`node_facts` of that Node; a name missing: no such Node.
Nodes = Mapping[str, KubeObject]
#: Where docs/virtualmachine.md tells how to move a VM on purpose.
MOVE_DOCS = "docs/virtualmachine.md, Nodes"


def node_facts(node: KubeObject) -> KubeObject:
    """What cluster mode keeps of a Node (the node informer's transform): its name, its Ready
    condition (status, reason, message, lastTransitionTime: not the heartbeat, which changes with
    every report), its cordon (``spec.unschedulable``) and the keys of its scheduling taints
    (NoSchedule, NoExecute) but those that mirror the Ready condition. A Ready condition that is
    missing (a node registering) counts as Unknown."""
    conditions = (node.get("status") or {}).get("conditions") or []
    ready: KubeObject = next((c for c in conditions if c.get("type") == "Ready"), {})
    return {
        "metadata": {"name": node["metadata"]["name"]},
        "ready": ready.get("status") or "Unknown",
        "reason": ready.get("reason") or "",
        "message": ready.get("message") or "",
        "since": ready.get("lastTransitionTime") or "",
        "unschedulable": bool((node.get("spec") or {}).get("unschedulable")),
        "taints": sorted(
            {
                str(t.get("key"))
                for t in (node.get("spec") or {}).get("taints") or []
                if t.get("effect") in ("NoSchedule", "NoExecute") and t.get("key") not in LIFECYCLE_TAINTS
            }
        ),
    }


#: Taints the node lifecycle controller mirrors the Ready condition with (the facts have that
#: already; VM pods tolerate the NoExecute ones, :data:`vmcrd.podspec.TOLERATIONS`)
LIFECYCLE_TAINTS = frozenset(podspec.NODE_LOSS_TAINTS)
#: ... and the one it mirrors the cordon with
CORDON_TAINT = "node.kubernetes.io/unschedulable"


class NodesByName(Mapping[str, KubeObject]):
    """The node informer's cache by node name (its keys are ``/<name>``: Nodes have no namespace)."""

    def __init__(self, informer: Informer) -> None:
        self.informer = informer

    def __getitem__(self, name: str) -> KubeObject:
        facts = self.informer.get(f"/{name}")
        if facts is None:
            raise KeyError(name)
        return facts

    def __iter__(self) -> Iterator[str]:
        return (key.split("/", 1)[1] for key in self.informer.cached_keys())

    def __len__(self) -> int:
        return len(self.informer.cached_keys())


def vm_nodes(vm: KubeObject) -> set[str]:
    """The nodes whose changes concern the VM: where it lives (``status.nodeName``) and where it is
    pinned (``spec.nodeName``; its next pod goes there)."""
    names = ((vm.get("status") or {}).get("nodeName"), (vm.get("spec") or {}).get("nodeName"))
    return {n for n in names if n}


def _ready_detail(facts: KubeObject) -> str:
    """`` since T (Reason: message)`` of a node's Ready condition, as far as it says."""
    why = ": ".join(p for p in (facts.get("reason"), (facts.get("message") or "").rstrip(".")) if p)
    since = f" since {facts['since']}" if facts.get("since") else ""
    return since + (f" ({why})" if why else "")


def node_lost(pod: KubeObject, nodes: Nodes | None) -> tuple[str, str] | None:
    """(``NodeUnreachable``, message) for a pod bound to a node that stopped reporting (Ready
    Unknown) or whose Node was deleted: the pod's own status is stale then. None otherwise."""
    name = (pod.get("spec") or {}).get("nodeName")
    if nodes is None or not name:
        return None
    facts = nodes.get(name)
    if facts is not None and facts["ready"] != "Unknown":
        return None
    pod_name = pod["metadata"]["name"]
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        then = (
            f"the VM pod {pod_name} is being deleted and goes once the node's kubelet has stopped the "
            "guest (or the node is declared out of service); the VM is not started elsewhere meanwhile"
        )
    elif facts is None:
        then = (
            f"Kubernetes removes the VM pod {pod_name} bound to it; the VM is not started on another "
            f"node (its disks were on {name}) but waits for a node of that name"
        )
    else:
        then = (
            "the VM stays on it (its disks are there) and is not started elsewhere; its status "
            "follows the node's again once the node reports"
        )
    if facts is None:
        return api.NODE_UNREACHABLE, f"node {name} no longer exists (its Node was deleted): {then}"
    return api.NODE_UNREACHABLE, f"node {name} is unreachable{_ready_detail(facts)}: {then}"


def waiting_for_node(pod: KubeObject, nodes: Nodes | None) -> tuple[str, str] | None:
    """(printableStatus, message) for a pod not yet bound whose pinned node cannot take it:
    ``WaitingForNode`` while that node is cordoned, unreachable or not Ready, ``Unschedulable`` when
    there is no such Node. None otherwise (the scheduler's word then, :func:`unschedulable_message`)."""
    name = podspec.pinned_node(pod)
    if nodes is None or not name or (pod.get("spec") or {}).get("nodeName"):
        return None
    facts = nodes.get(name)
    if facts is None:
        return api.UNSCHEDULABLE, (
            f"the VM is pinned to node {name}, which does not exist (no Node of that name): it starts "
            f"when that node joins; to run it elsewhere set spec.nodeName ({MOVE_DOCS})"
        )
    if facts["unschedulable"]:
        return api.WAITING_FOR_NODE, (
            f"node {name} is cordoned (unschedulable): the VM starts there when it is uncordoned "
            f"(kubectl uncordon {name}); it is pinned to {name} (its disks are node-local); to move "
            f"it, see {MOVE_DOCS}"
        )
    if facts["ready"] != "True":
        state = "unreachable" if facts["ready"] == "Unknown" else "not Ready"
        return api.WAITING_FOR_NODE, (
            f"node {name} is {state}{_ready_detail(facts)}: the VM starts there once the node is "
            f"Ready; it is pinned to {name} (its disks are node-local); to move it, see {MOVE_DOCS}"
        )
    if _only_cordon_kept_it(_unschedulable_message(pod), facts):
        # uncordoned a moment ago: the scheduler's verdict is from before, its retry comes
        return api.WAITING_FOR_NODE, (
            f"node {name} takes pods again (uncordoned): waiting for the scheduler to place the VM pod there"
        )
    return None


#: The scheduler's reason for a cordoned node in its Unschedulable message (NodeUnschedulable), for
#: a node with a taint the pod does not tolerate (TaintToleration: the cordon's own taint stays a
#: moment after the uncordon), and NodeAffinity's for the other nodes (the pod is pinned to one).
CORDONED_REASON = "node(s) were unschedulable"
TAINT_REASONS = ("untolerated taint",)
AFFINITY_REASONS = ("didn't match Pod's node affinity/selector", "didn't satisfy plugin(s) [NodeAffinity]")


def _only_cordon_kept_it(message: str, facts: KubeObject) -> bool:
    """The scheduler's message ("0/2 nodes are available: 1 node(s) didn't satisfy plugin(s)
    [NodeAffinity], 1 node(s) had untolerated taint(s). preemption: ...") gives only the cordon (or
    a taint, while the pinned node now has none but the cordon's) besides node affinity: for a pod
    pinned to a node that takes pods again, that verdict is from before the uncordon."""
    if "nodes are available: " not in message:
        return False
    reasons = message.split("nodes are available: ", 1)[1].split(". ", 1)[0].rstrip(".").split(", ")
    kinds = set()
    for r in reasons:
        if CORDONED_REASON in r:
            kinds.add("cordon")
        elif any(t in r for t in TAINT_REASONS):
            kinds.add("taint")
        elif not any(a in r for a in AFFINITY_REASONS):
            kinds.add("other")
    blocking = [t for t in facts.get("taints") or [] if t != CORDON_TAINT]
    return bool(kinds) and kinds <= {"cordon", "taint"} and not ("taint" in kinds and blocking)


def _unschedulable_message(pod: KubeObject) -> str:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return str(cond.get("message") or "") if cond.get("reason") == "Unschedulable" else ""
    return ""


def unschedulable_message(pod: KubeObject, scheduler_message: str) -> str:
    """The scheduler's reason for a pending pod, naming the node the VM is pinned to (if any)."""
    name = podspec.pinned_node(pod)
    if not name:
        return scheduler_message
    return f"the VM is pinned to node {name} (status.nodeName or spec.nodeName): {scheduler_message}"


def not_ready(pod: KubeObject, nodes: Nodes | None) -> str:
    """Why a running VM is not Ready when its node reports itself NotReady (Ready False: kubelet
    is alive, something on the node is not), else ""."""
    name = (pod.get("spec") or {}).get("nodeName")
    facts = nodes.get(name) if nodes is not None and name else None
    if facts is None or facts["ready"] != "False":
        return ""
    return f"node {name} is not Ready{_ready_detail(facts)}; its kubelet reports the guest running"


def moved_message(old_node: str, new_node: str) -> str:
    """The Event of a VM that now lives on another node (its pin, ``spec.nodeName``, was changed)."""
    return (
        f"the VM now lives on node {new_node} (was {old_node}); its writable disks (image overlay, "
        f"emptyDisks) do not move with it: on {new_node} it has the ones it left there (new ones if it "
        f"never ran there), and those on {old_node} stay there until the VM is deleted"
    )
