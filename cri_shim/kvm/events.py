"""The kvm handler's CRI container events (GetContainerEvents), what kubelet's evented PLEG acts on.

Each event is a ``ContainerEventResponse`` as containerd sends them: the container (or sandbox)
ID, the event type, when, and the pod's whole state at that moment (its sandbox status and every
container's status), which kubelet puts in its pod cache as is. Events come from the handler's own
calls (created, started, stopped, deleted) and from libvirt when a VM ends on its own (QEMU
killed, guest powered off: :class:`~cri_shim.vm.domain_events.StopWatch`), so kubelet restarts a
VM as soon as it died instead of at its next relist.

Bounded: at most ``max_subscribers`` streams (a new one ends the oldest), each holding at most
``max_queued`` events its client has not read (past that the stream ends; kubelet relists and
subscribes again, as after any stream error). Nothing is built while nobody listens.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger("edgevirt-cri.kvm.events")

MAX_SUBSCRIBERS = 8
MAX_QUEUED = 1024

_END = object()


class Subscription:
    """One GetContainerEvents stream: the events published since it began."""

    def __init__(self, hub: ContainerEvents, max_queued: int) -> None:
        self._hub = hub
        self._q: queue.Queue[object] = queue.Queue(maxsize=max_queued + 1)
        self._max = max_queued
        self.ended: str | None = None

    def put(self, event: bytes) -> None:
        if self.ended is not None:
            return
        if self._q.qsize() >= self._max:
            self.end(f"the client fell {self._max} events behind")
            return
        self._q.put_nowait(event)

    def end(self, why: str) -> None:
        if self.ended is None:
            self.ended = why
            self._q.put_nowait(_END)

    def __iter__(self) -> Iterator[bytes]:
        try:
            while True:
                item = self._q.get()
                if item is _END:
                    log.info("container event stream ended: %s", self.ended)
                    return
                assert isinstance(item, bytes)
                yield item
        finally:
            self._hub.unsubscribe(self)


class ContainerEvents:
    """Fans the handler's container events out to the open GetContainerEvents streams.

    ``on_first_subscriber`` runs once, when the first stream opens (the handler starts watching
    libvirt then: nobody pays for events nobody asked for)."""

    def __init__(
        self,
        on_first_subscriber: Callable[[], None] = lambda: None,
        max_subscribers: int = MAX_SUBSCRIBERS,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self._subs: collections.OrderedDict[int, Subscription] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._first = on_first_subscriber
        self._started = False
        self.max_subscribers, self.max_queued = max_subscribers, max_queued

    @property
    def listening(self) -> bool:
        return bool(self._subs)

    def subscribe(self) -> Subscription:
        sub = Subscription(self, self.max_queued)
        with self._lock:
            first = not self._started
            self._started = True
            self._subs[id(sub)] = sub
            while len(self._subs) > self.max_subscribers:
                _, oldest = self._subs.popitem(last=False)
                oldest.end(f"over {self.max_subscribers} event streams: the oldest ends")
        if first:
            self._first()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.pop(id(sub), None)

    def publish(self, build: Callable[[], bytes | None]) -> None:
        """Send the event ``build()`` makes to every stream (not built when none is open; an event
        that cannot be built, e.g. its sandbox is gone, is dropped: kubelet's relist covers it)."""
        with self._lock:
            subs = list(self._subs.values())
        if not subs:
            return
        try:
            event = build()
        except Exception:
            log.exception("building a container event failed")
            return
        if event is None:
            return
        for sub in subs:
            sub.put(event)

    def send(self, event: bytes) -> None:
        """Send an event built beforehand (e.g. a sandbox's deletion, built while it still existed)."""
        self.publish(lambda: event)

    def close(self) -> None:
        with self._lock:
            subs = list(self._subs.values())
            self._subs.clear()
        for sub in subs:
            sub.end("edgevirt-cri stops")
