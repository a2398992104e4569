"""Packets through the tap-fd NIC: a macvtap in a pod netns, handed to QEMU by the emulator wrapper.

Topology (all namespaces made here, 10.77.x only inside them, removed even after a failure):

    peer netns: p0 10.77.N.1/24 ==veth== host netns: vm0 (master) -- macvtap, moved to pod netns as eth0
                                                                       |  char device node (mknod from devt)
                                                                       '-> edgevirt-qemu wrapper -> QEMU fd

The guest (deploy/images/build_guest.py) takes 10.77.N.10/24 from its kernel command line; the
peer pings it. Then the NIC has to survive what a VM pod lives through: a guest reset (same QEMU
process, same fd), a stop/start (the wrapper opens the device again), and a libvirtd restart (on a
private libvirtd in its own mount namespace, so the node's daemon is never touched).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import libvirt
import pytest
from helpers.netns import Namespaces, lossless, ping, set_up, sh, veth, wait_lossless_ping
from helpers.root import require_root
from helpers.vm_env import console_size, leftovers, wait_console
from helpers.waiting import TimedOut, wait_for

from cri_shim.vm import KernelBoot, NicSpec, VMSpec

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


class Topology:
    """peer <-veth-> host(master) ; macvtap on the master moved into pod as eth0; tap node file."""

    def __init__(self, node_dir: Path) -> None:
        tag = secrets.token_hex(3)
        self.host, self.peer, self.pod = f"evh-{tag}", f"evp-{tag}", f"evpod-{tag}"
        self.subnet = 100 + int(tag, 16) % 100
        self.peer_ip = f"10.77.{self.subnet}.1"
        self.guest_ip = f"10.77.{self.subnet}.10"
        self.mac = "02:ee:" + ":".join(tag[i : i + 2] for i in (0, 2, 4)) + ":10"
        self.node = node_dir / "eth0"
        self.namespaces = Namespaces()

    def up(self) -> None:
        for ns in (self.host, self.peer, self.pod):
            self.namespaces.add(ns)
        veth(self.host, "vm0", self.peer, "p0")
        sh("ip", "-n", self.peer, "addr", "add", f"{self.peer_ip}/24", "dev", "p0")
        set_up(self.peer, "p0")
        set_up(self.host, "vm0")
        sh("ip", "-n", self.host, "link", "add", "link", "vm0", "name", "mvt0", "address", self.mac,
           "type", "macvtap", "mode", "bridge")  # fmt: skip
        # the devt, read from sysfs inside the host netns (ip netns exec mounts that netns's sysfs)
        idx = sh("ip", "netns", "exec", self.host, "cat", "/sys/class/net/mvt0/ifindex").stdout.strip()
        devt = sh("ip", "netns", "exec", self.host, "cat", f"/sys/class/net/mvt0/macvtap/tap{idx}/dev").stdout
        major, minor = (int(x) for x in devt.strip().split(":"))
        sh("ip", "-n", self.host, "link", "set", "mvt0", "netns", self.pod)
        sh("ip", "-n", self.pod, "link", "set", "mvt0", "name", "eth0")
        set_up(self.pod, "eth0")
        self.node.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(self.node, 0o600 | 0o020000, os.makedev(major, minor))

    def ping(self, count: int = 5) -> str:
        return ping(self.peer, self.guest_ip, count)

    def wait_ping(self, timeout: float = 60.0) -> None:
        """Until one ping gets through (ARP + guest coming up), then demand 0% loss on 5."""
        # no first ping within the timeout: the 5 below fail, showing their output
        with contextlib.suppress(TimedOut):
            wait_for(f"a first ping of {self.guest_ip}", lambda: lossless(self.ping(1)), timeout, 0.5)
        out = self.ping(5)
        assert lossless(out), out

    def down(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.node.unlink()
        self.namespaces.close()


@pytest.fixture
def topo(tmp_path):
    require_root("creates network namespaces, veth and macvtap links")
    t = Topology(tmp_path / "tap")
    try:
        t.up()
        yield t
    finally:
        t.down()
        names = sh("ip", "netns", "list").stdout
        assert t.host not in names and t.peer not in names and t.pod not in names


def boot_with_nic(mgr, name, guest, topo, console) -> None:
    cmdline = f"console=ttyS0 panic=-1 quiet edgevirt.ip={topo.guest_ip}/24 edgevirt.mac={topo.mac}"
    spec = VMSpec(
        name=name,
        uid=f"uid-{name}",
        kernel_boot=KernelBoot(kernel=guest.kernel, initrd=guest.initrd, cmdline=cmdline),
        nics=[NicSpec(mac=topo.mac, tap_device=topo.node)],
        console_log=console,
        disk_scope="pod",
    )
    mgr.create(spec)


def test_tap_fd_nic_pings_and_survives_reset_and_stop_start(vm_env, test_guest, topo, tmp_path):
    mgr = vm_env.manager
    name = vm_env.name("net")
    console = tmp_path / "console.log"
    boot_with_nic(mgr, name, test_guest, topo, console)
    text = wait_console(console, "EDGEVIRT-GUEST: up")
    assert f"EDGEVIRT-GUEST: ip eth0 {topo.guest_ip}/24 mac {topo.mac}" in text, text[-800:]
    topo.wait_ping()

    # the NIC is part of the definition libvirt keeps (not a monitor-side add-on)
    xml = mgr.xml(name, inactive=True)
    assert "EDGEVIRT_TAP_0" in xml and str(topo.node) in xml and "@EDGEVIRT_TAP_0_FD@" in xml

    # the manager's libvirt connection dies (as after a libvirtd restart): it reconnects by itself
    mgr._conn.close()
    assert mgr.state(name).phase == "running"

    # guest reset: same QEMU process, same fd
    mark = console_size(console)
    conn = libvirt.open("qemu:///system")
    try:
        conn.lookupByName(name).reset()
    finally:
        conn.close()
    wait_console(console, "EDGEVIRT-GUEST: up", after=mark)
    topo.wait_ping()

    # stop / start: the wrapper opens the device node again
    mgr.destroy(name)
    assert " 0% packet loss" not in topo.ping(1)
    mark = console_size(console)
    mgr.start(name)
    wait_console(console, "EDGEVIRT-GUEST: up", after=mark)
    topo.wait_ping()

    assert mgr.shutdown(name, timeout=30) == "shutdown"
    assert mgr.remove(name) is True
    assert leftovers(vm_env) == {"domains": [], "files": []}


def test_macvtap_cni_result_to_running_vm(vm_env, test_guest, tmp_path):
    """The VM pod's network path without kubelet: the real macvtap plugin's ADD result becomes the
    VM's NIC (MAC + tap device node) and its IP; the peer pings the guest; DEL after remove."""
    from helpers.cni_env import topology

    from cri_shim.vm import nics_from_cni_result

    mgr = vm_env.manager
    name = vm_env.name("cni")
    with topology(tmp_path / "cni", daemon=False) as topo:
        netns = topo.new_pod()
        conf = topo.conf("1.0.0")
        res = topo.plugin("ADD", conf, container_id="vmpod1", netns=netns, daemon=False)
        assert res.code == 0, res.stdout + res.stderr
        result = res.json()
        nics = nics_from_cni_result(result, "vmpod1", device_dir=topo.device_dir)
        ip = result["ips"][0]
        cmdline = f"console=ttyS0 panic=-1 quiet edgevirt.ip={ip['address']} edgevirt.gw={ip['gateway']}"
        console = tmp_path / "console.log"
        spec = VMSpec(
            name=name,
            uid="uid-cni",
            kernel_boot=KernelBoot(kernel=test_guest.kernel, initrd=test_guest.initrd, cmdline=cmdline),
            nics=nics,
            cni_result=result,  # also renders the NoCloud network-config onto a seed ISO
            console_log=console,
            disk_scope="pod",
        )
        mgr.create(spec)
        try:
            text = wait_console(console, "EDGEVIRT-GUEST: up")
            assert f"EDGEVIRT-GUEST: ip eth0 {ip['address']} mac {nics[0].mac}" in text, text[-800:]
            wait_lossless_ping(topo.peer, ip["address"].split("/")[0], 60)
        finally:
            mgr.remove(name)
        res = topo.plugin("DEL", conf, container_id="vmpod1", netns=netns, daemon=False)
        assert res.code == 0, res.stdout + res.stderr
        assert not nics[0].tap_device.exists()
    assert leftovers(vm_env) == {"domains": [], "files": []}


