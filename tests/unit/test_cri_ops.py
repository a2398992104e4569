"""edgevirt-cri's operational side, in process: sd_notify to a socket of the test's own, the ops HTTP
server (/healthz, /readyz, /metrics, bounds), the CRI metrics (names, labels, error codes, VMs by
state), the server's timing hook over a real unix socket, readiness, and JSON logs."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from cri_fake import FakeBackend, api
from prometheus_client import CollectorRegistry, Gauge

from cri_shim import logsetup
from cri_shim._generated import api_pb2_grpc
from cri_shim.errors import BackendError
from cri_shim.metrics import CriMetrics, HandlerCollector, MeteredBackend, VmCollector, new_registry
from cri_shim.ops_http import AddressError, OpsServer, parse_address
from cri_shim.readiness import CriReadiness
from cri_shim.router import Router
from cri_shim.sd_notify import READY, STOPPING, Notifier, socket_address
from cri_shim.server import serve
from cri_shim.state import IdIndex

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _root_logger_restored():
    """logsetup.configure replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in the text exposition, None when absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, rest = series.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == name and got == want:
            return float(value)
    return None


# --- sd_notify ---
def test_socket_address_paths_and_abstract_names():
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abstract/name") == "\0abstract/name"
    assert socket_address("") is None and socket_address("@") is None and socket_address("vsock:2:3") is None


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_to_the_socket_and_removes_it_from_the_environment(tmp_path, abstract):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        if abstract:
            name = f"edgevirt-test-{os.getpid()}-{tmp_path.name}"
            listener.bind("\0" + name)
            env = {"NOTIFY_SOCKET": "@" + name, "OTHER": "x"}
        else:
            listener.bind(str(tmp_path / "notify"))
            env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "OTHER": "x"}
        listener.settimeout(30)
        notifier = Notifier.from_environment(env)
        assert env == {"OTHER": "x"}  # children of the service never see it
        assert notifier.notify(READY) and notifier.notify(STOPPING)
        assert listener.recv(256) == b"READY=1"
        assert listener.recv(256) == b"STOPPING=1"


def test_notify_without_a_socket_is_a_no_op_and_a_dead_socket_is_not_fatal(tmp_path, caplog):
    assert Notifier.from_environment({}).notify(READY) is False
    with caplog.at_level(logging.WARNING):
        assert Notifier(str(tmp_path / "nobody")).notify(READY) is False
    assert "cannot notify" in caplog.text


# --- the ops HTTP server ---
def test_parse_address():
    assert parse_address("127.0.0.1:9641") == ("127.0.0.1", 9641)
    assert parse_address("[::1]:9641") == ("::1", 9641)
    assert parse_address("") is None
    for bad in ("9641", ":9641", "127.0.0.1:", "127.0.0.1:x", "127.0.0.1:70000"):
        with pytest.raises(AddressError, match="--ops-address"):
            parse_address(bad)


@pytest.fixture
def ops():
    registry = CollectorRegistry()
    Gauge("edgevirt_test_value", "a test gauge", registry=registry).set(7)
    state = {"ready": (True, "")}

    def ready():
        if isinstance(state["ready"], Exception):
            raise state["ready"]
        return state["ready"]

    server = OpsServer(("127.0.0.1", 0), registry, ready).start()
    try:
        yield server, state
    finally:
        server.stop()


