"""Real CNI clients: deploy/cni/install-plugin into a bin dir, then cnitool add/check/del of a conflist."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from helpers.cni_env import REFERENCE_CNI, REPO, Topology, links, sh, tree

from cni_macvtap import wire

pytestmark = pytest.mark.root
CNITOOL = Path.home() / ".cache/edgevirt/go/cni-v1.3.0/cnitool"


def install(bin_dir: Path, native: bool = True) -> None:
    cmd = [str(REPO / "deploy/cni/install-plugin"), "--dest", str(bin_dir)] + (
        [] if native else ["--no-native"]
    )
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (bin_dir / "macvtap").is_file() and os.access(bin_dir / "macvtap", os.X_OK)
    assert os.path.realpath(bin_dir / "host-local") == os.path.realpath(f"{REFERENCE_CNI}/host-local")


@pytest.mark.parametrize("native", [True, False], ids=["native-client", "python-launcher"])
@pytest.mark.parametrize("with_daemon", [True, False], ids=["daemon", "no-daemon"])
def test_installed_plugin_works_from_the_bin_dir(topo: Topology, native: bool, with_daemon: bool) -> None:
    if native and shutil.which("cc") is None:
        pytest.skip(
            "no C compiler: install-plugin installs the Python launcher only (covered by the other case)"
        )
    bin_dir = topo.tmp / "opt-cni-bin"
    install(bin_dir, native)
    assert ((bin_dir / "macvtap").read_bytes()[:4] == b"\x7fELF") == native
    sock = topo.socket if with_daemon else str(topo.tmp / "nobody-listens.sock")
    conf = topo.conf(daemonSocket=sock, name=f"inst-{int(native)}-{int(with_daemon)}")
    netns = topo.new_pod()
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "inst", "CNI_IFNAME": "eth0", "CNI_NETNS": netns,
           "CNI_PATH": str(bin_dir), "PATH": "/usr/bin:/bin"}  # fmt: skip
    cmd = ["ip", "netns", "exec", topo.host, str(bin_dir / "macvtap")]
    add = subprocess.run(
        cmd, input=json.dumps(conf).encode(), env=env, capture_output=True, cwd="/", timeout=120
    )
    assert add.returncode == 0, add.stdout + add.stderr
    assert json.loads(add.stdout)["ips"][0]["address"].startswith(topo.prefix)
    dele = subprocess.run(
        cmd,
        input=json.dumps(conf).encode(),
        env={**env, "CNI_COMMAND": "DEL"},
        capture_output=True,
        timeout=120,
    )
    assert dele.returncode == 0, dele.stdout + dele.stderr
    assert ("ADD inst/eth0 ok" in topo.daemon_log()) == with_daemon
    assert topo.allocated_ips(conf["name"]) == []
    topo.assert_clean()


def test_cnitool_add_check_del_with_a_conflist(topo: Topology) -> None:
    if not CNITOOL.is_file():
        pytest.skip(f"cnitool not built at {CNITOOL}: run deploy/install/build-go-tools")
    bin_dir = topo.tmp / "bin"
    install(bin_dir)
    netconf = topo.tmp / "net.d"
    netconf.mkdir()
    plugin = topo.conf()
    plugin.pop("cniVersion")
    plugin.pop("name")
    name = f"cnitool-{topo.tag}"
    (netconf / "10-macvtap.conflist").write_text(
        json.dumps({"cniVersion": "1.1.0", "name": name, "plugins": [plugin]})
    )
    netns = topo.new_pod()
    env = {**os.environ, "NETCONFPATH": str(netconf), "CNI_PATH": str(bin_dir), "CNI_IFNAME": "eth0"}

    def cnitool(verb: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", topo.host, str(CNITOOL), verb, name, netns],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    try:
        add = cnitool("add")
        assert add.returncode == 0, add.stdout + add.stderr
        result = json.loads(add.stdout)
        assert result["cniVersion"] == "1.1.0"
        assert result["interfaces"][0]["name"] == "eth0" and result["interfaces"][0]["sandbox"] == netns
        assert result["ips"][0]["address"].startswith(topo.prefix)
        link = links(os.path.basename(netns))["eth0"]
        assert (
            link["linkinfo"]["info_kind"] == "macvtap" and link["address"] == result["interfaces"][0]["mac"]
        )
        [cid] = os.listdir(topo.device_dir)  # cnitool's container id
        assert cid.startswith("cnitool-") and tree(topo.device_dir / cid) == ["eth0"]
        check = cnitool("check")
        assert check.returncode == 0, check.stdout + check.stderr
        sh("ip", "-n", os.path.basename(netns), "link", "set", "eth0", "mtu", "1280")
        broken = cnitool("check")
        assert broken.returncode != 0 and "MTU" in broken.stdout + broken.stderr
        sh("ip", "-n", os.path.basename(netns), "link", "set", "eth0", "mtu", "1500")
    finally:
        dele = cnitool("del")
    assert dele.returncode == 0, dele.stdout + dele.stderr
    assert "ADD cnitool-" in topo.daemon_log()  # the conflist's daemonSocket was used
    topo.assert_clean()

    # STATUS and GC through libcni: cnitool's gc passes no valid attachments, so ours is collected.
    status = cnitool("status")
    assert status.returncode == 0, status.stdout + status.stderr
    try:
        assert cnitool("add").returncode == 0
        assert len(topo.allocated_ips(name)) == 1 and os.listdir(topo.device_dir)
        gc = cnitool("gc")
        assert gc.returncode == 0, gc.stdout + gc.stderr
        assert "GC /" in topo.daemon_log()
        assert topo.allocated_ips(name) == [] and tree(topo.device_dir) == []
        assert set(links(os.path.basename(netns))) == {"lo"}
    finally:
        dele = cnitool("del")
    assert dele.returncode == 0, dele.stdout + dele.stderr
    topo.assert_clean()


@pytest.mark.parametrize("native", [True, False], ids=["native-client", "python-launcher"])
def test_a_daemon_dying_mid_request_is_try_again(tmp_path: Path, native: bool) -> None:
    """The request reached the daemon, so the client cannot know how far it got: code 11, never a guess."""
    if native and shutil.which("cc") is None:
        pytest.skip("no C compiler: only the Python launcher is installed")
    bin_dir = tmp_path / "bin"
    install(bin_dir, native)
    path = str(tmp_path / "dying.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    server.settimeout(60)  # a client that never connects fails the test instead of hanging it
    got: list[str] = []

    def accept_read_and_die() -> None:
        conn, _ = server.accept()
        with conn:  # the whole request arrives; then the "daemon" dies without a reply
            got.append(wire.recv_request(conn)[1].get("CNI_COMMAND", ""))

    t = threading.Thread(target=accept_read_and_die)
    t.start()
    conf = {
        "cniVersion": "1.0.0",
        "name": "dying",
        "type": "macvtap",
        "master": "nosuchmaster0",
        "daemonSocket": path,
    }
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "d1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/nonexist",
           "CNI_PATH": str(bin_dir), "PATH": "/usr/bin:/bin"}  # fmt: skip
    proc = subprocess.run(
        [str(bin_dir / "macvtap")], input=json.dumps(conf).encode(), env=env, capture_output=True, timeout=120
    )
    t.join(timeout=60)
    server.close()
    assert got == ["ADD"]
    assert proc.returncode == 1
    err = json.loads(proc.stdout)
    assert err["code"] == 11 and "try again" in err["msg"], err
