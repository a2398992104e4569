"""Guest-side proof: a QEMU (TCG) guest gets the macvtap through the tap device node's fd, configures
the address from the ADD result and answers ping from the peer namespace on the master's link."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cni_env import REPO, Topology, sh
from helpers.waiting import wait_for

pytestmark = pytest.mark.root
BOOT_DEADLINE_S = 300  # a readiness wait under TCG on a shared 2-core machine, not a speed assertion


def load_builder():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "build_guest", REPO / "deploy" / "images" / "build_guest.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_guest", mod)  # dataclasses look the module up while executing it
    spec.loader.exec_module(mod)
    return sys.modules["build_guest"]


def test_guest_answers_ping_through_the_tap_fd(topo: Topology, tmp_path: Path) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 not installed: apt-get install qemu-system-x86")
    if shutil.which("busybox") is None:
        pytest.skip("busybox not installed: apt-get install busybox-static")
    builder = load_builder()
    guest = builder.build_guest()
    netns = topo.new_pod()
    pod = os.path.basename(netns)
    conf = topo.conf("1.0.0")
    res = topo.plugin("ADD", conf, netns=netns)
    assert res.code == 0, res.stdout + res.stderr
    result = res.json()
    mac = result["interfaces"][0]["mac"]
    address = result["ips"][0]["address"]
    node = topo.device_dir / "c1" / "eth0"  # the documented path of this attachment's tap device
    console = tmp_path / "console.log"
    fd = os.open(node, os.O_RDWR)
    proc = None
    try:
        cmd = [
            "ip", "netns", "exec", pod, qemu,
            "-machine", "q35,accel=tcg", "-m", "256", "-nographic", "-nodefaults", "-no-reboot",
            "-serial", f"file:{console}",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", builder.kernel_cmdline(ip=address, gw=result["ips"][0]["gateway"], mac=mac),
            "-netdev", f"tap,id=n0,fd={fd}", "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, pass_fds=[fd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def console_text() -> str:
            return console.read_text(errors="replace") if console.exists() else ""

        def up() -> str | None:
            assert proc.poll() is None, f"QEMU exited: {proc.stdout.read().decode() if proc.stdout else ''}"
            text = console_text()
            return text if "EDGEVIRT-GUEST: up" in text else None

        text = wait_for("the guest to report up", up, BOOT_DEADLINE_S, 0.5, explain=console_text)
        assert f"EDGEVIRT-GUEST: ip eth0 {address} mac {mac}" in text, text
        assert "EDGEVIRT-GUEST: error" not in text, text
        ping = sh("ip", "netns", "exec", topo.peer, "busybox", "ping", "-c", "5", "-w", "60",
                  address.split("/")[0], check=False)  # fmt: skip
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert " 0 packets received" not in ping.stdout
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        os.close(fd)
    assert topo.plugin("DEL", conf, netns=netns).code == 0
    topo.assert_clean()
