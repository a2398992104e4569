"""The macvtap daemon's operational side without namespaces: JSON and text logs, sd_notify, the ops
endpoint (thread and poll modes), the workers' census and ready pipe, the multiprocess metrics of
forked workers summed by the supervisor (in files per worker slot), the server's metric hooks, and
that the plugin's client path never loads prometheus_client."""

from __future__ import annotations

import io
import json
import logging
import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge

from cni_macvtap import client, daemon_log, metrics_files, wire
from cni_macvtap.metrics import cni_error_code, command_label
from cni_macvtap.ops import OpsEndpoint, parse_address
from cni_macvtap.sd_notify import READY, Notifier
from cni_macvtap.server import Server
from cni_macvtap.supervisor import NOTE_BUSY, NOTE_READY, NOTE_RETIRING, Census, ReadyPipe

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _root_logger_restored():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_json_and_text_log_lines():
    stream = io.StringIO()
    daemon_log.configure("info", "json", stream)
    daemon_log.log.info("ADD c1/eth0 ok in 1.2 ms", extra={"command": "ADD", "container_id": "c1", "ms": 1.2})
    daemon_log.log.debug("not shown")
    [line] = stream.getvalue().splitlines()
    doc = json.loads(line)
    assert (doc["level"], doc["logger"], doc["message"]) == (
        "info",
        "macvtap-daemon",
        "ADD c1/eth0 ok in 1.2 ms",
    )
    assert (
        doc["command"] == "ADD"
        and doc["container_id"] == "c1"
        and doc["ms"] == 1.2
        and doc["time"].endswith("Z")
    )
    stream = io.StringIO()
    daemon_log.configure("warning", "text", stream)
    daemon_log.log.info("hidden")
    daemon_log.log.warning("busy: every connection slot is taken")
    assert stream.getvalue().endswith(" WARNING macvtap-daemon: busy: every connection slot is taken\n")
    with pytest.raises(ValueError):
        daemon_log.configure("info", "yaml", stream)


