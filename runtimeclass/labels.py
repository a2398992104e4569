"""The Node labels edgevirt writes, and the decision table from what a node can do to their values.

The node labeller (``edgevirt-node label``, in the edgevirt-node-labeller DaemonSet) combines two
views of its node: the probe's verdict on KVM (:mod:`runtimeclass.probe`: a guest must really boot)
and what the node's edgevirt-cri says it serves (CRI ``Status.runtime_handlers``: the kvm handler
is listed only when its backend is available; kata only when containerd-shim-kata-v2 is installed).
The RuntimeClasses select nodes by these labels: ``kvm`` by :data:`LABEL_KVM_HANDLER`, ``kata`` by
:data:`LABEL_KATA`. Pure functions only; no I/O.

=================  ============================  ============  ==========================
edgevirt-cri       ``edgevirt.io/kvm-handler``   ``kata``      ``kvm``, ``accel``
=================  ============================  ============  ==========================
answered           ``kvm`` in its handlers       KVM runs and  the probe: ``true``/``kvm``
                                                 ``kata`` in   when a KVM guest boots,
                                                 its handlers  else ``false``/``tcg``
no socket          ``false`` (not an edgevirt    ``false``     the probe
                   node)
socket, no answer  as it was (``false`` if       as it was     the probe
                   unset): a restart must not
                   unschedule the node
=================  ============================  ============  ==========================
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from .result import LABEL_ACCEL, LABEL_KATA, LABEL_KVM

#: every label of edgevirt on a Node starts with this (uninstall removes them all)
LABEL_PREFIX = "edgevirt.io/"
#: ``true`` when this node's edgevirt-cri serves the ``kvm`` runtime handler (RuntimeClass kvm)
LABEL_KVM_HANDLER = "edgevirt.io/kvm-handler"
#: the labels the labeller owns and sets on every pass
LABELLER_LABELS = (LABEL_KVM, LABEL_ACCEL, LABEL_KATA, LABEL_KVM_HANDLER)
KVM_HANDLER = "kvm"
KATA_HANDLER = "kata"


class Cri(enum.Enum):
    """What the node's edgevirt-cri socket said."""

    ANSWERED = "answered"  # Status answered: its runtime_handlers are known
    ABSENT = "absent"  # no socket at the path: edgevirt-cri does not run on this node
    SILENT = "silent"  # a socket, but no answer (edgevirt-cri restarting, overloaded)


@dataclass(frozen=True)
class CriView:
    state: Cri
    handlers: frozenset[str] = frozenset()

    def describe(self) -> str:
        if self.state is Cri.ANSWERED:
            return f"edgevirt-cri serves {', '.join(sorted(self.handlers)) or 'no handler'}"
        return {Cri.ABSENT: "no edgevirt-cri socket", Cri.SILENT: "edgevirt-cri did not answer"}[self.state]


def _flag(value: bool) -> str:
    return "true" if value else "false"


def node_labels(kvm_ok: bool, cri: CriView, current: Mapping[str, str]) -> dict[str, str]:
    """The labeller's labels for a node (the table in this module's docstring). ``current`` is what
    the Node has now; it matters only while edgevirt-cri does not answer."""
    labels = {LABEL_KVM: _flag(kvm_ok), LABEL_ACCEL: "kvm" if kvm_ok else "tcg"}
    if cri.state is Cri.ANSWERED:
        labels[LABEL_KVM_HANDLER] = _flag(KVM_HANDLER in cri.handlers)
        labels[LABEL_KATA] = _flag(kvm_ok and KATA_HANDLER in cri.handlers)
    elif cri.state is Cri.ABSENT:
        labels[LABEL_KVM_HANDLER] = labels[LABEL_KATA] = "false"
    else:
        labels[LABEL_KVM_HANDLER] = current.get(LABEL_KVM_HANDLER, "false")
        labels[LABEL_KATA] = current.get(LABEL_KATA, "false") if kvm_ok else "false"
    return labels


def is_edgevirt_label(key: str) -> bool:
    return key.startswith(LABEL_PREFIX)


def removal_patch(labels: Mapping[str, str]) -> dict[str, object] | None:
    """A JSON merge patch that removes every ``edgevirt.io/`` label of ``labels`` (None: there is none)."""
    ours = sorted(k for k in labels if is_edgevirt_label(k))
    if not ours:
        return None
    return {"metadata": {"labels": dict.fromkeys(ours)}}


def set_patch(labels: Mapping[str, str]) -> dict[str, object]:
    """A JSON merge patch that sets ``labels`` (only edgevirt.io/ ones: ValueError otherwise)."""
    foreign = sorted(k for k in labels if not is_edgevirt_label(k))
    if foreign:
        raise ValueError(f"the labeller writes only {LABEL_PREFIX} labels, not {', '.join(foreign)}")
    return {"metadata": {"labels": dict(labels)}}