def test_healthz_readyz_metrics_and_404(ops):
    server, state = ops
    assert get(server.url + "/healthz")[::2] == (200, "ok\n")
    assert get(server.url + "/readyz")[::2] == (200, "ok\n")
    state["ready"] = (False, "containerd does not answer")
    assert get(server.url + "/readyz")[::2] == (503, "not ready: containerd does not answer\n")
    state["ready"] = RuntimeError("boom")
    status, _, body = get(server.url + "/readyz")
    assert status == 503 and "boom" in body
    status, ctype, body = get(server.url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain") and sample(body, "edgevirt_test_value") == 7
    status, ctype, body = get(server.url + "/metrics", {"Accept": "application/openmetrics-text"})
    assert ctype.startswith("application/openmetrics-text") and body.endswith("# EOF\n")
    assert get(server.url + "/nope")[0] == 404


def test_head_has_no_body(ops):
    server, _ = ops
    req = urllib.request.Request(server.url + "/healthz", method="HEAD")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Length"] == "3" and r.read() == b""


def test_connections_beyond_the_limit_are_closed_at_once():
    server = OpsServer(("127.0.0.1", 0), CollectorRegistry(), lambda: (True, ""), max_connections=1).start()
    idle = socket.create_connection(server.address, timeout=30)
    try:
        idle.sendall(b"GET /healthz")  # an unfinished request holds the only slot
        with socket.create_connection(server.address, timeout=30) as second:
            second.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert second.recv(100) == b""  # closed without an answer
    finally:
        idle.close()
        server.stop()


def test_a_taken_address_is_an_oserror(ops):
    server, _ = ops
    with pytest.raises(OSError):
        OpsServer(server.address, CollectorRegistry(), lambda: (True, "")).start()


# --- metrics ---
def test_request_and_backend_metrics_names_labels_and_codes():
    registry = new_registry()
    metrics = CriMetrics(registry)
    metrics.observe_request("ListPodSandbox", 0.002, grpc.StatusCode.OK)
    metrics.observe_request("ListPodSandbox", 0.004, grpc.StatusCode.UNAVAILABLE)
    backend = MeteredBackend(FakeBackend("kvm"), metrics)
    backend.invoke("ListContainers", api.ListContainersRequest().SerializeToString())
    with pytest.raises(BackendError):
        backend.invoke("ContainerStatus", api.ContainerStatusRequest(container_id="x").SerializeToString())
    text = get_text(registry)
    assert sample(text, "edgevirt_cri_request_duration_seconds_count", method="ListPodSandbox") == 2
    assert sample(text, "edgevirt_cri_request_errors_total", method="ListPodSandbox", code="UNAVAILABLE") == 1
    assert sample(text, "edgevirt_cri_request_errors_total", method="ListPodSandbox", code="OK") is None
    for method in ("ListContainers", "ContainerStatus"):
        assert (
            sample(text, "edgevirt_cri_backend_request_duration_seconds_count", method=method, backend="kvm")
            == 1
        )
    assert (
        sample(
            text,
            "edgevirt_cri_backend_request_errors_total",
            method="ContainerStatus",
            backend="kvm",
            code="NOT_FOUND",
        )
        == 1
    )
    assert sample(text, "process_open_fds") is not None  # the process collector is there too


def get_text(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def test_the_metered_backend_is_the_inner_one_otherwise():
    inner = FakeBackend("containerd", images=True)
    inner.extra_attribute = "kept"
    metered = MeteredBackend(inner, CriMetrics(CollectorRegistry()))
    assert (metered.name, metered.serves_images, metered.extra_attribute) == ("containerd", True, "kept")
    assert metered.handler_works("runc") and metered.unavailable_reason() is None


def test_vms_by_state_and_handlers_available():
    vm = FakeBackend("kvm")
    sandbox = api.RunPodSandboxRequest(config=api.PodSandboxConfig(metadata=api.PodSandboxMetadata(name="p")))
    sid = api.RunPodSandboxResponse.FromString(
        vm.invoke("RunPodSandbox", sandbox.SerializeToString())
    ).pod_sandbox_id
    for name in ("a", "b", "c"):
        req = api.CreateContainerRequest(
            pod_sandbox_id=sid, config=api.ContainerConfig(metadata=api.ContainerMetadata(name=name))
        )
        vm.invoke("CreateContainer", req.SerializeToString())
    running = next(iter(vm.containers))
    vm.invoke("StartContainer", api.StartContainerRequest(container_id=running).SerializeToString())
    down = FakeBackend("kvm2")
    down.down = True
    registry = CollectorRegistry()
    registry.register(VmCollector({"kvm": vm, "kvm2": down}))
    registry.register(
        HandlerCollector(
            {"": "containerd", "kvm": "kvm", "kata": "containerd"}, {"": "containerd", "kvm": "kvm"}
        )
    )
    text = get_text(registry)
    assert sample(text, "edgevirt_cri_vms", backend="kvm", state="created") == 2
    assert sample(text, "edgevirt_cri_vms", backend="kvm", state="running") == 1
    assert sample(text, "edgevirt_cri_vms", backend="kvm", state="exited") == 0
    assert sample(text, "edgevirt_cri_vms", backend="kvm2", state="created") is None  # did not answer
    assert sample(text, "edgevirt_cri_handler_available", handler="kvm", backend="kvm") == 1
    assert sample(text, "edgevirt_cri_handler_available", handler="kata", backend="containerd") == 0


# --- the server's timing hook, over a real socket ---
def test_every_call_is_observed_with_its_status_code(tmp_path):
    seen: list[tuple[str, grpc.StatusCode]] = []
    ctd = FakeBackend("containerd", images=True)
    router = Router({"containerd": ctd}, {"": "containerd"}, IdIndex(tmp_path / "s"))
    sock = tmp_path / "cri.sock"
    srv = serve(router, str(sock), 0o660, workers=4, observe=lambda m, s, c: seen.append((m, c)))
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        stub = api_pb2_grpc.RuntimeServiceStub(channel)
        stub.Version(api.VersionRequest(), timeout=30)
        stub.ListPodSandbox(api.ListPodSandboxRequest(), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.ContainerStatus(api.ContainerStatusRequest(container_id="ab" * 32), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.RunPodSandbox(api.RunPodSandboxRequest(runtime_handler="nope"), timeout=30)
    finally:
        channel.close()
        srv.stop(grace=None).wait(30)
        router.close()
    assert seen == [
        ("Version", grpc.StatusCode.OK),
        ("ListPodSandbox", grpc.StatusCode.OK),
        ("ContainerStatus", grpc.StatusCode.NOT_FOUND),
        ("RunPodSandbox", grpc.StatusCode.INVALID_ARGUMENT),
    ]


# --- readiness ---
def test_readiness_needs_serving_and_an_answering_default_backend(tmp_path):
    ctd = FakeBackend("containerd", images=True)
    router = Router({"containerd": ctd}, {"": "containerd"}, IdIndex(tmp_path / "s"))
    sock = tmp_path / "cri.sock"
    readiness = CriReadiness(str(sock), ctd, timeout=10)
    assert readiness() == (False, "not serving CRI yet")
    srv = serve(router, str(sock), 0o660, workers=4)
    try:
        readiness.serving = True
        assert readiness() == (True, "")  # FakeBackend has no Version: UNIMPLEMENTED is an answer
        ctd.down = True
        ok, why = readiness()
        assert not ok and "the default backend containerd does not answer" in why
        ctd.down = False
        readiness.stopping = True
        assert readiness() == (False, "stopping")
    finally:
        srv.stop(grace=None).wait(30)
        router.close()
        readiness.close()
    readiness.stopping = False
    ok, why = readiness()
    assert not ok and f"the CRI socket {sock} does not accept connections" in why


# --- logs ---
def test_json_log_lines_carry_time_level_logger_message_and_extra_fields():
    stream = io.StringIO()
    logsetup.configure("debug", "json", stream)
    logging.getLogger("edgevirt-cri.test").info(
        "served %s", "Version", extra={"method": "Version", "ms": 1.5}
    )
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("edgevirt-cri.test").exception("failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "info" and first["logger"] == "edgevirt-cri.test"
    assert first["message"] == "served Version" and first["method"] == "Version" and first["ms"] == 1.5
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert second["level"] == "error" and "ValueError: bad" in second["exception"]


def test_text_log_and_bad_choices():
    stream = io.StringIO()
    logsetup.configure("info", "text", stream)
    logging.getLogger("edgevirt-cri.test").debug("hidden")
    logging.getLogger("edgevirt-cri.test").warning("shown")
    assert "hidden" not in stream.getvalue() and "WARNING edgevirt-cri.test: shown" in stream.getvalue()
    with pytest.raises(ValueError, match="--log-format"):
        logsetup.configure("info", "xml")
    with pytest.raises(ValueError, match="--log-level"):
        logsetup.configure("loud", "text")


def test_cli_refuses_a_bad_ops_address(tmp_path: Path, capsys):
    from cri_shim import cli

    assert cli.main(["--ops-address", "nonsense", "--socket", str(tmp_path / "s.sock")]) == 2
    assert "--ops-address" in capsys.readouterr().err
