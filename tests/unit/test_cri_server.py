"""edgevirt-cri's gRPC server on a real unix socket, in process, with fake backends: Version, errors
passed through with their code, UNIMPLEMENTED answers with a message, the socket's mode, a stale
socket replaced and a live one refused, and a plugin backend that cannot load left unregistered."""

from __future__ import annotations

import stat

import grpc
import pytest
from cri_fake import FakeBackend, api

from cri_shim import config
from cri_shim._generated import api_pb2_grpc
from cri_shim.backends import loader as backends_mod
from cri_shim.router import Router
from cri_shim.server import serve
from cri_shim.state import IdIndex


@pytest.fixture
def server(tmp_path):
    ctd, vm = FakeBackend("containerd", images=True), FakeBackend("kvm")
    router = Router({"containerd": ctd, "kvm": vm}, {"": "containerd", "kvm": "kvm"}, IdIndex(tmp_path / "s"))
    sock = tmp_path / "cri.sock"
    srv = serve(router, str(sock), 0o660, workers=4)
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        yield sock, channel, ctd, vm
    finally:
        channel.close()
        srv.stop(grace=None).wait(30)
        router.close()


def test_version_over_the_socket(server):
    _, ch, _, _ = server
    v = api_pb2_grpc.RuntimeServiceStub(ch).Version(api.VersionRequest(version="v1"), timeout=10)
    assert (v.runtime_name, v.version, v.runtime_api_version) == ("edgevirt", "0.1.0", "v1")


def test_the_socket_is_mode_0660(server):
    sock, _, _, _ = server
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660


def test_backend_errors_keep_their_code_and_message(server):
    _, ch, _, _ = server
    stub = api_pb2_grpc.RuntimeServiceStub(ch)
    with pytest.raises(grpc.RpcError) as e:
        stub.ContainerStatus(api.ContainerStatusRequest(container_id="ab" * 32), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not found in containerd" in e.value.details()


def test_unknown_handler_over_the_socket(server):
    _, ch, ctd, vm = server
    req = api.RunPodSandboxRequest(runtime_handler="nope", config=api.PodSandboxConfig())
    with pytest.raises(grpc.RpcError) as e:
        api_pb2_grpc.RuntimeServiceStub(ch).RunPodSandbox(req, timeout=10)
    assert "RunPodSandbox" not in ctd.calls + vm.calls
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'unknown runtime handler "nope"' in e.value.details() and '"kvm"' in e.value.details()


def test_a_method_nobody_serves_answers_unimplemented_with_a_message(server):
    _, ch, _, _ = server
    # RuntimeConfig exists in runtime.v1 but neither fake backend implements it.
    with pytest.raises(grpc.RpcError) as e:
        api_pb2_grpc.RuntimeServiceStub(ch).RuntimeConfig(api.RuntimeConfigRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "containerd does not implement RuntimeConfig" in e.value.details()


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        (
            "/runtime.v1.RuntimeService/NoSuchMethod",
            "does not implement /runtime.v1.RuntimeService/NoSuchMethod",
        ),
        ("/runtime.v1alpha2.RuntimeService/Version", "speaks CRI runtime.v1 only"),
    ],
)
def test_unknown_methods_and_api_versions_answer_unimplemented(server, path, needle):
    _, ch, _, _ = server
    call = ch.unary_unary(path, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        call(b"", timeout=10)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert needle in e.value.details()


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path, server):
    live_sock, _, ctd, _ = server
    router = Router({"containerd": ctd}, {"": "containerd"}, IdIndex(tmp_path / "s2"))
    with pytest.raises(RuntimeError, match="in use by a running server"):
        serve(router, str(live_sock))
    stale = tmp_path / "stale.sock"
    import socket

    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # bound, never listening: what a killed server leaves
    srv = serve(router, str(stale))
    try:
        ch = grpc.insecure_channel(f"unix://{stale}")
        assert (
            api_pb2_grpc.RuntimeServiceStub(ch).Version(api.VersionRequest(), timeout=10).runtime_name
            == "edgevirt"
        )
        ch.close()
    finally:
        srv.stop(grace=None).wait(30)
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("x")
    with pytest.raises(RuntimeError, match="not a socket"):
        serve(router, str(not_a_socket))


def test_a_plugin_backend_that_cannot_load_leaves_its_handler_unregistered(tmp_path):
    cfg = config.parse(
        {
            "backends": {
                "containerd": {"type": "containerd", "socket": str(tmp_path / "absent.sock")},
                "kvm": {"type": "plugin", "factory": "no_such_module_xyz:create"},
            },
            "handlers": {"": "containerd", "kvm": "kvm"},
        }
    )
    backends, handlers, unavailable = backends_mod.build(cfg)
    try:
        assert set(backends) == {"containerd"}
        assert handlers == {"": "containerd"}
        assert "no_such_module_xyz" in unavailable["kvm"]
    finally:
        for b in backends.values():
            b.close()


@pytest.mark.parametrize("unavailable", [None, "no usable accelerator: /dev/kvm hangs and qemu is missing"])
def test_a_plugin_backend_is_registered_only_when_available(tmp_path, unavailable):
    cfg = config.parse(
        {
            "backends": {
                "containerd": {"type": "containerd", "socket": str(tmp_path / "absent.sock")},
                "kvm": {
                    "type": "plugin",
                    "factory": "cri_fake:create",
                    "options": {"unavailable": unavailable},
                },
            },
            "handlers": {"": "containerd", "kvm": "kvm"},
        }
    )
    backends, handlers, down = backends_mod.build(cfg)
    try:
        if unavailable is None:
            assert handlers == {"": "containerd", "kvm": "kvm"} and isinstance(backends["kvm"], FakeBackend)
        else:
            assert handlers == {"": "containerd"} and "kvm" not in backends
            assert unavailable in down["kvm"]
    finally:
        for b in backends.values():
            b.close()
