"""The macvtap plugin and daemon against a hostile caller, in real namespaces.

A failure halfway (even a crash) leaves nothing behind once DEL ran; the plugin only ever deletes what
its own records say it made, in the namespace it made it in; CNI_NETNS must be a network namespace that
is not the plugin's own; files at the plugin's paths that are not its own are never replaced or
removed; and the daemon bounds what a client can make it hold (connections, time per request, fds).
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.cni_env import MASTER, Topology, links, sh, topology, tree

pytestmark = pytest.mark.root


@pytest.fixture(params=["daemon", "standalone"])
def topo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Topology]:
    with topology(tmp_path, daemon=request.param == "daemon") as t:
        t.use_daemon = request.param == "daemon"  # type: ignore[attr-defined]
        yield t


def run(t: Topology, *args, **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("daemon", getattr(t, "use_daemon", True))
    return t.plugin(*args, **kwargs)


def records(t: Topology) -> list[str]:
    return [p for p in tree(t.state_dir) if p.endswith(".json")]


def foreign_macvtap(t: Topology, pod: str, name: str) -> int:
    """A macvtap the plugin did not make, called name in pod; returns its ifindex there."""
    tmp = "fx" + secrets.token_hex(3)
    sh("ip", "-n", t.host, "link", "add", "link", MASTER, "name", tmp, "type", "macvtap", "mode", "bridge")
    sh("ip", "-n", t.host, "link", "set", tmp, "netns", pod)
    sh("ip", "-n", pod, "link", "set", tmp, "name", name)
    return int(links(pod)[name]["ifindex"])


@pytest.mark.parametrize(
    ("where", "code", "needle"),
    [("config", 7, "'mac'"), ("runtimeConfig", 7, "runtimeConfig 'mac'"), ("CNI_ARGS", 4, "CNI_ARGS MAC")],
)
def test_a_duplicate_mac_fails_up_and_rolls_back_everything(
    topo: Topology, where: str, code: int, needle: str
) -> None:
    """macvtap refuses to come up with a MAC another macvtap on the master has: after the rename."""
    mac = "02:00:00:00:4a:01"
    first_ns, second_ns = topo.new_pod(), topo.new_pod()
    conf = topo.conf(mac=mac)
    assert run(topo, "ADD", conf, netns=first_ns, container_id="first").code == 0
    second, args = topo.conf(), ""
    if where == "config":
        second["mac"] = mac
    elif where == "runtimeConfig":
        second["runtimeConfig"] = {"mac": mac}
    else:
        args = f"IgnoreUnknown=1;MAC={mac}"
    res = run(topo, "ADD", second, netns=second_ns, container_id="second", args=args)
    assert res.code == 1, res.stdout
    err = res.json()
    assert err["code"] == code and needle in err["msg"] and mac in err["msg"], err
    assert "Traceback" not in res.stdout + res.stderr
    assert set(links(os.path.basename(second_ns))) == {"lo"}
    assert len(topo.allocated_ips()) == 1
    assert tree(topo.device_dir) == ["first", "first/eth0"]
    assert records(topo) == [f"{conf['name']}/first/eth0.json"]
    assert run(topo, "DEL", conf, netns=first_ns, container_id="first").code == 0
    topo.assert_clean()


def test_a_crash_halfway_through_add_is_undone_by_del(topo: Topology) -> None:
    """The record is written before the link is made, so DEL finds what a killed ADD left."""
    bin_dir = topo.tmp / "crash-bin"
    bin_dir.mkdir()
    crash = bin_dir / "crash-ipam"
    # On ADD it SIGKILLs its parent (the plugin process, or the daemon worker serving the call).
    crash.write_text('#!/bin/sh\n[ "$CNI_COMMAND" = ADD ] && kill -9 $PPID\nexit 0\n')
    crash.chmod(0o755)
    netns = topo.new_pod()
    pod = os.path.basename(netns)
    conf = topo.conf(ipam={"type": "crash-ipam"})
    res = run(topo, "ADD", conf, netns=netns, cni_path=str(bin_dir))
    assert res.code != 0
    if topo.use_daemon:  # type: ignore[attr-defined]
        assert res.json()["code"] == 11  # the daemon worker died mid-request: try again
    assert [n for n, i in links(pod).items() if i.get("linkinfo", {}).get("info_kind") == "macvtap"]
    assert records(topo) != []
    res = run(topo, "DEL", conf, netns=netns, cni_path=str(bin_dir))
    assert res.code == 0, res.stdout + res.stderr
    assert set(links(pod)) == {"lo"}
    topo.assert_clean()


@pytest.mark.parametrize("kind", ["fifo", "file", "dir", "proc-self"])
def test_cni_netns_must_be_a_network_namespace(topo: Topology, kind: str) -> None:
    """Nothing else is opened for reading (a FIFO would block, a device node could act on open)."""
    path = topo.tmp / f"not-a-netns-{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "file":
        path.write_text("")
    elif kind == "dir":
        path.mkdir()
    else:
        path = Path("/proc/self/ns/mnt")  # a namespace, but not a network one
    for verb in ("ADD", "CHECK"):
        conf = topo.conf()
        if verb == "CHECK":
            conf["prevResult"] = {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": str(path)}],
            }
        res = run(topo, verb, conf, netns=str(path), timeout=60)
        assert res.code == 1 and res.json()["code"] == 4, res.stdout
        assert "CNI_NETNS" in res.json()["msg"] and "network namespace" in res.json()["msg"]
    topo.assert_clean()


def test_the_plugins_own_network_namespace_is_refused(topo: Topology) -> None:
    """The plugin runs in the topology's host namespace: that is no pod's."""
    before = links(topo.host)
    res = run(topo, "ADD", topo.conf(), netns=f"/run/netns/{topo.host}", ifname="evil0")
    assert res.code == 1 and res.json()["code"] == 4, res.stdout
    assert "CNI_NETNS" in res.json()["msg"] and "host" in res.json()["msg"]
    assert links(topo.host).keys() == before.keys()
    topo.assert_clean()


def test_init_network_namespace_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Init's namespace is refused too (where /proc/1 is readable; here a stand-in plays init)."""
    from cni_macvtap import namespaces, netns
    from cni_macvtap.errors import CNIError

    with topology(tmp_path) as t:
        monkeypatch.setattr(netns, "HOST_NAMESPACES", ("/proc/self/ns/net", f"/run/netns/{t.peer}"))
        with pytest.raises(CNIError) as exc:
            namespaces.open_pod(f"/run/netns/{t.peer}")
        assert exc.value.code == 4 and "host" in exc.value.msg
        with namespaces.open_pod(t.new_pod()) as pod:
            assert pod.identity not in netns.host_identities()


