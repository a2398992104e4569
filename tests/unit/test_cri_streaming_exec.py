"""Exec and port-forward sessions of the shim's streaming server (cri_shim.exec_session,
cri_shim.portforward_session) with fake processes and forwards, driven by the minimal SPDY client
of spdy_client.py. The real clients (crictl exec/port-forward, kubectl through kubelet) against a
real guest: tests/e2e/test_cri_kvm_exec.py and tests/e2e/test_vm_verbs.py."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable

import pytest
from spdy_client import Client

from cri_shim import spdy
from cri_shim.stream_limits import StreamingLimits
from cri_shim.streaming import StreamingServer

pytestmark = pytest.mark.timeout(60)


class FakeProcess:
    """An exec session's process: stdout echoes stdin upper-cased (or says ``out``), stderr says
    ``err``; ends with ``code`` once its stdin closed (or at once without stdin)."""

    def __init__(self, code: int | str = 0, echo: bool = True) -> None:
        self.code, self.echo = code, echo
        self.out: queue.Queue[bytes] = queue.Queue()
        self.stdin_closed = threading.Event()
        self.closed = threading.Event()
        self.resizes: list[tuple[int, int]] = []
        self.stopped = False
        if not echo:
            self.out.put(b"out")
            self.close_stdin()

    def reader(self, stream: str) -> Callable[[], bytes] | None:
        if stream == "stdout":
            return self.out.get
        done = [False]

        def err() -> bytes:
            if done[0]:
                return b""
            done[0] = True
            return b"err"

        return err

    def write(self, data: bytes) -> None:
        self.out.put(data.upper())

    def close_stdin(self) -> None:
        self.stdin_closed.set()
        self.out.put(b"")

    def resize(self, rows: int, cols: int) -> None:
        self.resizes.append((rows, cols))

    def wait(self, stop: threading.Event) -> int | str | None:
        while not self.stdin_closed.wait(0.05):
            if stop.is_set():
                self.stopped = True
                return None
        return self.code

    def close(self) -> None:
        self.closed.set()
        self.out.put(b"")


@pytest.fixture
def server():
    s = StreamingServer(limits=StreamingLimits(stream_creation_timeout=2))
    yield s
    s.close()


def launcher(proc: FakeProcess, sizes: list[tuple[int, int]] | None = None):
    def launch(rows: int, cols: int) -> FakeProcess:
        if sizes is not None:
            sizes.append((rows, cols))
        return proc

    return launch


def open_exec(url: str, streams: tuple[str, ...], protocol: str = "v4.channel.k8s.io") -> Client:
    c = Client(url, protocols=(protocol,))
    assert c.status_line.startswith("HTTP/1.1 101"), c.status_line
    for t in streams:
        c.create(t)
    assert [c.frame()[0] for _ in streams] == [spdy.SYN_REPLY] * len(streams)
    return c


def by_stream(c: Client, frames: list) -> dict[str, bytes]:
    names = {sid: name for name, sid in c.ids.items()}
    out: dict[str, bytes] = {}
    for kind, sid, _, data in frames:
        if kind == 0 and sid in names:
            out[names[sid]] = out.get(names[sid], b"") + data
    return out


def test_exec_bridges_stdin_and_outputs_and_reports_the_exit_code(server):
    proc = FakeProcess(code=3)
    url = server.exec_url(launcher(proc), "vm", stdin=True, stdout=True, stderr=True, tty=False)
    assert "/exec/" in url
    c = open_exec(url, ("error", "stdin", "stdout", "stderr"))
    c.send("stdin", b"hello ")
    c.send("stdin", b"world", fin=True)  # FIN: the process's stdin ends
    got = by_stream(c, c.frames_until_closed())
    assert got["stdout"] == b"HELLO WORLD" and got["stderr"] == b"err"
    assert json.loads(got["error"]) == {
        "metadata": {},
        "status": "Failure",
        "message": "command terminated with non-zero exit code: exit status 3",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
    }
    assert proc.closed.wait(5) and proc.stdin_closed.is_set()


def test_exec_success_and_the_v3_protocol_writes_only_failures(server):
    ok = FakeProcess(code=0, echo=False)
    c = open_exec(
        server.exec_url(launcher(ok), "vm", stdin=False, stdout=True, stderr=False, tty=False),
        ("error", "stdout"),
    )
    got = by_stream(c, c.frames_until_closed())
    assert got["stdout"] == b"out" and json.loads(got["error"]) == {"metadata": {}, "status": "Success"}
    bad = FakeProcess(code=2, echo=False)
    url = server.exec_url(launcher(bad), "vm", stdin=False, stdout=True, stderr=False, tty=False)
    c = open_exec(url, ("error", "stdout"), protocol="v3.channel.k8s.io")
    assert (
        by_stream(c, c.frames_until_closed())["error"]
        == b"command terminated with non-zero exit code: exit status 2"
    )


def test_a_tty_starts_with_the_clients_first_size_and_follows_resizes(server):
    proc, sizes = FakeProcess(), []
    url = server.exec_url(launcher(proc, sizes), "vm", stdin=True, stdout=True, stderr=True, tty=True)
    c = open_exec(url, ("error", "stdin", "stdout", "resize"))  # a TTY has no stderr stream
    first = json.dumps({"Width": 100, "Height": 30}).encode()
    c.send("resize", first[:7])  # a message split across frames
    c.send("resize", first[7:] + json.dumps({"Width": 120, "Height": 40}).encode())
    c.send("resize", b'{"Width": 0, "Height": 5}{"bogus": true}')
    c.send("stdin", b"x", fin=True)
    got = by_stream(c, c.frames_until_closed())
    # started with a size the client sent (not 0x0), and the last one applied in the end
    assert sizes in ([(30, 100)], [(40, 120)])
    assert (sizes + proc.resizes)[-1] == (40, 120) and (0, 5) not in proc.resizes
    assert got["stdout"] == b"X" and json.loads(got["error"])["status"] == "Success"


def test_a_process_that_cannot_start_or_run_is_an_internal_error(server):
    def broken(rows: int, cols: int) -> FakeProcess:
        raise RuntimeError("the guest agent is gone")

    url = server.exec_url(broken, "vm", stdin=True, stdout=True, stderr=False, tty=False)
    c = open_exec(url, ("error", "stdin", "stdout"))
    c.send("stdin", b"lost")  # waits for a process that never comes: dropped
    status = json.loads(by_stream(c, c.frames_until_closed())["error"])
    assert (status["status"], status["code"], status["reason"]) == ("Failure", 500, "InternalError")
    assert status["message"] == "error executing command in container: the guest agent is gone"
    gone = FakeProcess(code="the session script failed in the guest", echo=False)
    c = open_exec(
        server.exec_url(launcher(gone), "vm", stdin=False, stdout=True, stderr=False, tty=False),
        ("error", "stdout"),
    )
    assert (
        "the session script failed" in json.loads(by_stream(c, c.frames_until_closed())["error"])["message"]
    )


def test_a_client_that_goes_away_ends_the_process(server):
    proc = FakeProcess()
    c = open_exec(
        server.exec_url(launcher(proc), "vm", stdin=True, stdout=True, stderr=False, tty=False),
        ("error", "stdin", "stdout"),
    )
    c.send("stdin", b"ping")
    assert c.read_stream("stdout", b"PING") == b"PING"
    c.close()
    assert proc.closed.wait(10)
    assert proc.stopped and not proc.stdin_closed.is_set()


def test_tokens_work_on_their_own_kind_of_url_only(server):
    url = server.exec_url(launcher(FakeProcess()), "vm", stdin=False, stdout=True, stderr=False, tty=False)
    wrong = Client(url.replace("/exec/", "/attach/"))
    assert wrong.status_line.startswith("HTTP/1.1 404") and "expired attach token" in wrong.body()
    again = Client(url)  # used up by the wrong try
    assert again.status_line.startswith("HTTP/1.1 404") and "expired exec token" in again.body()
    pf = server.portforward_url(lambda port: FakeForward(), "ns/pod")
    v4 = Client(pf)
    assert v4.status_line.startswith("HTTP/1.1 403") and "portforward.k8s.io" in v4.body()


# ---------------------------------------------------------------- port-forward
class FakeForward:
    """A forwarded connection: answers what it is sent upper-cased; ends with ``result`` once the
    client ended its side."""

    def __init__(self, result: str = "") -> None:
        self.result = result
        self.data: queue.Queue[bytes] = queue.Queue()
        self.write_closed = threading.Event()
        self.closed = threading.Event()

    def read(self) -> bytes:
        return self.data.get()

    def write(self, data: bytes) -> None:
        self.data.put(data.upper())

    def close_write(self) -> None:
        self.write_closed.set()
        self.data.put(b"")

    def wait(self, stop: threading.Event) -> str | None:
        while not self.write_closed.wait(0.05):
            if stop.is_set():
                return None
        return self.result

    def close(self) -> None:
        self.closed.set()
        self.data.put(b"")


def open_forward(url: str) -> Client:
    c = Client(url, protocols=("portforward.k8s.io",))
    assert c.status_line.startswith("HTTP/1.1 101"), c.status_line
    assert c.headers["x-stream-protocol-version"] == "portforward.k8s.io"
    return c


def pair(c: Client, port: str, request_id: str) -> tuple[int, int]:
    err = c.create("error", port=port, requestID=request_id)
    data = c.create("data", port=port, requestID=request_id)
    return err, data


def test_port_forward_copies_both_ways_per_request_and_closes_both_streams(server):
    dialed: list[int] = []
    forwards: list[FakeForward] = []

    def dial(port: int) -> FakeForward:
        dialed.append(port)
        forwards.append(FakeForward())
        return forwards[-1]

    c = open_forward(server.portforward_url(dial, "ns/pod"))
    err0, data0 = pair(c, "8080", "0")
    err1, data1 = pair(c, "9090", "1")
    c.send_to(data0, b"get /")
    c.send_to(data1, b"other", fin=True)
    c.send_to(data0, b" http", fin=True)
    frames = []
    while sum(1 for k, sid, fl, _ in frames if k == 0 and fl & spdy.FLAG_FIN) < 4:
        frames.append(c.frame())
    data = {
        sid: b"".join(d for k, s, _, d in frames if k == 0 and s == sid) for sid in (data0, data1, err0, err1)
    }
    assert sorted(dialed) == [8080, 9090]
    assert (data[data0], data[data1], data[err0], data[err1]) == (b"GET / HTTP", b"OTHER", b"", b"")
    assert all(f.closed.wait(5) for f in forwards)
    c.close()


def test_port_forward_errors_go_to_the_error_stream_and_reset_both(server):
    def dial(port: int) -> FakeForward:
        if port == 1:
            raise OSError("no listener")
        return FakeForward(result="nc: can't connect to remote host (127.0.0.1): Connection refused")

    c = open_forward(server.portforward_url(dial, "ns/pod"))
    for port, reason in (("1", "no listener"), ("2", "Connection refused")):
        err, data = pair(c, port, port)
        if port == "2":
            c.send_to(data, b"", fin=True)
        frames = []
        while sum(1 for k, sid, *_ in frames if k == spdy.RST_STREAM) < 2:
            frames.append(c.frame())
        said = b"".join(d for k, sid, _, d in frames if k == 0 and sid == err).decode()
        assert said.startswith(f"error forwarding port {port} to pod ns/pod: ") and reason in said
        assert {sid for k, sid, *_ in frames if k == spdy.RST_STREAM} == {err, data}
    c.close()


def test_bad_streams_are_refused_and_forwards_are_bounded(server):
    limited = StreamingServer(limits=StreamingLimits(max_forwards=1, stream_creation_timeout=0.5))
    try:
        c = open_forward(limited.portforward_url(lambda port: FakeForward(), "ns/pod"))
        for headers in ({"requestID": "9"}, {"port": "http", "requestID": "9"}, {"port": "70000"}):
            sid = c.create("data", **headers)
            assert c.frame()[:2] == (spdy.RST_STREAM, sid)
        sid = c.create("bogus", port="80")
        assert c.frame()[:2] == (spdy.RST_STREAM, sid)
        pair(c, "80", "a")
        assert [c.frame()[0] for _ in range(2)] == [spdy.SYN_REPLY, spdy.SYN_REPLY]
        over = c.create("error", port="81", requestID="b")
        assert c.frame()[:2] == (spdy.RST_STREAM, over)
        assert limited.limit_hits["max_forwards"] == 1
        lonely = c.create("error", port="82", requestID="c")  # a new request, still one too many
        assert c.frame()[:2] == (spdy.RST_STREAM, lonely)
        c.close()
        # a pair whose second stream never comes: an error after stream_creation_timeout
        c = open_forward(limited.portforward_url(lambda port: FakeForward(), "ns/pod"))
        err = c.create("error", port="80", requestID="x")
        assert c.frame()[:2] == (spdy.SYN_REPLY, err)
        assert b"timed out waiting for the data and error streams" in c.read_stream("error", b"timed out")
        c.close()
    finally:
        limited.close()
