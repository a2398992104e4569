"""Kubernetes plumbing for the controller: clients, a list-then-watch informer, a work queue, events.

The informer is level-triggered: it lists (and hands every key to the handler), then watches from
the list's resourceVersion with bookmarks; a watch that ends is resumed from the last version seen;
``410 Gone`` (expired version) or any other error leads to a fresh list, after which keys that
vanished meanwhile are handed to the handler too. Objects are kept as plain dicts (camelCase, as
the API serves them), which is also cheaper than the client's model classes.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger(__name__)
#: Longest wait between relists after the API server failed: short, so that after an outage of an
#: edge node's API server the controllers see its return (and catch status up) within seconds.
RELIST_BACKOFF_MAX = 4.0


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """A client from ``kubeconfig`` (or $KUBECONFIG / ~/.kube/config), else the in-cluster config."""
    try:
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except Exception:
        if kubeconfig:
            raise
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(cfg)


def key_of(obj: dict) -> str:
    m = obj["metadata"]
    return f"{m.get('namespace', '')}/{m['name']}"


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


class Informer:
    """A cache of one resource kept by list + watch; calls ``handler(key)`` on every change."""

    def __init__(
        self,
        name: str,
        list_fn: Callable[..., Any],
        handler: Callable[[str], None],
        watch_timeout: int = 240,
    ) -> None:
        self.name = name
        self.list_fn = list_fn
        self.handler = handler
        self.watch_timeout = watch_timeout
        self.cache: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.synced = threading.Event()
        self.relists = 0

    def get(self, key: str) -> dict | None:
        with self.lock:
            return self.cache.get(key)

    def cached_keys(self) -> list[str]:
        with self.lock:
            return list(self.cache)

    def values(self) -> list[dict]:
        with self.lock:
            return list(self.cache.values())

    def relist(self) -> str:
        resp = self.list_fn(_preload_content=False, _request_timeout=60)
        body = json.loads(resp.data)
        fresh = {key_of(o): o for o in body.get("items") or []}
        with self.lock:
            gone = set(self.cache) - set(fresh)
            self.cache = fresh
        self.relists += 1
        self.synced.set()
        log.log(
            logging.INFO if self.relists > 1 else logging.DEBUG,
            "%s: listed %d at resourceVersion %s",
            self.name,
            len(fresh),
            body["metadata"]["resourceVersion"],
        )
        for k in list(fresh) + sorted(gone):
            self.handler(k)
        return body["metadata"]["resourceVersion"]

    def _events(self, rv: str) -> Iterator[dict]:
        resp = self.list_fn(
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout,
            _preload_content=False,
            _request_timeout=(10, self.watch_timeout + 30),
        )
        try:
            for line in iter_resp_lines(resp):
                yield json.loads(line)
        finally:
            resp.release_conn()

    def watch(self, rv: str, stop: threading.Event) -> None:
        """Watch from ``rv`` until ``stop``; raises :class:`Gone` on 410."""
        while not stop.is_set():
            log.debug("%s: watching from resourceVersion %s", self.name, rv)
            for ev in self._events(rv):
                typ, obj = ev.get("type"), ev.get("object") or {}
                if typ == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone(obj.get("message", "resourceVersion too old"))
                    raise RuntimeError(f"watch error: {obj}")
                rv = obj.get("metadata", {}).get("resourceVersion", rv)
                if typ == "BOOKMARK":
                    continue
                k = key_of(obj)
                log.debug("%s: %s %s at resourceVersion %s", self.name, typ, k, rv)
                with self.lock:
                    if typ == "DELETED":
                        self.cache.pop(k, None)
                    else:
                        self.cache[k] = obj
                self.handler(k)
                if stop.is_set():
                    return

    def run(self, stop: threading.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                rv = self.relist()
                backoff = 0.5
                self.watch(rv, stop)
            except Gone as e:
                log.info("%s: watch expired (%s): relisting", self.name, e)
            except ApiException as e:
                if e.status == 410:
                    log.info("%s: 410 Gone: relisting", self.name)
                    continue
                log.warning("%s: API error %s %s: relisting in %.1fs", self.name, e.status, e.reason, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, RELIST_BACKOFF_MAX)
            except Exception as e:  # connection dropped, apiserver away: keep what we have, retry
                log.warning("%s: %s: relisting in %.1fs", self.name, e, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, RELIST_BACKOFF_MAX)

    def start(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(stop,), name=f"informer-{self.name}", daemon=True)
        t.start()
        return t


class WorkQueue:
    """De-duplicating queue of keys with delayed re-adds; one key is never processed twice at once."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._queue: list[str] = []
        self._dirty: set[str] = set()
        self._processing: set[str] = set()
        self._later: list[tuple[float, str]] = []

    def add(self, key: str) -> None:
        with self._cv:
            if key in self._dirty:
                return
            self._dirty.add(key)
            if key not in self._processing:
                self._queue.append(key)
                self._cv.notify()

    def add_after(self, key: str, delay: float) -> None:
        with self._cv:
            heapq.heappush(self._later, (time.monotonic() + delay, key))
            self._cv.notify()

    def get(self, stop: threading.Event, poll: float = 0.5) -> str | None:
        with self._cv:
            while not stop.is_set():
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    _, k = heapq.heappop(self._later)
                    if k not in self._dirty:
                        self._dirty.add(k)
                        if k not in self._processing:
                            self._queue.append(k)
                if self._queue:
                    k = self._queue.pop(0)
                    self._dirty.discard(k)
                    self._processing.add(k)
                    return k
                wait = poll
                if self._later:
                    wait = min(wait, max(0.0, self._later[0][0] - now))
                self._cv.wait(wait)
            return None

    def done(self, key: str) -> None:
        with self._cv:
            self._processing.discard(key)
            if key in self._dirty:
                self._queue.append(key)
                self._cv.notify()

    def __len__(self) -> int:
        with self._cv:
            return len(self._queue)


class EventRecorder:
    """Writes core/v1 Events about VirtualMachines (shown by ``kubectl describe vm``)."""

    def __init__(self, core: client.CoreV1Api, component: str, host: str) -> None:
        self.core = core
        self.component = component
        self.host = host

    def emit(self, obj: dict, etype: str, reason: str, message: str) -> None:
        m = obj["metadata"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "metadata": {"name": f"{m['name']}.{uuid.uuid4().hex[:12]}", "namespace": m["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": m["name"],
                "namespace": m["namespace"],
                "uid": m["uid"],
                "resourceVersion": m.get("resourceVersion"),
            },
            "type": etype,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": self.component, "host": self.host},
            "reportingComponent": self.component,
            "reportingInstance": self.host,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(m["namespace"], body)
        except ApiException as e:  # events are best effort; never fail a reconcile over one
            log.warning("event %s/%s %s not recorded: %s", m["namespace"], m["name"], reason, e.reason)
