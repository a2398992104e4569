"""``edgevirt-node label``: the node labeller - what this node can run, as labels on its Node.

Each pass: the probe's verdict on KVM (:func:`runtimeclass.probe.probe`: a guest must really boot
under KVM, with a timeout; cached, so a pass re-probes only when the boot, kernel or QEMU changed or
``/dev/kvm`` came or went), and what the node's edgevirt-cri serves (CRI ``Status`` on its socket:
``runtime_handlers``). :func:`runtimeclass.labels.node_labels` turns both into the labels
``edgevirt.io/kvm``, ``edgevirt.io/accel``, ``edgevirt.io/kata`` and ``edgevirt.io/kvm-handler``,
written with one JSON merge patch of the Node (only those keys; the account may change nothing else,
admission policy ``edgevirt-node-own-node-labels-only``). It needs no read access: the patch answers
with the Node's labels, which is all a pass that cannot ask edgevirt-cri needs to keep them as they
were. Passes run at start and every ``--interval`` seconds (``--retry`` after a failure), or once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runtimeclass.labels import Cri, CriView, node_labels, set_patch
from runtimeclass.result import LABEL_ACCEL, LABEL_KVM, ProbeResult

from .cri_status import STATUS_METHOD as STATUS_METHOD  # the method asked, for callers and tests
from .cri_status import query
from .kubeapi import NodeApi, NodeApiError

log = logging.getLogger("edgevirt-node.label")

KVM_DEVICE = Path("/dev/kvm")


#: how long a missing socket is waited for before a pass calls edgevirt-cri absent: a restart of
#: edgevirt-cri (an upgrade, a crash) removes its socket for a second or two, and a pass that took
#: that for "not installed" set kvm-handler=false, which evicts the node-mode pod until the next
#: pass (``--interval``, 10 minutes)
ABSENT_GRACE = 20.0


def cri_view(
    socket: Path, timeout: float = 10.0, absent_grace: float = ABSENT_GRACE, poll: float = 0.5
) -> CriView:
    """What edgevirt-cri on ``socket`` serves (ABSENT: no socket there for ``absent_grace``
    seconds; SILENT: no answer), asked from a child interpreter (:mod:`.cri_status`: the labeller
    keeps no grpc)."""
    deadline = time.monotonic() + absent_grace
    while not socket.exists() and time.monotonic() < deadline:
        time.sleep(poll)
    view, why = query(socket, timeout)
    if view.state is Cri.SILENT:
        log.warning("edgevirt-cri at %s did not answer Status: %s", socket, why)
    return view


@dataclass
class Labeller:
    """One node's labeller. ``probe`` gives the verdict (``refresh=True``: run the checks again)."""

    api: NodeApi
    node: str
    cri_socket: Path
    probe: Callable[[bool], ProbeResult]
    cri: Callable[[Path], CriView] = cri_view
    kvm_device: Path = KVM_DEVICE
    applied: dict[str, str] = field(default_factory=dict)
    _had_device: bool | None = None

    def verdict(self) -> ProbeResult:
        """The probe's result; run again when /dev/kvm appeared or vanished since the last pass."""
        has = self.kvm_device.exists()
        refresh = self._had_device is not None and has != self._had_device
        self._had_device = has
        return self.probe(refresh)

    def run_once(self) -> CriView:
        """Label the node once; returns what edgevirt-cri said (SILENT: try again soon)."""
        res = self.verdict()
        view = self.cri(self.cri_socket)
        kvm_ok = res.kvm.ok
        known = {LABEL_KVM: "true" if kvm_ok else "false", LABEL_ACCEL: res.accel}
        if view.state is Cri.SILENT:  # keep the handler labels as they are: learn them from the patch
            current = self.api.patch_labels(self.node, set_patch(known))
            wanted = node_labels(kvm_ok, view, current)
            rest = {k: v for k, v in wanted.items() if current.get(k) != v}
            if rest:
                self.api.patch_labels(self.node, set_patch(rest))
        else:
            wanted = node_labels(kvm_ok, view, {})
            self.api.patch_labels(self.node, set_patch(wanted))
        if wanted != self.applied:
            log.info(
                "node %s: %s (KVM: %s; %s)",
                self.node,
                " ".join(f"{k}={wanted[k]}" for k in sorted(wanted)),
                res.kvm.reason,
                view.describe(),
            )
            self.applied = wanted
        return view

    def run(self, stop: threading.Event, interval: float, retry: float) -> None:
        """Label now and every ``interval`` seconds until ``stop``; ``retry`` seconds after a failure."""
        while not stop.is_set():
            wait = interval
            try:
                if self.run_once().state is Cri.SILENT:
                    wait = retry
            except NodeApiError as e:
                log.warning("node %s: labels not written: %s", self.node, e)
                wait = retry
            stop.wait(wait)


def probe_function(cache: Path | None, kvm_timeout: float) -> Callable[[bool], ProbeResult]:
    """The probe as the labeller calls it (its verdict cached in ``cache``, keyed by boot, kernel
    and QEMU)."""
    from runtimeclass.probe import probe

    def run(refresh: bool) -> ProbeResult:
        return probe(kvm_timeout=kvm_timeout, cache_file=cache, refresh=refresh)

    return run


def resolve_node(api: NodeApi, given: str | None) -> str:
    """``given``, else $NODE_NAME, else the node the credentials belong to (a kubelet's, or a
    pod-bound token's); NodeApiError when none says."""
    from .kubeapi import node_of

    if given or os.environ.get("NODE_NAME"):
        return given or os.environ["NODE_NAME"]
    user, extra = api.whoami()
    node = node_of(user, extra)
    if node is None:
        raise NodeApiError(f"{user} is not bound to a node: pass --node NAME")
    return node
