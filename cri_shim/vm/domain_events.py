"""Domain stops as they happen: libvirt's lifecycle events, for what must react at once to a VM
that ended (the kvm handler's CRI container events, which kubelet's evented PLEG acts on instead
of waiting for its next relist).

:class:`StopWatch` runs libvirt's default event loop in a thread (registered once per process,
before the watcher's own connection is opened, as libvirt requires) and calls ``on_stop(name)``
for each domain that stopped (QEMU exited: shut down, destroyed, crashed, failed). Its connection
is its own and heals itself: a restarted libvirtd is noticed (close callback or a dead connection)
and the watch is registered again on a new one, after ``retry`` seconds while libvirtd is away.
``on_stop`` runs on the event loop's thread: it must only hand the name on (e.g. to a queue).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

import libvirt

log = logging.getLogger("edgevirt-cri.domain-events")

_loop_lock = threading.Lock()
_loop_started = False


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as e:  # pragma: no cover - libvirt's loop does not fail in practice
            log.warning("libvirt event loop: %s", e)


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread (once)."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _loop_started = True


class StopWatch:
    """Calls ``on_stop(domain name)`` whenever a domain of the libvirt at ``uri`` stops."""

    def __init__(self, uri: str, on_stop: Callable[[str], None], retry: float = 2.0) -> None:
        self.uri, self.on_stop, self.retry = uri, on_stop, retry
        self._stop = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()  # set while a watch is registered

    def start(self) -> StopWatch:
        if self._thread is None:
            ensure_event_loop()
            self._thread = threading.Thread(target=self._run, name="domain-stop-watch", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._closed.set()
        if self._thread is not None:
            self._thread.join(5)

    def _lifecycle(
        self, _conn: object, dom: libvirt.virDomain, event: int, _detail: int, _opaque: object
    ) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            with contextlib.suppress(Exception):
                self.on_stop(dom.name())

    def _on_close(self, _conn: object, reason: int, _opaque: object) -> None:
        log.info("libvirt connection for domain events closed (reason %s): watching again", reason)
        self._closed.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            conn: libvirt.virConnect | None = None
            cb_id = None
            self._closed.clear()
            try:
                conn = libvirt.open(self.uri)
                conn.registerCloseCallback(self._on_close, None)
                cb_id = conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
                )
                self.connected.set()
                while not self._stop.is_set() and not self._closed.wait(self.retry):
                    if not conn.isAlive():
                        break
            except libvirt.libvirtError as e:
                log.info("watching domain events at %s: %s; again in %g s", self.uri, e, self.retry)
            finally:
                self.connected.clear()
                if conn is not None:
                    with contextlib.suppress(libvirt.libvirtError):
                        if cb_id is not None:
                            conn.domainEventDeregisterAny(cb_id)
                        conn.unregisterCloseCallback()
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.close()
            self._stop.wait(self.retry)
