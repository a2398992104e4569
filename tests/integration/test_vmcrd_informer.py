"""vmcrd.kube.Informer against the real API server: list then watch, 410 Gone -> relist, resume."""

from __future__ import annotations

import threading
import uuid

import pytest
from kubernetes import client

from vmcrd.kube import Gone, Informer, api_client

pytestmark = pytest.mark.cluster


@pytest.fixture
def core(cluster):
    return client.CoreV1Api(api_client(str(cluster.paths.kubeconfig)))


@pytest.fixture
def ns(cluster):
    name = f"vmcrd-inf-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def configmaps(core, ns):
    return lambda **kw: core.list_namespaced_config_map(ns, label_selector="vmcrd-test", **kw)


def cm(name: str) -> dict:
    return {"metadata": {"name": name, "labels": {"vmcrd-test": "1"}}, "data": {"k": "v"}}


def test_watch_from_an_expired_version_raises_gone(core, ns):
    inf = Informer("cm", configmaps(core, ns), lambda k: None, watch_timeout=10)
    with pytest.raises(Gone, match="too old resource version"):
        inf.watch("1", threading.Event())


def test_relist_after_gone_catches_up_and_reports_vanished_keys(core, ns):
    seen: list[str] = []
    changed = threading.Condition()

    def handler(key: str) -> None:
        with changed:
            seen.append(key)
            changed.notify_all()

    core.create_namespaced_config_map(ns, cm("a"))
    core.create_namespaced_config_map(ns, cm("b"))
    inf = Informer("cm", configmaps(core, ns), handler, watch_timeout=10)
    real_relist = inf.relist
    expired = {"n": 0}

    def relist_then_expire() -> str:
        rv = real_relist()
        if expired["n"] == 0:  # the first watch starts from a version the server no longer has
            expired["n"] += 1
            expired["mark"] = len(seen)
            core.delete_namespaced_config_map("b", ns)  # happens while "nobody watches"
            core.create_namespaced_config_map(ns, cm("c"))
            return "1"
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
        core.create_namespaced_config_map(ns, cm("d"))
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
