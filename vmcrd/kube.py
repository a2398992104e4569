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
from typing import Any, cast
from urllib.parse import quote

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from cri_shim import kube_rest

from .api import KubeObject

log = logging.getLogger(__name__)
#: Longest wait between relists after the API server failed: short, so that after an outage of an
#: edge node's API server the controllers see its return (and catch status up) within seconds.
RELIST_BACKOFF_MAX = 4.0

# the kubernetes client's config loaders and line reader carry no annotations: typed views of them
_load_kube_config = cast(Callable[..., None], config.load_kube_config)
_load_incluster_config = cast(Callable[..., None], config.load_incluster_config)
_list_kube_config_contexts = cast(
    Callable[..., tuple[list[dict[str, Any]], dict[str, Any] | None]], config.list_kube_config_contexts
)
_iter_resp_lines = cast(Callable[[Any], Iterator[str]], iter_resp_lines)


def api_client(
    kubeconfig: str | None = None, context: str | None = None, in_cluster: bool = True
) -> client.ApiClient:
    """A client from ``kubeconfig`` (or $KUBECONFIG / ~/.kube/config) and its ``context`` (default:
    the current one), else, if ``in_cluster``, the in-cluster config (a pod's service account)."""
    try:
        cfg = client.Configuration()
        _load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    except Exception:
        if kubeconfig or not in_cluster:
            raise
        cfg = client.Configuration()
        _load_incluster_config(client_configuration=cfg)
    return client.ApiClient(cfg)


def kubeconfig_namespace(kubeconfig: str | None = None, context: str | None = None) -> str | None:
    """The namespace of ``context`` (default: the current context) in the kubeconfig, if it sets one."""
    contexts, active = _list_kube_config_contexts(config_file=kubeconfig)
    if context:
        active = next((c for c in contexts if c["name"] == context), active)
    ns = (active or {}).get("context", {}).get("namespace")
    return str(ns) if ns else None


def api_message(e: ApiException) -> str:
    """What the API server said (its Status message), else ``<status> <reason>``."""
    try:
        return str(json.loads(e.body or "").get("message") or f"{e.status} {e.reason}")
    except Exception:
        return f"{e.status} {e.reason}"


def key_of(obj: KubeObject) -> str:
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
        return str(body["metadata"]["resourceVersion"])

    def _events(self, rv: str) -> Iterator[KubeObject]:
        resp = self.list_fn(
            watch=True,
            resource_version=rv,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout,
            _preload_content=False,
            _request_timeout=(10, self.watch_timeout + 30),
        )
        try:
            for line in _iter_resp_lines(resp):
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
    """Writes core/v1 Events about VirtualMachines (shown by ``kubectl describe vm``), straight through
    the ApiClient (:mod:`cri_shim.kube_rest`): node mode needs no ``CoreV1Api`` for them."""

    def __init__(self, api_client: client.ApiClient, component: str, host: str) -> None:
        self.api_client = api_client
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
            kube_rest.request(
                self.api_client, "POST", f"/api/v1/namespaces/{quote(m['namespace'])}/events", body
            )
        except ApiException as e:  # events are best effort; never fail a reconcile over one
            log.warning("event %s/%s %s not recorded: %s", m["namespace"], m["name"], reason, e.reason)