def test_del_without_a_record_leaves_a_foreign_macvtap_alone(topo: Topology) -> None:
    netns = topo.new_pod()
    pod = os.path.basename(netns)
    index = foreign_macvtap(topo, pod, "eth0")
    res = run(topo, "DEL", topo.conf(), netns=netns, container_id="never-added")
    assert res.code == 0, res.stdout + res.stderr
    assert links(pod)["eth0"]["ifindex"] == index
    sh("ip", "-n", pod, "link", "del", "eth0")
    topo.assert_clean()


def test_del_acts_only_in_the_recorded_network_namespace(topo: Topology) -> None:
    mine, other = topo.new_pod(), topo.new_pod()
    conf = topo.conf()
    assert run(topo, "ADD", conf, netns=mine).code == 0
    index = foreign_macvtap(topo, os.path.basename(other), "eth0")
    res = run(topo, "DEL", conf, netns=other)  # the wrong namespace: ours is removed, theirs is not
    assert res.code == 0, res.stdout + res.stderr
    assert links(os.path.basename(other))["eth0"]["ifindex"] == index
    assert set(links(os.path.basename(mine))) == {"lo"}
    sh("ip", "-n", os.path.basename(other), "link", "del", "eth0")
    topo.assert_clean()


def test_files_that_are_not_the_plugins_are_never_removed_or_replaced(topo: Topology) -> None:
    conf = topo.conf("1.1.0", ipam=None)
    victim_record = topo.state_dir / conf["name"] / "victim" / "x.json"
    victim_record.parent.mkdir(parents=True)
    victim_record.write_text('{"hello": "world"}')
    victim_node = topo.device_dir / "victim" / "x"
    victim_node.parent.mkdir(parents=True)
    victim_node.write_text("precious")
    device = topo.device_dir / "net" / "tun"  # as if deviceDir were /dev: a char device, but no tap
    device.parent.mkdir(parents=True)
    os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    gc = run(topo, "GC", conf, container_id="", ifname="")  # no valid attachments: everything "ours" goes
    assert gc.code == 0, gc.stdout + gc.stderr
    for cid, ifname in (("victim", "x"), ("net", "tun")):
        dele = run(topo, "DEL", conf, container_id=cid, ifname=ifname)
        assert dele.code == 0, dele.stdout + dele.stderr
    assert stat.S_ISCHR(os.lstat(device).st_mode)
    device.unlink()
    netns = topo.new_pod()
    add = run(topo, "ADD", conf, netns=netns, container_id="victim", ifname="x")
    assert add.code == 1 and "x.json" in add.json()["msg"], add.stdout
    assert victim_record.read_text() == '{"hello": "world"}' and victim_node.read_text() == "precious"
    # ADD never replaces a file at the device node's path: it fails (102) and rolls back.
    other_node = topo.device_dir / "other" / "eth0"
    other_node.parent.mkdir(parents=True)
    other_node.write_text("precious too")
    add = run(topo, "ADD", conf, netns=netns, container_id="other")
    assert add.code == 1 and add.json()["code"] == 102 and str(other_node) in add.json()["msg"], add.stdout
    assert other_node.read_text() == "precious too"
    assert set(links(os.path.basename(netns))) == {"lo"}
    assert records(topo) == [f"{conf['name']}/victim/x.json"]  # the victim's file only, no record of ours


