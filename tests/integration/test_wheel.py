"""The edgevirt wheel on its own: built (cached) by deploy/images/edgevirt_wheel.py, installed into a
fresh virtualenv outside the checkout, and every entry point run from /tmp with no PYTHONPATH and no
Go or grpcio-tools anywhere: edgevirt-cri serves the CRI Version RPC, the others answer --help or
VERSION; nothing is written into the venv's site-packages meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WHEEL_BUILDER = REPO / "deploy" / "images" / "edgevirt_wheel.py"
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # no Go toolchain, no repo venv
VERSION_CLIENT = """
import sys, grpc
from cri_shim._generated import api_pb2, api_pb2_grpc
with grpc.insecure_channel("unix://" + sys.argv[1]) as ch:
    r = api_pb2_grpc.RuntimeServiceStub(ch).Version(api_pb2.VersionRequest(version="v1"), timeout=30)
print(r.runtime_name, r.runtime_version, r.runtime_api_version)
"""


def _run_builder(*args: str) -> Path:
    r = subprocess.run(
        [sys.executable, str(WHEEL_BUILDER), *args], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.strip())


@pytest.fixture(scope="module")
def wheel() -> Path:
    return _run_builder()


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (outside the checkout) with the wheel and its dependencies from PyPI."""
    d = tmp_path_factory.mktemp("edgevirt-wheel") / "venv"
    assert not d.is_relative_to(REPO)
    subprocess.run([sys.executable, "-m", "venv", str(d)], check=True, timeout=120)
    r = subprocess.run(
        [d / "bin/pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd="/tmp",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def _site_packages(venv: Path) -> Path:
    (site,) = venv.glob("lib/python3.*/site-packages")
    return site


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def _env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    return {**keep, "PATH": CLEAN_PATH}


def _run(venv: Path, *argv: str, stdin: str = "", env: dict[str, str] | None = None):
    exe = str(venv / "bin" / argv[0]) if (venv / "bin" / argv[0]).exists() else argv[0]
    return subprocess.run(
        [exe, *argv[1:]],
        input=stdin,
        capture_output=True,
        text=True,
        cwd="/tmp",
        env=env or _env(),
        timeout=120,
    )


@pytest.fixture(scope="module")
def untouched(venv: Path) -> Iterator[None]:
    """Asserts, after the module's runs, that nothing in site-packages was added or changed."""
    site = _site_packages(venv)
    before = _snapshot(site)
    yield
    after = _snapshot(site)
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not added and not changed, f"written into {site}: added {added[:10]}, changed {changed[:10]}"


@pytest.mark.timeout(1200)
def test_wheel_holds_generated_typed_stubs_and_builds_reproducibly(wheel: Path, tmp_path: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in ("api_pb2.py", "api_pb2_grpc.py", "api_pb2.pyi", "api_pb2_grpc.pyi", "CRI_API_VERSION"):
        assert f"cri_shim/_generated/{stub}" in names
    assert not any(n.endswith(".proto") for n in names), "the upstream proto must not ship"
    again = _run_builder("--no-cache", "--cache-dir", str(tmp_path))
    assert again != wheel
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(wheel.read_bytes()).digest()


@pytest.mark.timeout(1200)
def test_installed_wheel_needs_no_generator(venv: Path, untouched: None) -> None:
    r = _run(venv, "python", "-c", "import grpc_tools")
    assert r.returncode != 0 and "No module named 'grpc_tools'" in r.stderr
    code = "from cri_shim import protos; print(protos.in_checkout(), protos.api().__file__)"
    r = _run(venv, "python", "-c", code)
    assert r.returncode == 0, r.stderr
    in_checkout, path = r.stdout.split()
    assert in_checkout == "False" and Path(path).is_relative_to(_site_packages(venv))


@pytest.mark.timeout(300)
def test_edgevirt_cri_serves_version(venv: Path, wheel: Path, tmp_path: Path, untouched: None) -> None:
    sock = tmp_path / "cri.sock"
    cfg = tmp_path / "cri.yaml"
    backend = {"type": "containerd", "socket": str(tmp_path / "no-containerd.sock")}
    cfg.write_text(
        json.dumps(
            {
                "socket": str(sock),
                "state_dir": str(tmp_path / "state"),
                "backends": {"containerd": backend},
                "handlers": {"": "containerd"},
            }
        )
    )
    log = (tmp_path / "cri.log").open("w")
    proc = subprocess.Popen(
        [venv / "bin/edgevirt-cri", "--config", str(cfg)], cwd="/tmp", env=_env(), stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sock.exists(), f"no socket; exit {proc.poll()}: {(tmp_path / 'cri.log').read_text()}"
        r = _run(venv, "python", "-c", VERSION_CLIENT, str(sock))
        assert r.returncode == 0, r.stderr
        version = wheel.name.split("-")[1]
        assert r.stdout.split() == ["edgevirt", version, "v1"]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        log.close()
    assert rc == 0, (tmp_path / "cri.log").read_text()
    assert not sock.exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["edgevirt-controller", "--help"], "usage: edgevirt-controller"),
        (["kubectl-vm", "--help"], "usage: kubectl vm"),
        (["edgevirt-cri", "--help"], "usage: edgevirt-cri"),
        (["python", "-m", "runtimeclass.probe", "--help"], "usage: python -m runtimeclass.probe"),
    ],
)
def test_entry_point_help(venv: Path, argv: list[str], expect: str, untouched: None) -> None:
    r = _run(venv, *argv)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(expect)


@pytest.mark.timeout(300)
def test_macvtap_version(venv: Path, untouched: None) -> None:
    r = _run(venv, "macvtap", stdin='{"cniVersion": "1.0.0"}', env={**_env(), "CNI_COMMAND": "VERSION"})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert "1.0.0" in doc["supportedVersions"] and doc["cniVersion"]
