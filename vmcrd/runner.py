"""The reconcile loop both controller modes run: informers, a periodic resync, worker threads.

A mode supplies its informers (their handlers add keys to the :class:`~vmcrd.kube.WorkQueue`) and a
``reconcile(key) -> seconds | None``; the :class:`Runner` does the rest:

* starts the informers at once (a cluster-mode standby keeps warm caches too);
* every ``resync`` seconds puts every cached key of the first informer (the VMs: its keys are the
  work keys) on the queue again, so drift nobody watches for (a domain changed behind our back, a
  lost event) is found;
* runs ``workers`` threads that take keys from the queue (the queue never hands one key to two
  workers at once) and call ``reconcile`` once every informer has listed; a key that comes earlier
  waits :data:`NOT_SYNCED_DELAY`. A number returned by ``reconcile`` is a delay after which to look
  at the key again. Failures are retried after the mode's :class:`RetryDelays`: an API conflict
  (409, somebody else wrote first) soon, another API error later, any other exception (logged with
  its traceback) later still;
* with a ``leading`` Event (cluster mode's leader election) the workers take keys only while it is
  set, so a standby does not churn its queue;
* ``observe(seconds, result)``, when set, is told how long each reconcile took and how it ended:
  ``ok``, ``conflict``, ``api_error`` or ``error`` (the metrics of :mod:`vmcrd.ops`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

from cri_shim.kube_rest import api_error

from .kube import Informer, WorkQueue

log = logging.getLogger(__name__)

#: Seconds after which a key taken before every informer has listed is looked at again.
NOT_SYNCED_DELAY = 0.2
#: Seconds a standby waits for ``leading`` before it looks at ``stop`` again.
LEADING_POLL = 0.5
#: Seconds to wait for the other workers after ``stop`` (they finish their current reconcile).
JOIN_TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class RetryDelays:
    """Seconds before a key whose reconcile failed is looked at again."""

    conflict: float  # an API error 409: our view was stale; the informer catches up at once
    api_error: float  # any other API error (cri_shim.kube_rest.ApiError, the client's ApiException)
    error: float  # any other exception


#: ``reconcile(key)``: seconds after which to look at the key again, or None.
Reconcile = Callable[[str], float | None]
#: ``observe(seconds, result)``: one reconcile's duration and outcome (ok|conflict|api_error|error).
Observe = Callable[[float, str], None]


class Runner:
    """Runs ``reconcile`` for the keys of ``queue`` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        queue: WorkQueue,
        informers: Sequence[Informer],
        reconcile: Reconcile,
        *,
        resync: float,
        delays: RetryDelays,
    ) -> None:
        self.name = name  # what the log lines call a reconcile: "reconcile", "node reconcile"
        self.queue = queue
        self.informers = list(informers)
        self.reconcile = reconcile
        self.resync = resync
        self.delays = delays
        self.observe: Observe | None = None

    def run(self, stop: threading.Event, leading: threading.Event | None = None, workers: int = 1) -> None:
        """Until ``stop``: informers, resync and ``workers`` workers (one in the calling thread)."""
        for informer in self.informers:
            informer.start(stop)
        threading.Thread(target=self._resync_loop, args=(stop,), name="resync", daemon=True).start()
        threads = [
            threading.Thread(target=self.work, args=(stop, leading), name=f"worker-{i}", daemon=True)
            for i in range(1, workers)
        ]
        for t in threads:
            t.start()
        self.work(stop, leading)
        for t in threads:
            t.join(JOIN_TIMEOUT)

    def work(self, stop: threading.Event, leading: threading.Event | None = None) -> None:
        """One worker: take keys and reconcile them until ``stop``."""
        while not stop.is_set():
            if leading is not None and not leading.wait(LEADING_POLL):
                continue
            key = self.queue.get(stop)
            if key is None:
                break
            try:
                self._process(key)
            finally:
                self.queue.done(key)

    def synced(self) -> bool:
        """Every informer has listed at least once."""
        return all(i.synced.is_set() for i in self.informers)

    def _process(self, key: str) -> None:
        if not self.synced():
            self.queue.add_after(key, NOT_SYNCED_DELAY)
            return
        started = time.monotonic()
        result = "ok"
        try:
            again = self.reconcile(key)
        except Exception as e:
            result = self._retry(key, e)
        else:
            if again:
                self.queue.add_after(key, again)
        if self.observe is not None:
            self.observe(time.monotonic() - started, result)

    def _retry(self, key: str, e: Exception) -> str:
        """Put ``key`` back after the delay its failure ``e`` asks for; the reconcile's result."""
        err = api_error(e)
        if err is None:
            log.exception("%s %s failed: retrying", self.name, key)
            self.queue.add_after(key, self.delays.error)
            return "error"
        conflict = err.status == 409
        level = logging.INFO if conflict else logging.WARNING
        log.log(level, "%s %s: API %s %s: retrying", self.name, key, err.status, err.reason)
        self.queue.add_after(key, self.delays.conflict if conflict else self.delays.api_error)
        return "conflict" if conflict else "api_error"

    def _resync_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.resync):
            for key in self.informers[0].cached_keys():
                self.queue.add(key)
