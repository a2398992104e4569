"""vmcrd.kube.Informer against the real API server: list then watch, 410 Gone -> relist, resume.

A 410 is made to happen, not waited for: a young API server's watch cache has evicted nothing, so
a watch of configmaps from resourceVersion "1" is replayed, not refused (only a long-running
server answers 410 there). The watch cache of a resource that is new *now* starts at the current
etcd revision, though: every older version is expired for it at once. So the tests that need a
410 watch objects of a CustomResourceDefinition made for this module.
"""

from __future__ import annotations

import threading
import uuid

import pytest
from kubernetes import client

from vmcrd.kube import Gone, Informer, api_client

pytestmark = pytest.mark.cluster

GROUP = f"inf{uuid.uuid4().hex[:6]}.test.edgevirt.io"
PLURAL = "widgets"


@pytest.fixture
def core(cluster):
    return client.CoreV1Api(api_client(str(cluster.paths.kubeconfig)))


@pytest.fixture(scope="module")
def widgets(cluster):
    """A namespaced CRD of this module's own (its watch cache starts now); removed at the end."""
    crd = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: {PLURAL}.{GROUP}}}
spec:
  group: {GROUP}
  scope: Namespaced
  names: {{plural: {PLURAL}, singular: widget, kind: Widget}}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}
"""
    cluster.kubectl("apply", "-f", "-", input=crd)
    try:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}", "--timeout=60s")
        yield client.CustomObjectsApi(api_client(str(cluster.paths.kubeconfig)))
    finally:
        cluster.kubectl("delete", "crd", f"{PLURAL}.{GROUP}", "--wait=false", check=False)


@pytest.fixture
def ns(cluster):
    with cluster.namespace("vmcrd-inf") as name:
        yield name


def configmaps(core, ns):
    return lambda **kw: core.list_namespaced_config_map(ns, label_selector="vmcrd-test", **kw)


def cm(name: str) -> dict:
    return {"metadata": {"name": name, "labels": {"vmcrd-test": "1"}}, "data": {"k": "v"}}


def list_widgets(custom, ns):
    return lambda **kw: custom.list_namespaced_custom_object(GROUP, "v1", ns, PLURAL, **kw)


def widget(name: str) -> dict:
    return {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": name}, "data": {"k": "v"}}


def watch_bounded(inf: Informer, rv: str, timeout: float = 60) -> BaseException | None:
    """Run ``inf.watch(rv)`` for at most ``timeout`` s; returns what it raised (None: it returned)."""
    stop = threading.Event()
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            inf.watch(rv, stop)
            raised.append(None)
        except BaseException as e:
            raised.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    stop.set()
    assert raised, f"the watch from resourceVersion {rv} neither failed nor ended within {timeout}s"
    return raised[0]


def test_watch_from_an_expired_version_raises_gone(widgets, ns):
    widgets.create_namespaced_custom_object(GROUP, "v1", ns, PLURAL, widget("w1"))
    inf = Informer("widgets", list_widgets(widgets, ns), lambda k: None, watch_timeout=10)
    err = watch_bounded(inf, "1")
    assert isinstance(err, Gone), err
    assert "too old resource version" in str(err)


def test_relist_after_gone_catches_up_and_reports_vanished_keys(widgets, ns):
    seen: list[str] = []
    changed = threading.Condition()

    def handler(key: str) -> None:
        with changed:
            seen.append(key)
            changed.notify_all()

    create = lambda name: widgets.create_namespaced_custom_object(GROUP, "v1", ns, PLURAL, widget(name))  # noqa: E731
    create("a")
    create("b")
    inf = Informer("widgets", list_widgets(widgets, ns), handler, watch_timeout=10)
    real_relist = inf.relist
    expired = {"n": 0}

    def relist_then_expire() -> str:
        rv = real_relist()
        if expired["n"] == 0:  # the first watch starts from a version the server no longer has
            expired["n"] += 1
            expired["mark"] = len(seen)
            widgets.delete_namespaced_custom_object(GROUP, "v1", ns, PLURAL, "b")  # while "nobody watches"
            create("c")
            return "1"  # older than this CRD's watch cache: 410
        return rv

    inf.relist = relist_then_expire  # type: ignore[method-assign]
    stop = threading.Event()
    t = inf.start(stop)
    try:
        with changed:
            ok = changed.wait_for(
                lambda: inf.relists >= 2 and set(inf.cached_keys()) == {f"{ns}/a", f"{ns}/c"}, 60
            )
        assert ok, (inf.relists, inf.cached_keys())
        assert (
            f"{ns}/b" in seen[seen.index(f"{ns}/b") + 1 :] or seen.count(f"{ns}/b") >= 2
        )  # told it vanished
        # and the watch after the relist delivers new changes
        create("d")
        with changed:
            assert changed.wait_for(lambda: f"{ns}/d" in inf.cached_keys(), 60)
        assert inf.get(f"{ns}/d")["data"] == {"k": "v"}  # plain dicts, as the API serves them
    finally:
        stop.set()
        t.join(20)


def test_watch_resumes_after_the_server_ends_it(core, ns):
    arrived = threading.Condition()

    def handler(key: str) -> None:
        with arrived:
            arrived.notify_all()

    # the server ends each watch after 1 s; the informer must resume from its version each time
    inf = Informer("cm", configmaps(core, ns), handler, watch_timeout=1)
    stop = threading.Event()
    t = inf.start(stop)
    try:
        assert inf.synced.wait(30)
        created = threading.Event()

        def create_later() -> None:
            # long after several 1-second watches have ended and been resumed
            stop.wait(3.5)
            core.create_namespaced_config_map(ns, cm("late"))
            created.set()

        threading.Thread(target=create_later, daemon=True).start()
        assert created.wait(60)
        with arrived:
            assert arrived.wait_for(lambda: f"{ns}/late" in inf.cached_keys(), 60)
        assert inf.relists == 1  # resumed from its version, not relisted
    finally:
        stop.set()
        t.join(20)
