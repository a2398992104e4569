"""edgevirt-controller's operational side without an API server: the reconcile metrics through a
real Runner, the gauges read from informer caches (VMs by status, node mode's filter, leadership,
queue, informers), readiness, the ops server on a free port, the command line (ops address per
mode, bad and taken addresses) and JSON logs."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import urllib.error
import urllib.request

import pytest
from helpers.metrics import sample
from kubernetes.client.exceptions import ApiException

from vmcrd import cli, ops
from vmcrd.kube import Informer, WorkQueue
from vmcrd.runner import RetryDelays, Runner

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _root_logger_restored():
    """cli.configure_logging replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def informer(name: str, objects: list[dict] | None = None, synced: bool = True) -> Informer:
    inf = Informer(name, lambda **kw: None, lambda key: None)
    inf.cache = {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o for o in objects or []}
    if synced:
        inf.synced.set()
        inf.relists = 1
    return inf


def vm(name: str, status: str | None = None, node: str | None = None) -> dict:
    st = {k: v for k, v in (("printableStatus", status), ("nodeName", node)) if v}
    return {"metadata": {"namespace": "ns", "name": name}, "status": st}


def exposition(registry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def test_every_reconcile_is_counted_by_outcome_and_timed():
    outcomes = iter([None, ApiException(status=409), ApiException(status=500), RuntimeError("x"), 3.0])
    stop = threading.Event()
    q = WorkQueue()

    def reconcile(key: str) -> float | None:
        outcome = next(outcomes, None)
        if key == "ns/e":
            stop.set()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    runner = Runner("reconcile", q, [informer("vms")], reconcile, resync=300, delays=RetryDelays(9, 9, 9))
    registry, _ = ops.instrument("cluster", runner)
    for k in ("ns/a", "ns/b", "ns/c", "ns/d", "ns/e"):
        q.add(k)
    runner.work(stop)
    text = exposition(registry)
    for result, n in (("ok", 2), ("conflict", 1), ("api_error", 1), ("error", 1)):
        assert sample(text, "edgevirt_controller_reconciles_total", mode="cluster", result=result) == n
    assert sample(text, "edgevirt_controller_reconcile_duration_seconds_count", mode="cluster") == 5


def test_series_exist_before_the_first_reconcile():
    runner = Runner(
        "reconcile", WorkQueue(), [informer("vms")], lambda k: None, resync=1, delays=RetryDelays(1, 1, 1)
    )
    text = exposition(ops.instrument("node", runner)[0])
    for result in ops.RESULTS:
        assert sample(text, "edgevirt_controller_reconciles_total", mode="node", result=result) == 0
    assert sample(text, "process_resident_memory_bytes") is not None  # the process collector is there


def test_vms_by_status_queue_informers_and_leadership_in_cluster_mode():
    vms = informer("virtualmachines", [vm("a", "Running"), vm("b", "Running"), vm("c", "Stopped"), vm("d")])
    pods = informer("pods", synced=False)
    q = WorkQueue()
    q.add("ns/a")
    leading = threading.Event()
    registry = ops.new_registry()
    registry.register(ops.StateCollector("cluster", [vms, pods], q, is_leader=leading))
    text = exposition(registry)
    assert sample(text, "edgevirt_controller_vms", mode="cluster", status="Running") == 2
    assert sample(text, "edgevirt_controller_vms", mode="cluster", status="Stopped") == 1
    assert sample(text, "edgevirt_controller_vms", mode="cluster", status=ops.NO_STATUS) == 1
    assert sample(text, "edgevirt_controller_queue_depth", mode="cluster") == 1
    assert (
        sample(text, "edgevirt_controller_informer_synced", mode="cluster", resource="virtualmachines") == 1
    )
    assert sample(text, "edgevirt_controller_informer_synced", mode="cluster", resource="pods") == 0
    assert sample(text, "edgevirt_controller_informer_relists_total", mode="cluster", resource="pods") == 0
    assert sample(text, "edgevirt_controller_leader", mode="cluster") == 0
    leading.set()
    assert sample(exposition(registry), "edgevirt_controller_leader", mode="cluster") == 1


def test_node_mode_counts_only_its_nodes_vms_and_has_no_leader_gauge():
    vms = informer(
        "virtualmachines", [vm("a", "Running", "n1"), vm("b", "Running", "n2"), vm("c", "Paused", "n1")]
    )
    registry = ops.new_registry()
    mine = lambda v: v["status"].get("nodeName") == "n1"  # noqa: E731
    registry.register(ops.StateCollector("node", [vms], WorkQueue(), vm_filter=mine))
    text = exposition(registry)
    assert sample(text, "edgevirt_controller_vms", mode="node", status="Running") == 1
    assert sample(text, "edgevirt_controller_vms", mode="node", status="Paused") == 1
    assert "edgevirt_controller_leader" not in text


def test_readiness_waits_for_every_informer_and_ends_when_stopping():
    vms, pods = informer("virtualmachines"), informer("pods", synced=False)
    ready = ops.Readiness([vms, pods])
    assert ready() == (False, "informers not synced yet: pods")
    pods.synced.set()
    assert ready() == (True, "")
    ready.stopping = True
    assert ready() == (False, "stopping")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_ops_server_answers_for_a_standby_with_warm_caches():
    vms, pods = informer("virtualmachines", [vm("a", "Running")]), informer("pods", synced=False)
    runner = Runner(
        "reconcile", WorkQueue(), [vms, pods], lambda k: None, resync=1, delays=RetryDelays(1, 1, 1)
    )
    registry, readiness = ops.instrument("cluster", runner, is_leader=threading.Event())
    server = ops.serve(("127.0.0.1", 0), True, registry, readiness)
    assert server is not None
    try:
        assert get(server.url + "/healthz") == (200, "ok\n")
        assert get(server.url + "/readyz") == (503, "not ready: informers not synced yet: pods\n")
        pods.synced.set()
        assert get(server.url + "/readyz") == (200, "ok\n")  # not the leader, and ready
        status, body = get(server.url + "/metrics")
        assert status == 200 and sample(body, "edgevirt_controller_leader", mode="cluster") == 0
    finally:
        server.stop()


def test_a_taken_default_address_is_skipped_and_a_taken_explicit_one_is_an_error(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = taken.getsockname()
        registry, readiness = ops.new_registry(), ops.Readiness([])
        with caplog.at_level(logging.WARNING):
            assert ops.serve(address, False, registry, readiness) is None
        assert "pass --ops-address to choose another" in caplog.text
        with pytest.raises(ops.OpsUnavailable, match=f"--ops-address 127.0.0.1:{address[1]}: cannot listen"):
            ops.serve(address, True, registry, readiness)
    assert ops.serve(None, True, registry, readiness) is None  # "" disables it


def test_the_default_ops_address_depends_on_the_mode():
    assert cli.DEFAULT_OPS_ADDRESS == {"cluster": "0.0.0.0:9643", "node": "127.0.0.1:9644"}
    assert cli.parse_args(["--mode", "cluster"]).ops_address is None  # the mode's default


@pytest.fixture
def no_signal_handlers(monkeypatch):
    """cli.main installs SIGTERM/SIGINT handlers: not in pytest's own process."""
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)


def test_a_malformed_ops_address_is_refused_naming_the_flag(capsys, no_signal_handlers):
    assert cli.main(["--mode", "cluster", "--ops-address", "9643"]) == 2
    assert "--ops-address: '9643' is not HOST:PORT" in capsys.readouterr().err


def test_an_explicit_ops_address_that_is_taken_stops_the_controller(tmp_path, capsys, no_signal_handlers):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--kubeconfig", str(kubeconfig), "--ops-address", f"127.0.0.1:{port}"]
        assert cli.main(["--mode", "cluster", *args]) == 1
        assert f"--ops-address 127.0.0.1:{port}: cannot listen" in capsys.readouterr().err
        assert cli.main(["--mode", "node", "--node", "n1", *args]) == 1


def test_json_logs_are_one_object_per_line_and_the_http_client_stays_quiet():
    stream = io.StringIO()
    args = cli.parse_args(["--mode", "node", "--log-format", "json", "--log-level", "debug"])
    cli.configure_logging(args)
    logging.getLogger().handlers[0].setStream(stream)  # type: ignore[attr-defined]
    logging.getLogger("vmcrd.node").debug("looked at %s", "ns/a", extra={"vm": "ns/a"})
    logging.getLogger("urllib3.connectionpool").debug("GET /api/v1/pods")
    (line,) = stream.getvalue().splitlines()
    doc = json.loads(line)
    assert (doc["level"], doc["logger"], doc["message"], doc["vm"]) == (
        "debug",
        "vmcrd.node",
        "looked at ns/a",
        "ns/a",
    )