def test_tap_fd_nic_survives_libvirtd_restart(test_guest, topo, tmp_path):
    """libvirtd restarts under a running VM: it reconnects to QEMU, the NIC (an fd QEMU holds) keeps
    working, and the manager reconnects by itself. Runs on a private libvirtd (own mount namespace)
    so the node's daemon, which may belong to someone else, is never restarted."""
    import secrets

    from helpers.libvirt_daemon import PrivateLibvirtd

    from cri_shim.vm import DomainManager

    daemon = PrivateLibvirtd(tmp_path / "private-libvirtd").start()
    mgr = None
    try:
        state = tmp_path / "state"
        mgr = DomainManager(state, uri=daemon.uri, domain_type="qemu", wrapper_dir=state / "bin")
        name = f"evtest-{secrets.token_hex(3)}-lvrestart"
        console = tmp_path / "console.log"
        boot_with_nic(mgr, name, test_guest, topo, console)
        wait_console(console, "EDGEVIRT-GUEST: up")
        topo.wait_ping()
        old_pid = daemon.pid()
        daemon.restart_libvirtd()
        assert daemon.pid() != old_pid
        assert mgr.state(name).phase == "running"  # the manager reconnects by itself
        topo.wait_ping()
        assert mgr.shutdown(name, timeout=30) == "shutdown"
        assert mgr.remove(name) is True
        assert not (state / "domains").exists() or list((state / "domains").iterdir()) == []
    finally:
        if mgr is not None:
            mgr.close()
        daemon.stop()
