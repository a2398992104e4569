"""The native thin client (deploy/cni/macvtap-client.c) against the Python package it must agree with.

It is compiled here exactly as install-plugin compiles it (with the header cni_macvtap.cheader renders)
and run against a stand-in daemon speaking cni_macvtap.wire: the default socket and limits come from
the one Python definition, only the top-level daemonSocket is used, and stdin is read to a bound.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_macvtap import cheader, cli, config, daemon, defaults, wire

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "deploy/cni/macvtap-client.c"
CC = shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler: install-plugin installs the Python client")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compiled client, whose Python fallback is this worktree's cni_macvtap."""
    tmp = tmp_path_factory.mktemp("native")
    launcher = tmp / "macvtap-python"
    site = sysconfig.get_paths()["purelib"]
    launcher.write_text(
        f"import sys\nsys.path[:0] = [{str(REPO)!r}]\nsys.path.append({site!r})\n"
        "from cni_macvtap.cli import main\nsys.exit(main())\n"
    )
    header = tmp / "defaults.h"
    header.write_text(cheader.render())
    binary = tmp / "macvtap"
    assert CC is not None
    subprocess.run(
        [CC, "-O2", "-Wall", "-Werror", "-o", str(binary), str(SOURCE), "-include", str(header),
         f'-DMACVTAP_PYTHON="{sys.executable}"', f'-DMACVTAP_LAUNCHER="{launcher}"'],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return binary


class FakeDaemon:
    """Answers every request on a socket with a canned reply and remembers the commands it got."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.got: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
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
                self.got.append(env.get("CNI_COMMAND", ""))
                wire.send_reply(conn, 0, b'{"from": "fake"}\n', "")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.sock.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[FakeDaemon, FakeDaemon]]:
    good, evil = FakeDaemon(str(tmp_path / "good.sock")), FakeDaemon(str(tmp_path / "evil.sock"))
    try:
        yield good, evil
    finally:
        good.close()
        evil.close()


def call(binary: Path, stdin: bytes, **env: str) -> subprocess.CompletedProcess[bytes]:
    e = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/run/netns/x",
         "CNI_PATH": "/usr/lib/cni", "PATH": "/usr/bin:/bin", **env}  # fmt: skip
    return subprocess.run([str(binary)], input=stdin, env=e, capture_output=True, timeout=120)


def test_the_default_socket_is_defined_once() -> None:
    assert cli.DEFAULT_SOCKET is defaults.DEFAULT_SOCKET
    assert (
        daemon.DEFAULT_SOCKET is defaults.DEFAULT_SOCKET and config.DEFAULT_SOCKET is defaults.DEFAULT_SOCKET
    )
    assert f"#define MACVTAP_DEFAULT_SOCKET {json.dumps(defaults.DEFAULT_SOCKET)}" in cheader.render()
    assert "/run/" not in SOURCE.read_text()  # the C source has no path of its own


def test_the_client_needs_the_generated_header(tmp_path: Path) -> None:
    assert CC is not None
    proc = subprocess.run(
        [CC, "-o", str(tmp_path / "x"), str(SOURCE), '-DMACVTAP_PYTHON="/x"', '-DMACVTAP_LAUNCHER="/y"'],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "cni_macvtap.cheader" in proc.stderr


def test_the_compiled_client_uses_the_python_default_socket(client: Path, tmp_path: Path) -> None:
    """Without daemonSocket the client calls defaults.DEFAULT_SOCKET: checked in a private mount
    namespace with its own /run, where a stand-in daemon listens on that path."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /run")
    script = tmp_path / "inside.py"
    script.write_text(
        f"import json, os, subprocess, sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from tests.unit.test_cni_native_client import FakeDaemon, call\n"
        "from cni_macvtap.defaults import DEFAULT_SOCKET\n"
        "os.makedirs(os.path.dirname(DEFAULT_SOCKET))\n"
        "fake = FakeDaemon(DEFAULT_SOCKET)\n"
        f"proc = call(__import__('pathlib').Path({str(client)!r}), b'{{\"cniVersion\": \"1.0.0\"}}')\n"
        "fake.close()\n"
        "print(json.dumps({'stdout': proc.stdout.decode(), 'got': fake.got}))\n"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs tmpfs /run && exec "{sys.executable}" "{script}"'],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["got"] == ["ADD"] and json.loads(seen["stdout"]) == {"from": "fake"}


def test_only_the_top_level_daemon_socket_is_used(
    client: Path, daemons: tuple[FakeDaemon, FakeDaemon]
) -> None:
    good, evil = daemons
    confs = [
        {"cniVersion": "1.0.0", "name": "n", "daemonSocket": good.path},
        {"runtimeConfig": {"daemonSocket": evil.path}, "daemonSocket": good.path, "name": "n"},
        {"note": f'"daemonSocket": "{evil.path}"', "daemonSocket": good.path},
        {"args": [{"daemonSocket": evil.path}], "daemonSocket": good.path, "ipam": {"x": "}{]["}},
    ]
    for conf in confs:
        stdin = json.dumps(conf).encode()
        assert cli.socket_path(stdin) == good.path  # the Python client agrees
        proc = call(client, stdin)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout) == {"from": "fake"}
    assert good.got == ["ADD"] * len(confs) and evil.got == []


def test_the_client_reads_a_bounded_stdin(client: Path) -> None:
    """A 64 MiB config: the client stops at its limit and the Python plugin answers code 5."""
    e = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/run/netns/x",
         "CNI_PATH": "/usr/lib/cni", "PATH": "/usr/bin:/bin"}  # fmt: skip
    proc = subprocess.Popen(
        [str(client)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=e
    )
    assert proc.stdin is not None and proc.stdout is not None
    chunk, written = b" " * (1 << 16), 0
    try:
        while written < 64 << 20:
            proc.stdin.write(chunk)
            written += len(chunk)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 1
    assert json.loads(out)["code"] == 5
    assert written < 8 << 20, f"the client read {written} bytes of stdin"


def test_an_environment_beyond_the_limit_is_not_sent(
    client: Path, daemons: tuple[FakeDaemon, FakeDaemon]
) -> None:
    """Above MAX_ENV the call runs in-process (both clients): the daemon never sees the request."""
    good, _ = daemons
    big = {f"PAD{i}": "x" * (100 << 10) for i in range(defaults.MAX_ENV // (100 << 10) + 1)}
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "n", "daemonSocket": good.path}).encode()
    proc = call(client, stdin, CNI_NETNS="/nonexistent", **big)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["code"] == 4  # answered in-process: the namespace does not exist
    assert good.got == []