def test_sd_notify_to_a_socket_of_our_own(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        listener.settimeout(30)
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
        assert Notifier.from_environment(env).notify(READY) and env == {}
        assert listener.recv(64) == b"READY=1"
    assert not Notifier.from_environment({}).notify(READY)


def test_parse_address():
    assert parse_address("127.0.0.1:9642") == ("127.0.0.1", 9642) and parse_address("") is None
    assert parse_address("[::1]:1") == ("::1", 1)
    with pytest.raises(ValueError, match="--ops-address"):
        parse_address("9642")


def _endpoint(census: Census) -> OpsEndpoint:
    registry = CollectorRegistry()
    Gauge("macvtap_test_value", "a test gauge", registry=registry).set(3)
    return OpsEndpoint(("127.0.0.1", 0), registry, census.readiness)


def test_the_endpoint_in_a_thread():
    census = Census(configured=2, minimum=2)
    ops = _endpoint(census)
    ops.serve_in_thread()
    url = f"http://127.0.0.1:{ops.address[1]}"
    try:
        assert get(url + "/healthz") == (200, "ok\n")
        assert get(url + "/readyz") == (503, "not ready: 0 of 2 workers ready\n")
        census.ready_pids.update({11, 12})
        assert get(url + "/readyz") == (200, "ok\n")
        status, body = get(url + "/metrics")
        assert status == 200 and "macvtap_test_value 3.0" in body
        assert get(url + "/x")[0] == 404
    finally:
        ops.close()


def test_the_endpoint_polled_from_a_loop_without_threads_of_its_own():
    ops = _endpoint(Census(configured=1, minimum=1, ready_pids={1}))
    result: list[tuple[int, str]] = []
    client_thread = threading.Thread(
        target=lambda: result.append(get(f"http://127.0.0.1:{ops.address[1]}/readyz"))
    )
    client_thread.start()
    try:
        readable, _, _ = select.select([ops.fileno()], [], [], 30)
        assert readable == [ops.fileno()]
        ops.handle_one()
        client_thread.join(30)
    finally:
        ops.close()
    assert result == [(200, "ok\n")]


def test_census_and_ready_pipe():
    pipe = ReadyPipe()
    try:
        assert pipe.drain() == []
        pipe.announce()
        pipe.busy()
        pipe.retiring()
        me = os.getpid()
        assert pipe.drain() == [(me, NOTE_READY), (me, NOTE_BUSY), (me, NOTE_RETIRING)]
        for _ in range(100_000):  # a supervisor that is behind never blocks a worker: notes are dropped
            pipe.busy()
        assert 0 < len(pipe.drain()) < 100_000
    finally:
        pipe.close()
    census = Census(configured=2, minimum=2, ready_pids={5})
    assert census.readiness() == (False, "1 of 2 workers ready")
    assert Census(configured=2).readiness() == (True, "")  # on demand: ready with no worker at all


def test_labels_and_cni_error_codes():
    assert (
        command_label("ADD") == "ADD" and command_label("FOO") == "other" and command_label(None) == "other"
    )
    assert cni_error_code(b'{"cniVersion": "1.0.0", "code": 7, "msg": "x"}') == "7"
    assert cni_error_code(b"not json") == "unknown" and cni_error_code(b"[]") == "unknown"


def test_the_multiprocess_directory_must_come_before_prometheus_client(tmp_path):
    assert "prometheus_client" in sys.modules  # this process: too late, and it says so
    with pytest.raises(RuntimeError, match="before its multiprocess directory"):
        metrics_files.enable(str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


WORKERS = """
import json, os, sys
from cni_macvtap import metrics_files
path = sys.argv[1]
metrics_files.enable(path)
from prometheus_client import generate_latest
from cni_macvtap.metrics import RequestMetrics, exposition_registry
from cni_macvtap.supervisor import Census
pids = []
for worker, slot in ((0, 0), (1, 1), (2, 1)):  # the third worker follows the second in slot 1
    pid = os.fork()
    if pid == 0:
        m = RequestMetrics(slot)
        for _ in range(worker + 1):
            m.observe("ADD", 0.003, 0, b"")
        m.observe("DEL", 0.001, 1, json.dumps({"code": 11, "msg": "try again"}).encode())
        m.count_not_served("busy")
        os._exit(0)
    os.waitpid(pid, 0)
    pids.append(pid)
census = Census(configured=2, minimum=1, ready_pids=set(pids[1:]), restarts=1)
sys.stdout.write(generate_latest(exposition_registry(path, census)).decode())
print("files: " + " ".join(sorted(os.listdir(path))))
metrics_files.disable(path)
assert not os.path.exists(path) and metrics_files.ENV not in os.environ
"""


def test_forked_workers_values_are_summed_by_the_supervisor(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", WORKERS, str(tmp_path / "sock.metrics")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = set(r.stdout.splitlines())
    for expected in (
        'macvtap_cni_request_duration_seconds_count{command="ADD"} 6.0',
        'macvtap_cni_request_duration_seconds_bucket{command="ADD",le="0.005"} 6.0',
        'macvtap_cni_request_duration_seconds_bucket{command="ADD",le="0.002"} 0.0',
        'macvtap_cni_request_duration_seconds_count{command="DEL"} 3.0',
        'macvtap_cni_request_errors_total{code="11",command="DEL"} 3.0',
        'macvtap_daemon_requests_not_served_total{reason="busy"} 3.0',
        'macvtap_daemon_workers{state="configured"} 2.0',
        'macvtap_daemon_workers{state="minimum"} 1.0',
        'macvtap_daemon_workers{state="ready"} 2.0',
        "macvtap_daemon_worker_restarts_total 1.0",
        # one file per slot and kind, however many workers came and went
        "files: counter_0.db counter_1.db histogram_0.db histogram_1.db",
    ):
        assert expected in lines, (expected, r.stdout)


class FakeMetrics:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def observe(self, command, seconds, exit_code, out):
        self.calls.append(("observe", command, exit_code, cni_error_code(out) if exit_code else None))

    def count_not_served(self, reason):
        self.calls.append(("not_served", reason))


def test_the_server_reports_calls_and_requests_it_did_not_serve(tmp_path):
    server = Server(str(tmp_path / "m.sock"), request_timeout=5)
    server.metrics = fake = FakeMetrics()
    server.bind()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    stdin = json.dumps({"cniVersion": "1.0.0"}).encode()
    try:
        out, code, _ = client.call(server.path, {"CNI_COMMAND": "VERSION"}, stdin)
        assert code == 0 and b"supportedVersions" in out
        out, code, _ = client.call(server.path, {"CNI_COMMAND": "ADD"}, b"{not json")
        assert code == 1
        with socket.socket(socket.AF_UNIX) as s:  # another network namespace, as far as it says
            s.connect(server.path)
            wire.send_request(s, client.own_netns() + 1, {"CNI_COMMAND": "VERSION"}, stdin)
            assert wire.recv_reply(s)[0] == wire.FALLBACK
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(server.path)
            s.sendall(b"XXXX" + bytes(20))
            assert wire.recv_reply(s)[0] == 1
    finally:
        server.stop()
        thread.join(30)
    assert fake.calls == [
        ("observe", "VERSION", 0, None),
        ("observe", "ADD", 1, "4"),  # CNI_* missing: 4, bad environment
        ("not_served", "other_netns"),
        ("not_served", "malformed"),
    ]


CLIENT_PATH = """
import sys
import cni_macvtap.cli, cni_macvtap.client, cni_macvtap.jsonscan, cni_macvtap.wire, cni_macvtap.plugin
loaded = [m for m in ("prometheus_client", "cni_macvtap.metrics", "cni_macvtap.ops", "cni_macvtap.supervisor",
                      "cni_macvtap.daemon_log", "http.server") if m in sys.modules]
print(loaded)
"""


def test_the_plugin_path_loads_nothing_of_the_daemon_s_operations():
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CLIENT_PATH)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
