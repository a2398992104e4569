"""Prometheus metrics of edgevirt-cri (served on ``/metrics`` by :mod:`cri_shim.ops_http`).

=================================================  =========  ===================================
metric                                             type       labels
=================================================  =========  ===================================
``edgevirt_cri_request_duration_seconds``          histogram  ``method``: every CRI call kubelet
                                                              makes, as kubelet sees it
``edgevirt_cri_request_errors_total``              counter    ``method``, ``code``: calls answered
                                                              with a gRPC error code
``edgevirt_cri_backend_request_duration_seconds``  histogram  ``method``, ``backend``: calls a
                                                              backend served (a List fans out to
                                                              every backend)
``edgevirt_cri_backend_request_errors_total``      counter    ``method``, ``backend``, ``code``
``edgevirt_cri_vms``                               gauge      ``backend``, ``state`` (created,
                                                              running, exited, unknown): the VM
                                                              backends' containers, counted at scrape
``edgevirt_cri_handler_available``                 gauge      ``handler``, ``backend``: 1 when the
                                                              runtime handler is served, 0 when it
                                                              is configured but unavailable
=================================================  =========  ===================================

plus the client library's ``process_*`` and ``python_*`` metrics. ``backend`` is the backend's
name in the config (a runtime handler goes to one backend: ``""``, ``runc`` and ``kata`` to
``containerd``, ``kvm`` to ``kvm``). The method label only takes the names of CRI runtime.v1
methods, so its cardinality is bounded. The hot path costs a dictionary lookup and one histogram
observation per call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import protos
from .backends.base import Backend
from .errors import BackendError

log = logging.getLogger("edgevirt-cri.metrics")

# CRI calls range from sub-millisecond (List*, Status) to minutes (PullImage, a VM's first start).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
VM_STATES = ("created", "running", "exited", "unknown")
VM_LIST_TIMEOUT_S = 5.0


def new_registry() -> CollectorRegistry:
    """A registry of our own with the process and Python collectors (not the global one, so two
    servers in one process - tests - never collide)."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


class CriMetrics:
    """The request metrics; :meth:`observe_request` and :meth:`observe_backend` are the hot path."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._requests = Histogram(
            "edgevirt_cri_request_duration_seconds",
            "CRI calls served by edgevirt-cri, by method (seconds)",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._request_errors = Counter(
            "edgevirt_cri_request_errors",
            "CRI calls answered with a gRPC error, by method and status code",
            ["method", "code"],
            registry=registry,
        )
        self._backend = Histogram(
            "edgevirt_cri_backend_request_duration_seconds",
            "CRI calls a backend served, by method and backend (seconds)",
            ["method", "backend"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._backend_errors = Counter(
            "edgevirt_cri_backend_request_errors",
            "CRI calls a backend failed, by method, backend and gRPC status code",
            ["method", "backend", "code"],
            registry=registry,
        )
        self._request_children: dict[str, Any] = {}
        self._backend_children: dict[tuple[str, str], Any] = {}

    def observe_request(self, method: str, seconds: float, code: grpc.StatusCode) -> None:
        child = self._request_children.get(method)
        if child is None:
            child = self._request_children.setdefault(method, self._requests.labels(method))
        child.observe(seconds)
        if code is not grpc.StatusCode.OK:
            self._request_errors.labels(method, code.name).inc()

    def observe_backend(
        self, method: str, backend: str, seconds: float, code: grpc.StatusCode | None
    ) -> None:
        key = (method, backend)
        child = self._backend_children.get(key)
        if child is None:
            child = self._backend_children.setdefault(key, self._backend.labels(method, backend))
        child.observe(seconds)
        if code is not None:
            self._backend_errors.labels(method, backend, code.name).inc()


class MeteredBackend(Backend):
    """A backend whose calls are timed into :class:`CriMetrics`; everything else is the inner one's."""

    def __init__(self, inner: Backend, metrics: CriMetrics) -> None:
        self.inner = inner
        self.name = inner.name
        self.serves_images = inner.serves_images
        self._metrics = metrics

    def invoke(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        t0 = time.perf_counter()
        code: grpc.StatusCode | None = None
        try:
            return self.inner.invoke(method, request, timeout)
        except BackendError as e:
            code = e.code
            raise
        except Exception:
            code = grpc.StatusCode.UNKNOWN
            raise
        finally:
            self._metrics.observe_backend(method, self.name, time.perf_counter() - t0, code)

    def events(self, request: bytes) -> Iterator[bytes]:
        return self.inner.events(request)

    def unavailable_reason(self) -> str | None:
        return self.inner.unavailable_reason()

    def handler_works(self, handler: str) -> bool:
        return self.inner.handler_works(handler)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:  # backend-specific attributes (e.g. the kvm handler's)
        return getattr(self.inner, name)


def metered(backends: Mapping[str, Backend], metrics: CriMetrics) -> dict[str, Backend]:
    return {name: MeteredBackend(b, metrics) for name, b in backends.items()}


def vm_states(backend: Backend, timeout: float = VM_LIST_TIMEOUT_S) -> dict[str, int]:
    """How many of the backend's containers are in each CRI state (ListContainers, no filter)."""
    api = protos.api()
    raw = backend.invoke("ListContainers", api.ListContainersRequest().SerializeToString(), timeout)
    counts = dict.fromkeys(VM_STATES, 0)
    for c in api.ListContainersResponse.FromString(raw).containers:
        state = api.ContainerState.Name(c.state).removeprefix("CONTAINER_").lower()
        counts[state if state in counts else "unknown"] += 1
    return counts


class VmCollector(Collector):
    """``edgevirt_cri_vms{backend,state}``: the VM backends' containers, listed at every scrape. A
    backend that does not answer is left out of that scrape (and logged)."""

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self._backends = dict(backends)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "edgevirt_cri_vms", "VM backends' containers by CRI state", labels=["backend", "state"]
        )
        for name, backend in sorted(self._backends.items()):
            try:
                counts = vm_states(backend)
            except BackendError as e:
                log.info("metrics: backend %s did not list its VMs: %s: %s", name, e.code.name, e.message)
                continue
            for state, n in counts.items():
                family.add_metric([name, state], n)
        yield family


class HandlerCollector(Collector):
    """``edgevirt_cri_handler_available{handler,backend}``: 1 served, 0 configured but unavailable."""

    def __init__(self, configured: Mapping[str, str], served: Mapping[str, str]) -> None:
        self._configured = dict(configured)
        self._served = dict(served)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "edgevirt_cri_handler_available",
            "Runtime handlers: 1 when served, 0 when configured but unavailable on this node",
            labels=["handler", "backend"],
        )
        for handler, backend in sorted(self._configured.items()):
            family.add_metric([handler, backend], 1.0 if handler in self._served else 0.0)
        yield family