def _worker_fds(t: Topology) -> int:
    assert t.daemon is not None
    pids = [t.daemon.pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == t.daemon.pid:
                        pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in pids)


def test_the_daemon_keeps_no_fd_per_state_dir(tmp_path: Path) -> None:
    """Each call locks its attachment in <stateDir>/.locks; no fd may stay open per stateDir seen."""
    with topology(tmp_path, daemon=True) as t:

        def delete(state_dir: Path, cid: str) -> None:
            state_dir.mkdir(exist_ok=True)
            res = t.plugin("DEL", t.conf(stateDir=str(state_dir), ipam=None), container_id=cid)
            assert res.code == 0, res.stdout + res.stderr

        for i in range(4):  # warm every worker
            delete(t.tmp / "warm", f"w{i}")
        before = _worker_fds(t)
        for i in range(24):
            delete(t.tmp / f"s{i}", "c1")
        assert _worker_fds(t) == before


def test_a_full_daemon_hands_calls_back(tmp_path: Path) -> None:
    with topology(tmp_path) as t:
        t.start_daemon("--workers", "1", "--max-connections", "2", "--request-timeout", "300")
        idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        try:
            for s in idle:
                s.connect(t.socket)
                s.sendall(b"MV")  # a request that does not complete (yet)
            # Both slots are taken: a real call is handed back and runs in-process, with the same answer.
            res = t.plugin("VERSION", t.conf(), daemon=True)
            assert res.code == 0 and "1.1.0" in res.json()["supportedVersions"]
        finally:
            for s in idle:
                s.close()
        assert "busy" in t.daemon_log(), t.daemon_log()
        assert t.daemon is not None and t.daemon.poll() is None


def test_a_trickling_client_is_cut_off_at_the_request_deadline(tmp_path: Path) -> None:
    with topology(tmp_path) as t:
        t.start_daemon("--workers", "1", "--request-timeout", "2")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(t.socket)
            cut = False
            for _ in range(120):  # one byte every half second: each read is quick, the request never ends
                try:
                    s.sendall(b"M")
                except OSError:
                    cut = True
                    break
                time.sleep(0.5)
            assert cut, "the daemon kept a trickling request open for a minute"
        assert "took longer than" in t.daemon_log(), t.daemon_log()
        res = t.plugin("VERSION", t.conf(), daemon=True)
        assert res.code == 0 and t.daemon is not None and t.daemon.poll() is None
