"""The daemon-only static macvtap client: the copy the edgevirt-node DaemonSet puts on the host.

Compiled here exactly as the image build compiles it (deploy/images/macvtap_static.py: static, with
the header cni_macvtap.cheader renders) and run with no daemon (CNI error 11 naming the socket, so
the runtime retries), against a stand-in daemon (the call and its answer pass through unchanged),
and with what the Python plugin would have had to run in-process (answered with the plugin's codes).
It never execs anything: it has no interpreter and names no path of the image.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_macvtap import defaults, wire

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy/images"))
import macvtap_static  # noqa: E402

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (the image build needs one)"),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return macvtap_static.build(REPO, tmp_path_factory.mktemp("static"))


class StandIn:
    """A daemon stand-in: answers each request with ``code`` and a canned stdout, remembers the env."""

    def __init__(self, path: Path, code: int = 0) -> None:
        self.path, self.code = path, code
        self.got: list[dict[str, str]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(30)
                _, env, _stdin = wire.recv_request(conn)
                self.got.append(env)
                wire.send_reply(conn, self.code, b'{"from": "daemon"}\n' if self.code >= 0 else b"", "")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sock.close()


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[StandIn]:
    s = StandIn(tmp_path / "d.sock")
    try:
        yield s
    finally:
        s.close()


def call(binary: Path, conf: dict | bytes, **env: str) -> subprocess.CompletedProcess[bytes]:
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    e = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/run/netns/x",
         "CNI_PATH": "/opt/cni/bin", **env}  # fmt: skip
    return subprocess.run([str(binary)], input=stdin, env=e, capture_output=True, timeout=120)


def program_header_types(binary: Path) -> set[int]:
    """The p_type of every ELF64 program header (PT_INTERP = 3: the binary needs a dynamic loader)."""
    data = binary.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not an ELF64 file"
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 32)[0], *struct.unpack_from("<HH", data, 54)
    return {struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)}


def test_it_is_static_and_names_no_path_of_the_image(client: Path) -> None:
    assert 3 not in program_header_types(client)  # no PT_INTERP: runs on any x86_64 Linux host
    data = client.read_bytes()
    assert b"python" not in data.lower() and b"/usr/local" not in data
    assert defaults.DEFAULT_SOCKET.encode() in data  # the one default, from cni_macvtap.defaults


def test_no_daemon_asks_the_runtime_to_try_again_naming_the_socket(client: Path, tmp_path: Path) -> None:
    sock = tmp_path / "absent.sock"
    proc = call(client, {"cniVersion": "1.0.0", "name": "n", "type": "macvtap", "daemonSocket": str(sock)})
    assert proc.returncode == 1
    err = json.loads(proc.stdout)
    assert err["code"] == 11 and "try again later" in err["msg"]
    assert err["details"].startswith(f"{sock}: ") and "No such file" in err["details"]


def test_a_socket_nobody_listens_on_is_code_11_too(client: Path, tmp_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()  # bound, never listening: connect is refused
    proc = call(client, {"cniVersion": "1.0.0", "daemonSocket": str(tmp_path / "dead.sock")})
    assert json.loads(proc.stdout)["code"] == 11 and "refused" in json.loads(proc.stdout)["details"]


def test_a_reachable_daemon_gets_the_call_and_its_answer(client: Path, standin: StandIn) -> None:
    proc = call(client, {"cniVersion": "1.0.0", "name": "n", "daemonSocket": str(standin.path)})
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"from": "daemon"}
    assert [e["CNI_COMMAND"] for e in standin.got] == ["ADD"] and standin.got[0]["CNI_IFNAME"] == "eth0"


def test_a_call_the_daemon_hands_back_is_code_11(client: Path, tmp_path: Path) -> None:
    busy = StandIn(tmp_path / "busy.sock", code=wire.FALLBACK)
    try:
        proc = call(client, {"cniVersion": "1.0.0", "daemonSocket": str(busy.path)})
    finally:
        busy.close()
    err = json.loads(proc.stdout)
    assert proc.returncode == 1 and err["code"] == 11 and "handed the call back" in err["details"]


def test_what_needs_the_python_plugin_is_refused_with_its_codes(client: Path, standin: StandIn) -> None:
    conf = {"cniVersion": "1.0.0", "daemonSocket": str(standin.path)}
    no_daemon = call(client, conf, MACVTAP_NO_DAEMON="1")
    err = json.loads(no_daemon.stdout)
    assert err["code"] == 4 and "MACVTAP_NO_DAEMON" in err["msg"]
    too_large = call(client, b" " * (defaults.MAX_STDIN + 1))
    assert json.loads(too_large.stdout)["code"] == 5
    big_env = {f"PAD{i}": "x" * (100 << 10) for i in range(defaults.MAX_ENV // (100 << 10) + 1)}
    assert json.loads(call(client, conf, **big_env).stdout)["code"] == 4
    assert standin.got == []  # none of them reached the daemon


def test_arguments_print_usage_and_exec_nothing(client: Path) -> None:
    for argv, rc in (([str(client), "daemon"], 2), ([str(client), "--help"], 0)):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == rc and "daemon-only build" in proc.stderr and proc.stdout == ""


def test_builds_are_content_addressed_and_reproducible(client: Path, tmp_path: Path) -> None:
    again = macvtap_static.build(REPO, tmp_path)
    assert again.name == client.name and again.read_bytes() == client.read_bytes()
