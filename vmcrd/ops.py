"""Health, readiness and Prometheus metrics of edgevirt-controller, both modes, served on the ops
address by :mod:`cri_shim.ops_http` (``/healthz``, ``/readyz``, ``/metrics``).

``/readyz`` is 200 once every informer of the mode has listed (a cluster-mode standby is ready
too: its caches are warm and it takes over at once), 503 with the reason before that and while
the process stops. ``/healthz`` is 200 while the process answers.

=================================================  =========  =========================================
metric                                             type       labels
=================================================  =========  =========================================
``edgevirt_controller_reconciles_total``           counter    ``mode``; ``result``: ``ok``, ``conflict``
                                                              (409, retried soon), ``api_error``,
                                                              ``error`` (any other exception)
``edgevirt_controller_reconcile_duration_seconds`` histogram  ``mode``
``edgevirt_controller_vms``                        gauge      ``mode``, ``status``: the VMs this process
                                                              looks after (cluster mode: all it
                                                              watches; node mode: its node's) by
                                                              ``status.printableStatus`` (``None``:
                                                              not reported yet), counted at scrape
``edgevirt_controller_leader``                     gauge      ``mode``: 1 while this replica holds the
                                                              Lease (cluster mode only)
``edgevirt_controller_queue_depth``                gauge      ``mode``: keys waiting to be reconciled
``edgevirt_controller_informer_synced``            gauge      ``mode``, ``resource``: 1 once listed
``edgevirt_controller_informer_relists_total``     counter    ``mode``, ``resource``: full lists (the
                                                              first, then one after every watch error)
=================================================  =========  =========================================

plus the client library's ``process_*`` and ``python_*`` metrics. Nothing here calls the API
server: the gauges read the informers' caches.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import Protocol

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cri_shim.ops_http import OpsServer

from .api import KubeObject
from .kube import Informer
from .runner import Runner

log = logging.getLogger(__name__)

RESULTS = ("ok", "conflict", "api_error", "error")
#: A reconcile reads caches and makes a few API calls: milliseconds to seconds.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
NO_STATUS = "None"


def new_registry() -> CollectorRegistry:
    """A registry of our own with the process and Python collectors (two controllers in one process,
    as in tests, never collide)."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


class ReconcileMetrics:
    """Reconcile count, outcome and duration of one mode; :meth:`observe` is the Runner's hook."""

    def __init__(self, registry: CollectorRegistry, mode: str) -> None:
        self._total = Counter(
            "edgevirt_controller_reconciles",
            "reconciles of VirtualMachine keys, by outcome",
            ["mode", "result"],
            registry=registry,
        )
        self._duration = Histogram(
            "edgevirt_controller_reconcile_duration_seconds",
            "time one reconcile of a VirtualMachine key took (seconds)",
            ["mode"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._by_result = {r: self._total.labels(mode, r) for r in RESULTS}  # every series from 0
        self._seconds = self._duration.labels(mode)

    def observe(self, seconds: float, result: str) -> None:
        self._by_result[result].inc()
        self._seconds.observe(seconds)


class _Queue(Protocol):
    def __len__(self) -> int: ...


class StateCollector(Collector):
    """The gauges read at scrape time: VMs by printableStatus, queue depth, informers, leadership."""

    def __init__(
        self,
        mode: str,
        informers: Iterable[Informer],
        queue: _Queue,
        vm_filter: Callable[[KubeObject], bool] = lambda vm: True,
        is_leader: threading.Event | None = None,
    ) -> None:
        self.mode = mode
        self.informers = list(informers)  # the first one holds the VMs (as in the Runner)
        self.queue = queue
        self.vm_filter = vm_filter
        self.is_leader = is_leader

    def collect(self) -> Iterable[Metric]:
        vms = GaugeMetricFamily(
            "edgevirt_controller_vms",
            "VirtualMachines looked after, by status.printableStatus",
            labels=["mode", "status"],
        )
        counts = Tally(
            (vm.get("status") or {}).get("printableStatus") or NO_STATUS
            for vm in self.informers[0].values()
            if self.vm_filter(vm)
        )
        for status, n in sorted(counts.items()):
            vms.add_metric([self.mode, status], n)
        yield vms
        depth = GaugeMetricFamily("edgevirt_controller_queue_depth", "keys waiting", labels=["mode"])
        depth.add_metric([self.mode], len(self.queue))
        yield depth
        synced = GaugeMetricFamily(
            "edgevirt_controller_informer_synced",
            "1 once the informer has listed",
            labels=["mode", "resource"],
        )
        relists = CounterMetricFamily(
            "edgevirt_controller_informer_relists", "full lists of the informer", labels=["mode", "resource"]
        )
        for inf in self.informers:
            synced.add_metric([self.mode, inf.name], float(inf.synced.is_set()))
            relists.add_metric([self.mode, inf.name], inf.relists)
        yield synced
        yield relists
        if self.is_leader is not None:
            leader = GaugeMetricFamily(
                "edgevirt_controller_leader", "1 while this replica holds the Lease", labels=["mode"]
            )
            leader.add_metric([self.mode], float(self.is_leader.is_set()))
            yield leader


class Readiness:
    """``/readyz``: every informer listed, and not stopping."""

    def __init__(self, informers: Iterable[Informer]) -> None:
        self.informers = list(informers)
        self.stopping = False

    def __call__(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        waiting = [i.name for i in self.informers if not i.synced.is_set()]
        if waiting:
            return False, f"informers not synced yet: {', '.join(waiting)}"
        return True, ""


def instrument(
    mode: str,
    runner: Runner,
    vm_filter: Callable[[KubeObject], bool] = lambda vm: True,
    is_leader: threading.Event | None = None,
) -> tuple[CollectorRegistry, Readiness]:
    """The metrics registry of a mode's runner (its reconciles timed from now on) and its readiness."""
    registry = new_registry()
    runner.observe = ReconcileMetrics(registry, mode).observe
    informers = runner.informers
    registry.register(StateCollector(mode, informers, runner.queue, vm_filter, is_leader))
    return registry, Readiness(informers)


class OpsUnavailable(RuntimeError):
    """The ops address given with --ops-address cannot be listened on."""


def serve(
    address: tuple[str, int] | None, explicit: bool, registry: CollectorRegistry, readiness: Readiness
) -> OpsServer | None:
    """The ops server, started; None when disabled, or when the default address is taken (logged:
    several controllers on one host, as in tests). An address given explicitly must bind
    (:class:`OpsUnavailable` otherwise)."""
    if address is None:
        return None
    try:
        return OpsServer(address, registry, readiness).start()
    except OSError as e:
        if explicit:
            raise OpsUnavailable(
                f"--ops-address {address[0]}:{address[1]}: cannot listen: {e.strerror}"
            ) from e
        log.warning(
            "ops endpoint %s:%d not served (%s); pass --ops-address to choose another", *address, e.strerror
        )
        return None
