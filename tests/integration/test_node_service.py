"""edgevirt-node end to end under a temporary --root: the units and drop-ins pass `systemd-analyze
verify`, the unit's own ExecStart line runs edgevirt-cri (containerd-only config, in front of a fake
containerd of the test's own), which sends READY=1 to the test's NOTIFY_SOCKET, answers /readyz and
/metrics with the CRI calls it served, sends STOPPING=1 on SIGTERM - and uninstall leaves the root
exactly as it was.

Nothing here touches the node's own /etc, containerd, libvirtd or kubelet: every path is under the
test's temporary directory, and "containerd" is an in-process CRI server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import REPO, processes
from helpers.root import require_tools
from helpers.waiting import wait_for

from cri_shim import protos
from cri_shim._generated import api_pb2_grpc
from cri_shim.backends.base import Backend
from cri_shim.errors import unimplemented
from cri_shim.node import cli
from cri_shim.node.units import exec_start
from cri_shim.router import Router
from cri_shim.server import serve
from cri_shim.state import IdIndex

pytestmark = pytest.mark.timeout(300)
api = protos.api()


class NothingBackend(Backend):
    """The fake containerd's only backend: it has nothing (List* answer UNIMPLEMENTED upstream)."""

    name = "nothing"

    def invoke(self, method: str, request: bytes, timeout: float | None = None) -> bytes:
        raise unimplemented(f"the test's fake containerd does not implement {method}")


@pytest.fixture
def fake_containerd(tmp_path: Path) -> Iterator[Path]:
    """A CRI endpoint on a unix socket that answers Version (edgevirt-cri's own server, in process)."""
    sock = tmp_path / "live" / "containerd.sock"
    router = Router({"nothing": NothingBackend()}, {"": "nothing"}, IdIndex(tmp_path / "fake-state"))
    server = serve(router, str(sock), 0o660, workers=4)
    try:
        yield sock
    finally:
        server.stop(grace=None).wait(30)
        router.close()


def snapshot(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        kind = "link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "file"
        content = os.readlink(path) if kind == "link" else path.read_bytes() if kind == "file" else b""
        out[str(path.relative_to(root))] = (kind, stat.S_IMODE(st.st_mode), content)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def verify(*units: Path) -> None:
    """systemd-analyze verify, and no complaint about our files (it exits 0 on unknown keys)."""
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    ours = [line for line in (r.stdout + r.stderr).splitlines() if any(u.name in line for u in units)]
    assert r.returncode == 0 and ours == [], r.stdout + r.stderr


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_install_verify_run_the_unit_and_uninstall(tmp_path: Path, fake_containerd: Path) -> None:
    require_tools("systemd-analyze", hint="apt-get install systemd")
    root, live = tmp_path / "root", tmp_path / "live"
    root.mkdir()
    before = snapshot(root)
    port = free_port()
    argv = [
        "install",
        f"--root={root}",
        "--no-kvm",
        f"--containerd-socket={fake_containerd}",
        f"--socket={live / 'cri.sock'}",
        f"--state-dir={live / 'state'}",
        f"--ops-address=127.0.0.1:{port}",
        "--json",
    ]
    out = subprocess.run(
        [str(REPO / ".venv/bin/python"), "-m", "cri_shim.node.cli", *argv],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    outcome = json.loads(out.stdout)
    unit_dir = root / "etc/systemd/system"
    verify(unit_dir / "edgevirt-cri.service", unit_dir / "edgevirt-macvtap.service")
    kubelet_dir = tmp_path / "verify-kubelet"  # a stand-in kubelet.service with our drop-in
    (kubelet_dir / "kubelet.service.d").mkdir(parents=True)
    (kubelet_dir / "kubelet.service").write_text(
        "[Unit]\nDescription=kubelet\n[Service]\nExecStart=/bin/true\n"
    )
    shutil.copy(unit_dir / "kubelet.service.d/50-edgevirt.conf", kubelet_dir / "kubelet.service.d")
    verify(kubelet_dir / "kubelet.service")

    command = exec_start((unit_dir / "edgevirt-cri.service").read_text())
    assert command == outcome["info"]["units"]["edgevirt-cri.service"]["exec_start"]
    # The unit names the config as the node sees it; here the node's / is the test's root.
    command = [
        f"--config={root}{a.removeprefix('--config=')}" if a.startswith("--config=") else a for a in command
    ]
    served = run_the_unit(command, tmp_path, live, port)
    assert served

    assert cli.main(["uninstall", f"--root={root}"]) == 0
    assert snapshot(root) == before


def run_the_unit(command: list[str], tmp_path: Path, live: Path, port: int) -> bool:
    notify = tmp_path / "notify.sock"
    log = tmp_path / "edgevirt-cri.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener, log.open("w") as log_file:
        listener.bind(str(notify))
        listener.settimeout(120)  # bounds a hang; READY=1 comes once it serves
        proc = subprocess.Popen(
            command,
            env={**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(notify)},
            cwd="/",
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            assert listener.recv(64) == b"READY=1", log.read_text()
            base = f"http://127.0.0.1:{port}"
            assert get(base + "/healthz") == (200, "ok\n")
            assert wait_for("/readyz", lambda: get(base + "/readyz") == (200, "ok\n"), 60, 0.2)
            with grpc.insecure_channel(f"unix://{live / 'cri.sock'}") as channel:
                stub = api_pb2_grpc.RuntimeServiceStub(channel)
                assert stub.Version(api.VersionRequest(), timeout=30).runtime_name == "edgevirt"
                with pytest.raises(grpc.RpcError) as e:
                    stub.ListPodSandbox(api.ListPodSandboxRequest(), timeout=30)
                assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            status, text = get(base + "/metrics")
            assert status == 200
            assert metric(text, 'edgevirt_cri_request_duration_seconds_count{method="Version"}') == 1
            assert (
                metric(
                    text, 'edgevirt_cri_request_errors_total{code="UNIMPLEMENTED",method="ListPodSandbox"}'
                )
                == 1
            )
            # The backend also served the shim's own start-up prune (a List of its own): at least ours.
            backend = 'backend="containerd",method="ListPodSandbox"'
            calls = metric(text, "edgevirt_cri_backend_request_duration_seconds_count{" + backend + "}")
            failed = metric(
                text,
                'edgevirt_cri_backend_request_errors_total{backend="containerd",code="UNIMPLEMENTED",'
                'method="ListPodSandbox"}',
            )
            assert calls is not None and calls >= 1 and failed == calls
            assert metric(text, 'edgevirt_cri_handler_available{backend="containerd",handler="runc"}') == 1
            assert metric(text, "process_open_fds") is not None
            proc.send_signal(signal.SIGTERM)
            assert listener.recv(64) == b"STOPPING=1"
            assert proc.wait(60) == 0, log.read_text()
        finally:
            processes.stop(proc)
    lines = [json.loads(line) for line in log.read_text().splitlines()]  # --log-format=json from the unit
    assert any(line["message"].startswith("serving CRI runtime.v1") for line in lines)
    assert not (live / "cri.sock").exists()
    return True
