"""Kubernetes plumbing for the controller: clients, a list-then-watch informer, a work queue, events.

The informer is level-triggered: it lists (and hands every key to the handler), then watches from
the list's resourceVersion with bookmarks (through a :class:`ListWatch`: plain JSON over a
:class:`~cri_shim.kube_rest.KubeApi`, or a kubernetes client list function); a watch that ends is
resumed from the last version seen; ``410 Gone`` (expired version) or any other error leads to a
fresh list, after which keys that vanished meanwhile are handed to the handler too. Objects are
kept as plain dicts (camelCase, as the API serves them), which is also cheaper than the client's
model classes; an informer with a ``transform`` keeps only what that makes of each object (cluster
mode's Nodes: their Ready condition and cordon, :func:`vmcrd.placement.node_facts`) and calls the
handler only when that changed.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import quote

from cri_shim.kube_rest import ApiError, KubeApi, api_error, kube_api, lines_of

from .api import KubeObject

if TYPE_CHECKING:
    from kubernetes import client

log = logging.getLogger(__name__)
#: Longest wait between relists after the API server failed: short, so that after an outage of an
#: edge node's API server the controllers see its return (and catch status up) within seconds.
RELIST_BACKOFF_MAX = 4.0
#: Seconds a list may take.
LIST_TIMEOUT = 60
#: Seconds to connect for a watch; its reads may take the watch's own timeout and this much more.
WATCH_CONNECT_TIMEOUT = 10
WATCH_READ_SLACK = 30


def api_client(
    kubeconfig: str | None = None, context: str | None = None, in_cluster: bool = True
) -> client.ApiClient:
    """A kubernetes client (cluster mode, kubectl-vm) from ``kubeconfig`` (or $KUBECONFIG /
    ~/.kube/config) and its ``context`` (default: the current one), else, if ``in_cluster``, the
    in-cluster config (a pod's service account). Node mode uses :mod:`cri_shim.kube_http` instead."""
    from kubernetes import client, config

    try:
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    except Exception:
        if kubeconfig or not in_cluster:
            raise
        cfg = client.Configuration()
        config.load_incluster_config(client_configuration=cfg)
    return client.ApiClient(cfg)


def kubeconfig_namespace(kubeconfig: str | None = None, context: str | None = None) -> str | None:
    """The namespace of ``context`` (default: the current context) in the kubeconfig, if it sets one."""
    from kubernetes import config

    contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    if context:
        active = next((c for c in contexts if c["name"] == context), active)
    ns = (active or {}).get("context", {}).get("namespace")
    return str(ns) if ns else None


def api_message(e: BaseException) -> str:
    """What the API server said (its Status message) in an :class:`~cri_shim.kube_rest.ApiError` or
    the kubernetes client's ``ApiException``, else ``<status> <reason>``."""
    err = api_error(e)
    if err is None:
        return str(e)
    try:
        return str(json.loads(err.body or "").get("message") or f"{err.status} {err.reason}")
    except Exception:
        return f"{err.status} {err.reason}"


def key_of(obj: KubeObject) -> str:
    m = obj["metadata"]
    return f"{m.get('namespace', '')}/{m['name']}"


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


def close_iterator(it: Iterator[Any]) -> None:
    """End a generator (a watch: its connection is closed) without reading it to the end."""
    close = getattr(it, "close", None)
    if close is not None:
        close()


class ListWatch(Protocol):
    """How an :class:`Informer` lists and watches its resource."""

    def list(self) -> KubeObject:
        """The List object (``items``, ``metadata.resourceVersion``)."""
        ...

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[KubeObject]:
        """The watch events from ``resource_version`` on, bookmarks included, for at most
        ``timeout_seconds``; closing the iterator ends the watch."""
        ...


class RestListWatch:
    """List and watch the collection at ``path`` (e.g. ``/api/v1/pods``) through a :class:`KubeApi`,
    with ``query`` (e.g. a ``labelSelector``) on both."""

    def __init__(self, api: KubeApi, path: str, query: Mapping[str, str] | None = None) -> None:
        self.api = api
        self.path = path
        self.query = dict(query or {})

    def list(self) -> KubeObject:
        body: KubeObject = self.api.request("GET", self.path, query=self.query, timeout=LIST_TIMEOUT)
        return body

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[KubeObject]:
        query = {
            **self.query,
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        timeout = (WATCH_CONNECT_TIMEOUT, timeout_seconds + WATCH_READ_SLACK)
        lines = self.api.stream_lines(self.path, query=query, timeout=timeout)
        try:
            for line in lines:
                yield json.loads(line)
        finally:
            close_iterator(lines)


class ClientListWatch:
    """List and watch through a list function of the kubernetes client's generated API (e.g.
    ``lambda **kw: core.list_namespaced_config_map(ns, **kw)``): it is called with the client's
    list/watch keyword arguments and ``_preload_content=False``."""

    def __init__(self, list_fn: Callable[..., Any]) -> None:
        self.list_fn = list_fn

    def list(self) -> KubeObject:
        resp = self.list_fn(_preload_content=False, _request_timeout=LIST_TIMEOUT)
        body: KubeObject = json.loads(resp.data)
        return body

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[KubeObject]:
        resp = self.list_fn(
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_seconds,
            _preload_content=False,
            _request_timeout=(WATCH_CONNECT_TIMEOUT, timeout_seconds + WATCH_READ_SLACK),
        )
        try:
            for line in lines_of(resp.stream(amt=None, decode_content=False)):
                yield json.loads(line)
        finally:
            resp.close()
            resp.release_conn()


class Informer:
    """A cache of one resource kept by list + watch; calls ``handler(key)`` on every change.
    ``source`` is a :class:`ListWatch`, or a list function of the kubernetes client (wrapped in
    :class:`ClientListWatch`). With ``transform`` the cache holds ``transform(object)`` (which must
    keep ``metadata.name`` and ``metadata.namespace``) instead of the object, and a watch event
    that leaves it as it was calls no handler."""

    def __init__(
        self,
        name: str,
        source: ListWatch | Callable[..., Any],
        handler: Callable[[str], None],
        watch_timeout: int = 240,
        transform: Callable[[KubeObject], KubeObject] | None = None,
    ) -> None:
        self.name = name
        self.source = cast(ListWatch, source) if hasattr(source, "watch") else ClientListWatch(source)
        self.handler = handler
        self.watch_timeout = watch_timeout
        self.transform = transform
        self.cache: dict[str, KubeObject] = {}
        self.lock = threading.Lock()
        self.synced = threading.Event()
        self.relists = 0

    def get(self, key: str) -> KubeObject | None:
        with self.lock:
            return self.cache.get(key)

    def cached_keys(self) -> list[str]:
        with self.lock:
            return list(self.cache)

    def values(self) -> list[KubeObject]:
        with self.lock:
            return list(self.cache.values())

    def relist(self) -> str:
        body = self.source.list()
        fresh = {key_of(o): self._kept(o) for o in body.get("items") or []}
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
        return str(body["metadata"]["resourceVersion"])

    def _kept(self, obj: KubeObject) -> KubeObject:
        return obj if self.transform is None else self.transform(obj)

    def watch(self, rv: str, stop: threading.Event) -> None:
        """Watch from ``rv`` until ``stop``; raises :class:`Gone` on 410."""
        while not stop.is_set():
            log.debug("%s: watching from resourceVersion %s", self.name, rv)
            events = self.source.watch(rv, self.watch_timeout)
            try:
                for ev in events:
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
                            obj = self._kept(obj)
                            if self.transform is not None and self.cache.get(k) == obj:
                                continue  # nothing of what is kept changed
                            self.cache[k] = obj
                    self.handler(k)
                    if stop.is_set():
                        return
            finally:
                close_iterator(events)

    def run(self, stop: threading.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                rv = self.relist()
                backoff = 0.5
                self.watch(rv, stop)
            except Gone as e:
                log.info("%s: watch expired (%s): relisting", self.name, e)
            except Exception as e:  # an API error, the connection dropped, apiserver away: retry
                err = api_error(e)
                if err is not None and err.status == 410:
                    log.info("%s: 410 Gone: relisting", self.name)
                    continue
                if err is not None:
                    log.warning(
                        "%s: API error %s %s: relisting in %.1fs", self.name, err.status, err.reason, backoff
                    )
                else:
                    log.warning("%s: %s: relisting in %.1fs", self.name, e, backoff)
                stop.wait(backoff)  # keep what we have meanwhile
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
    """Writes core/v1 Events about VirtualMachines (shown by ``kubectl describe vm``) as plain JSON
    through a :class:`~cri_shim.kube_rest.KubeApi` (a kubernetes ``ApiClient`` is wrapped in one)."""

    def __init__(self, api: KubeApi | Any, component: str, host: str) -> None:
        self.api = kube_api(api)
        self.component = component
        self.host = host

    def emit(self, obj: KubeObject, etype: str, reason: str, message: str) -> None:
        m = obj["metadata"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body: KubeObject = {
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
            self.api.request("POST", f"/api/v1/namespaces/{quote(m['namespace'])}/events", body)
        except ApiError as e:  # events are best effort; never fail a reconcile over one
            log.warning("event %s/%s %s not recorded: %s", m["namespace"], m["name"], reason, e.reason)
