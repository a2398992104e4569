"""vmcrd.runner with fake informers: retry delays by failure, sync gating, one key never processed
twice at once, leader gating, resync. Every worker loop here ends by ``stop`` set from inside."""

from __future__ import annotations

import threading

import pytest
from kubernetes.client.exceptions import ApiException

from vmcrd import runner as R
from vmcrd.kube import WorkQueue

pytestmark = pytest.mark.timeout(60)

DELAYS = R.RetryDelays(conflict=0.5, api_error=2.0, error=5.0)


class FakeInformer:
    """What the Runner uses of an Informer: start, synced, cached_keys."""

    def __init__(self, keys: list[str] | None = None, synced: bool = True) -> None:
        self.keys = keys or []
        self.synced = threading.Event()
        if synced:
            self.synced.set()
        self.started = False

    def start(self, stop: threading.Event) -> None:
        self.started = True

    def cached_keys(self) -> list[str]:
        return list(self.keys)


class RecordingQueue(WorkQueue):
    """A WorkQueue that records delayed re-adds (and may act on them)."""

    def __init__(self, on_add_after=None) -> None:
        super().__init__()
        self.later: list[tuple[str, float]] = []
        self.on_add_after = on_add_after

    def add_after(self, key: str, delay: float) -> None:
        self.later.append((key, delay))
        if self.on_add_after:
            self.on_add_after(key, delay)
        super().add_after(key, delay)


def make_runner(queue, reconcile, informers=None, resync=300.0):
    informers = informers if informers is not None else [FakeInformer()]
    return R.Runner("reconcile", queue, informers, reconcile, resync=resync, delays=DELAYS)


def run_once(outcome):
    """One key through one worker; ``outcome`` is raised or returned by reconcile. The queue's
    delayed re-adds afterwards."""
    stop = threading.Event()
    q = RecordingQueue()
    calls = []

    def reconcile(key):
        calls.append(key)
        stop.set()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    q.add("ns/a")
    make_runner(q, reconcile).work(stop)
    assert calls == ["ns/a"]
    return q.later


@pytest.mark.parametrize(
    ("outcome", "later"),
    [
        (ApiException(status=409, reason="Conflict"), [("ns/a", DELAYS.conflict)]),
        (ApiException(status=500, reason="Internal Server Error"), [("ns/a", DELAYS.api_error)]),
        (ApiException(status=404, reason="Not Found"), [("ns/a", DELAYS.api_error)]),
        (RuntimeError("libvirt away"), [("ns/a", DELAYS.error)]),
        (7.5, [("ns/a", 7.5)]),
        (None, []),
    ],
)
def test_reconcile_outcome_sets_when_the_key_comes_back(outcome, later):
    assert run_once(outcome) == later


def test_failures_are_logged_as_retries(caplog):
    caplog.set_level("INFO", logger="vmcrd.runner")
    run_once(ApiException(status=409, reason="Conflict"))
    run_once(RuntimeError("boom"))
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert ("INFO", "reconcile ns/a: API 409 Conflict: retrying") in msgs
    assert ("ERROR", "reconcile ns/a failed: retrying") in msgs
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


def test_keys_wait_until_every_informer_has_listed():
    stop = threading.Event()
    pods = FakeInformer(synced=False)
    calls = []

    def on_add_after(key, delay):
        if len(q.later) == 2:  # looked at twice before the pods had listed: now they have
            pods.synced.set()

    def reconcile(key):
        calls.append(key)
        stop.set()

    q = RecordingQueue(on_add_after)
    q.add("ns/a")
    make_runner(q, reconcile, [FakeInformer(), pods]).work(stop)
    assert q.later == [("ns/a", R.NOT_SYNCED_DELAY)] * 2
    assert calls == ["ns/a"]


def test_one_key_is_never_reconciled_twice_at_once_while_keys_run_in_parallel():
    stop = threading.Event()
    q = WorkQueue()
    lock = threading.Lock()
    busy: set[str] = set()
    overlaps: list[str] = []
    counts = {"ns/a": 0, "ns/b": 0, "ns/c": 0}
    both_inside = threading.Barrier(2, timeout=20)  # a and b in reconcile together: parallel workers

    def reconcile(key):
        with lock:
            if key in busy:
                overlaps.append(key)
            busy.add(key)
            counts[key] += 1
            first = counts[key] == 1
        try:
            q.add(key)  # the key is dirty again while it runs: an idle worker must not take it
            if first and key in ("ns/a", "ns/b"):
                both_inside.wait()
            with lock:
                if min(counts.values()) >= 50:
                    stop.set()
        finally:
            with lock:
                busy.discard(key)
        return None

    for k in counts:
        q.add(k)
    make_runner(q, reconcile).run(stop, workers=4)
    assert not overlaps
    assert min(counts.values()) >= 50


def test_workers_take_keys_only_while_leading(monkeypatch):
    monkeypatch.setattr(R, "LEADING_POLL", 0.01)
    stop = threading.Event()
    q = WorkQueue()
    seen = {}

    class Leadership(threading.Event):
        """Not leading for the first three looks; the queue is checked meanwhile."""

        def __init__(self) -> None:
            super().__init__()
            self.looks = 0

        def wait(self, timeout=None):
            self.looks += 1
            if self.looks == 2:
                seen["queued while standby"] = len(q)
            if self.looks == 3:
                self.set()
            return super().wait(timeout)

    leading = Leadership()

    def reconcile(key):
        seen["leading when reconciled"] = leading.is_set()
        stop.set()

    q.add("ns/a")
    make_runner(q, reconcile).work(stop, leading)
    assert seen == {"queued while standby": 1, "leading when reconciled": True}


def test_resync_puts_every_cached_vm_on_the_queue_again():
    stop = threading.Event()
    q = WorkQueue()
    vms = FakeInformer(["ns/a", "ns/b"])
    seen: list[str] = []

    def reconcile(key):
        seen.append(key)
        if seen.count("ns/a") >= 2 and seen.count("ns/b") >= 2:
            stop.set()

    runner = make_runner(q, reconcile, [vms, FakeInformer(["ns/a-vm"])], resync=0.01)
    runner.run(stop)  # nothing was queued: only the resync brings keys, the VMs' (not the pods')
    assert set(seen) == {"ns/a", "ns/b"}
    assert vms.started
