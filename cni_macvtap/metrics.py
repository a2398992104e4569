"""Prometheus metrics of `macvtap daemon` (only the daemon imports this; the plugin's client path
never loads prometheus_client).

=============================================  =========  =========================================
metric                                         type       labels
=============================================  =========  =========================================
``macvtap_cni_request_duration_seconds``       histogram  ``command`` (ADD, DEL, CHECK, GC, STATUS,
                                                          VERSION, other): calls the daemon served
``macvtap_cni_request_errors_total``           counter    ``command``, ``code``: calls that failed,
                                                          by CNI error code
``macvtap_daemon_requests_not_served_total``   counter    ``reason``: ``busy`` and ``other_netns``
                                                          (handed back to run in the client),
                                                          ``malformed``, ``timeout``
``macvtap_daemon_workers``                     gauge      ``state``: ``configured`` (at most),
                                                          ``minimum`` (always running), ``ready``
``macvtap_daemon_worker_restarts_total``       counter    workers that died without retiring
=============================================  =========  =========================================

The workers are separate processes, so the values live in prometheus_client's multiprocess files
(``<socket>.metrics/``, emptied when the daemon starts, removed when it stops; see
cni_macvtap.metrics_files): each worker writes its own, the supervisor sums them when scraped. The
files are named by the worker's slot, not its pid (prometheus_client's ``process_identifier``):
workers come and go with the calls, and a worker in a slot continues the counts of the one before.
``PROMETHEUS_MULTIPROC_DIR`` must be set before prometheus_client is first imported, which is why
the daemon imports this module only after cni_macvtap.metrics_files.enable().
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Protocol

from . import package_init

package_init.skip_init("prometheus_client")  # not its HTTP exposition nor default collectors
from prometheus_client import values  # noqa: E402
from prometheus_client.metrics import Counter, Histogram  # noqa: E402
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402
from prometheus_client.registry import Collector, CollectorRegistry  # noqa: E402
from prometheus_client.values import MultiProcessValue  # noqa: E402

COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
NOT_SERVED = ("busy", "other_netns", "malformed", "timeout")
# A call takes about a millisecond with the daemon; IPAM or a contended attachment lock, seconds.
DURATION_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 90)


def command_label(command: str | None) -> str:
    return command if command in COMMANDS else "other"


def cni_error_code(out: bytes) -> str:
    """The ``code`` of the CNI error JSON on stdout; ``unknown`` when there is none."""
    try:
        code = json.loads(out).get("code")
    except (ValueError, AttributeError):
        return "unknown"
    return str(code) if isinstance(code, int) else "unknown"


class RequestMetrics:
    """A worker's metrics; made in the worker after the fork, in the files of its ``slot``."""

    def __init__(self, slot: int) -> None:
        values.ValueClass = MultiProcessValue(lambda: slot)  # type: ignore[no-untyped-call]  # untyped
        self.duration = Histogram(
            "macvtap_cni_request_duration_seconds",
            "CNI calls served by the macvtap daemon, by command (seconds)",
            ["command"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.errors = Counter(
            "macvtap_cni_request_errors",
            "CNI calls the macvtap daemon answered with an error, by command and CNI error code",
            ["command", "code"],
            registry=None,
        )
        self.not_served = Counter(
            "macvtap_daemon_requests_not_served",
            "Connections the daemon did not serve, by reason (busy and other_netns run in the client)",
            ["reason"],
            registry=None,
        )
        # Every series and file a worker needs exists from the start (no fd opened later).
        self._durations = {c: self.duration.labels(c) for c in (*COMMANDS, "other")}
        self._not_served = {r: self.not_served.labels(r) for r in NOT_SERVED}

    def observe(self, command: str | None, seconds: float, exit_code: int, out: bytes) -> None:
        label = command_label(command)
        self._durations[label].observe(seconds)
        if exit_code:
            self.errors.labels(label, cni_error_code(out)).inc()

    def count_not_served(self, reason: str) -> None:
        self._not_served[reason].inc()


class WorkerCensus(Protocol):
    """What the supervisor knows of its workers."""

    @property
    def configured(self) -> int: ...
    @property
    def minimum(self) -> int: ...
    @property
    def ready(self) -> int: ...
    @property
    def restarts(self) -> int: ...


class SupervisorCollector(Collector):
    """The supervisor's own numbers: workers configured and ready, restarts."""

    def __init__(self, census: WorkerCensus) -> None:
        self._census = census

    def collect(self) -> Iterable[Metric]:
        workers = GaugeMetricFamily(
            "macvtap_daemon_workers",
            "Worker processes: at most (configured), always running (minimum) and ready (serving now)",
            labels=["state"],
        )
        workers.add_metric(["configured"], self._census.configured)
        workers.add_metric(["minimum"], self._census.minimum)
        workers.add_metric(["ready"], self._census.ready)
        yield workers
        yield CounterMetricFamily(
            "macvtap_daemon_worker_restarts",
            "Workers that died without retiring (crashed or killed)",
            self._census.restarts,
        )


def exposition_registry(path: str, census: WorkerCensus) -> CollectorRegistry:
    """What ``/metrics`` shows: every worker's files summed, plus the supervisor's numbers."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]  # untyped upstream
    registry.register(SupervisorCollector(census))
    return registry
