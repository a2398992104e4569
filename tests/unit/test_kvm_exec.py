"""ExecSync, Exec and PortForward of the kvm handler with a fake libvirt layer (test_kvm_handler's)
and a fake guest (fake_guest.FakeGuests: agent, channels, the session script's guest side): the
CRI answers, the error codes (no agent, timeout, not running), and whole sessions through the
streaming server. The real guest: tests/integration/test_vm_guest_exec_in_a_guest.py, tests/e2e."""

from __future__ import annotations

import json

import grpc
import pytest
from fake_guest import FakeGuests, FakeProc, GuestSide
from spdy_client import Client
from test_kvm_handler import FakeDomains, FakeNetns, create, env, run_pod  # noqa: F401 - env: fixture

from cri_shim import protos, spdy
from cri_shim.errors import BackendError
from cri_shim.kvm.exec import GuestExec

api = protos.api()
pytestmark = pytest.mark.timeout(60)


def guest_program(side: GuestSide, argv: list[str]) -> int:
    """The fake guest: ``cat`` echoes, ``nc`` to port 80 answers, to any other is refused."""
    if argv[0] == "nc":
        if argv[-1] != "80":
            side.captured = b"nc: can't connect to remote host (127.0.0.1): Connection refused\n"
            return 1
        request = side.read_stdin()
        side.write("out", b"HTTP/1.0 200 OK\r\n\r\nyou asked: " + request)
        return 0
    while data := side.read_stdin():
        side.write("out", data)
    return 5


@pytest.fixture
def vm(env):  # noqa: F811 - the fixture imported above
    """A handler with a running VM pod: (handler, sandbox id, container id, fake guests)."""
    make, _mgr, _netns, tmp = env
    b = make()
    guests = FakeGuests(tmp / "channels", guest_program)
    (tmp / "channels").mkdir()
    guests.agent.program = lambda argv: FakeProc(
        argv, exit_code=2, stdout=b" ".join(a.encode() for a in argv), stderr=b"e"
    )
    b.guest = GuestExec(guests, lambda: b.attach_urls.server)
    sid = run_pod(b, tmp)
    cid = create(b, sid)
    b.start_container(api.StartContainerRequest(container_id=cid))
    yield b, sid, cid, guests
    b.close()


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(BackendError) as e:
        call()
    return e.value.code, e.value.message


def test_exec_sync_answers_output_and_exit_code(vm):
    b, _sid, cid, guests = vm
    r = b.exec_sync(api.ExecSyncRequest(container_id=cid, cmd=["echo", "hi"], timeout=5))
    assert (r.stdout, r.stderr, r.exit_code) == (b"echo hi", b"e", 2)
    assert [c["execute"] for c in guests.agent.calls][:2] == ["guest-ping", "guest-exec"]


def test_no_agent_is_failed_precondition_naming_it_after_only_a_ping(vm):
    b, sid, cid, guests = vm
    guests.agent.down = "Guest agent is not responding: QEMU guest agent is not connected"
    for call in (
        lambda: b.exec_sync(api.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=5)),
        lambda: b.exec(api.ExecRequest(container_id=cid, cmd=["sh"], stdin=True, stdout=True)),
        lambda: b.port_forward(api.PortForwardRequest(pod_sandbox_id=sid, port=[80])),
    ):
        code, msg = code_of(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "QEMU guest agent of this VM cannot be reached (" in msg and "not connected" in msg
        assert "qemu-guest-agent" in msg and "org.qemu.guest_agent.0" in msg
    assert {c["execute"] for c in guests.agent.calls} == {"guest-ping"}


def test_a_command_past_its_timeout_is_killed_and_deadline_exceeded(vm):
    b, _sid, cid, guests = vm
    guests.agent.program = lambda argv: FakeProc(argv, polls=None)
    code, msg = code_of(
        lambda: b.exec_sync(api.ExecSyncRequest(container_id=cid, cmd=["sleep", "9"], timeout=1))
    )
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "timeout 1s exceeded" in msg
    assert len(guests.agent.kills) == 1


def test_bad_requests_and_a_vm_that_does_not_run(vm):
    b, sid, cid, _guests = vm
    code, msg = code_of(lambda: b.exec_sync(api.ExecSyncRequest(container_id=cid, cmd=[], timeout=1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("cmd: empty")
    code, msg = code_of(lambda: b.exec(api.ExecRequest(container_id=cid, cmd=["ls"])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "none of stdin, stdout, stderr" in msg
    b.stop_container(api.StopContainerRequest(container_id=cid, timeout=0))
    for call in (
        lambda: b.exec_sync(api.ExecSyncRequest(container_id=cid, cmd=["true"])),
        lambda: b.exec(api.ExecRequest(container_id=cid, cmd=["true"], stdout=True)),
    ):
        code, msg = code_of(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "is not running (exited)" in msg
    code, msg = code_of(lambda: b.port_forward(api.PortForwardRequest(pod_sandbox_id=sid, port=[80])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "runs no VM" in msg
    code, _ = code_of(lambda: b.exec_sync(api.ExecSyncRequest(container_id="nope", cmd=["true"])))
    assert code == grpc.StatusCode.NOT_FOUND


def test_exec_streams_through_the_guest_and_unplugs_its_channels(vm):
    b, _sid, cid, guests = vm
    guests.leftover = ["io.edgevirt.deadbeef.out"]  # left by a killed shim: swept first
    url = b.exec(api.ExecRequest(container_id=cid, cmd=["cat"], stdin=True, stdout=True, stderr=True)).url
    c = Client(url)
    for t in ("error", "stdin", "stdout", "stderr"):
        c.create(t)
    assert [c.frame()[0] for _ in range(4)] == [spdy.SYN_REPLY] * 4
    c.send("stdin", b"through the guest", fin=True)
    frames = c.frames_until_closed()
    out = b"".join(d for k, sid, _, d in frames if k == 0 and sid == c.ids["stdout"])
    err = b"".join(d for k, sid, _, d in frames if k == 0 and sid == c.ids["error"])
    assert out == b"through the guest"
    assert json.loads(err)["details"]["causes"] == [{"reason": "ExitCode", "message": "5"}]
    assert guests.unplugged[0] == "io.edgevirt.deadbeef.out"
    assert sorted(guests.unplugged[1:]) == sorted(guests.plugged)  # all before the status was sent


def test_port_forward_reaches_the_guests_port_and_reports_a_refusal(vm):
    b, sid, _cid, guests = vm
    url = b.port_forward(api.PortForwardRequest(pod_sandbox_id=sid, port=[80])).url
    c = Client(url, protocols=("portforward.k8s.io",))
    assert c.status_line.startswith("HTTP/1.1 101")
    c.create("error", port="80", requestID="0")
    data = c.create("data", port="80", requestID="0")
    c.send_to(data, b"GET /")
    frames = []
    while sum(1 for k, s, fl, _ in frames if k == 0 and fl & spdy.FLAG_FIN) < 2:
        frames.append(c.frame())
    assert b"".join(d for k, s, _, d in frames if k == 0 and s == data).endswith(b"you asked: GET /")
    assert [c["arguments"]["arg"][-3:] for c in guests.agent.calls if c["execute"] == "guest-exec"] == [
        ["nc", "127.0.0.1", "80"]
    ]
    c.create("error", port="81", requestID="1")
    c.create("data", port="81", requestID="1")
    said = c.read_stream("error", b"refused")
    assert (
        said.startswith(b"error forwarding port 81 to pod ns/web: nc: can't connect") and b"refused" in said
    )
    c.close()
