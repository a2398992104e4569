"""Integration tests of the macvtap CNI plugin in real namespaces with real links and host-local IPAM.

Every core behaviour runs twice: through `macvtap daemon` and standalone (no daemon answering).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers.cni_env import MASTER, REPO, Topology, links, sh, topology, tree
from helpers.processes import children
from helpers.waiting import wait_for

pytestmark = pytest.mark.root


@pytest.fixture(params=["daemon", "standalone"])
def topo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Topology]:
    with topology(tmp_path, daemon=request.param == "daemon") as t:
        t.use_daemon = request.param == "daemon"  # type: ignore[attr-defined]
        yield t


@pytest.fixture
def dtopo(tmp_path: Path) -> Iterator[Topology]:
    """Daemon-only topology for the checks that do not depend on the execution mode."""
    with topology(tmp_path, daemon=True) as t:
        t.use_daemon = True  # type: ignore[attr-defined]
        yield t


def run(t: Topology, *args, **kwargs):  # type: ignore[no-untyped-def]
    kwargs.setdefault("daemon", t.use_daemon)  # type: ignore[attr-defined]
    return t.plugin(*args, **kwargs)


def with_prev(conf: dict, result: dict) -> dict:
    out = copy.deepcopy(conf)
    out["prevResult"] = result
    return out


def tap_devt_in_pod(pod: str, ifname: str) -> tuple[int, int]:
    """The devt as the pod's own sysfs reports it (ip netns exec remounts /sys for that netns)."""
    out = sh("ip", "netns", "exec", pod, "sh", "-c", f"cat /sys/class/net/{ifname}/macvtap/tap*/dev").stdout
    major, minor = out.strip().split(":")
    return int(major), int(minor)


@pytest.mark.parametrize("version", ["1.1.0", "1.0.0", "0.4.0", "0.3.1", "0.3.0"])
def test_add_check_del_roundtrip(topo: Topology, version: str) -> None:
    netns = topo.new_pod()
    pod = os.path.basename(netns)
    conf = topo.conf(version)
    res = run(topo, "ADD", conf, netns=netns)
    assert res.code == 0, res.stdout + res.stderr
    result = res.json()
    assert result["cniVersion"] == version
    [iface] = result["interfaces"]
    assert iface["name"] == "eth0" and iface["sandbox"] == netns
    [ip] = result["ips"]
    assert ip["interface"] == 0
    assert ipaddress.ip_interface(ip["address"]).network == ipaddress.ip_network(f"{topo.prefix}.0/24")
    assert ip["gateway"] == topo.gateway
    if version.startswith("0."):
        assert ip["version"] == "4" and "mtu" not in iface
    else:
        assert "version" not in ip and iface["mtu"] == 1500

    link = links(pod)["eth0"]
    assert link["linkinfo"]["info_kind"] == "macvtap"
    assert link["linkinfo"]["info_data"]["mode"] == "bridge"
    assert link["address"] == iface["mac"]
    assert "UP" in link["flags"]
    # The guest owns the address: nothing is configured on the macvtap in the pod netns.
    addrs = json.loads(sh("ip", "-n", pod, "-j", "addr", "show", "dev", "eth0").stdout)
    assert [a for a in addrs[0]["addr_info"] if a["family"] == "inet"] == []
    # The tap node is at the documented path and is the link's char device.
    node = topo.device_dir / "c1" / "eth0"
    st = os.lstat(node)
    assert stat.S_ISCHR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == tap_devt_in_pod(pod, "eth0")
    fd = os.open(node, os.O_RDWR)  # QEMU must be able to open it
    os.close(fd)
    assert topo.allocated_ips() == [ip["address"].split("/")[0]]

    if version not in ("0.3.0", "0.3.1"):
        chk = run(topo, "CHECK", with_prev(conf, result), netns=netns)
        assert chk.code == 0, chk.stdout + chk.stderr
        assert chk.stdout == ""
    else:
        chk = run(topo, "CHECK", with_prev(conf, result), netns=netns)
        assert chk.code == 1 and chk.json()["code"] == 1  # the spec has no CHECK before 0.4.0

    first = run(topo, "DEL", conf, netns=netns)
    assert first.code == 0, first.stdout + first.stderr
    again = run(topo, "DEL", conf, netns=netns)
    assert again.code == 0, again.stdout + again.stderr
    topo.assert_clean()
    if topo.use_daemon:  # type: ignore[attr-defined]
        assert "ADD c1/eth0 ok" in topo.daemon_log()


def test_config_keys_mode_mtu_mac_and_node_owner(topo: Topology) -> None:
    netns = topo.new_pod()
    pod = os.path.basename(netns)
    conf = topo.conf(
        mode="vepa", mtu=1400, mac="02:aa:bb:cc:dd:01", tapOwner="nobody", tapGroup=65534, tapMode="0660"
    )
    res = run(topo, "ADD", conf, netns=netns, ifname="net1")
    assert res.code == 0, res.stdout + res.stderr
    iface = res.json()["interfaces"][0]
    assert iface == {"name": "net1", "mac": "02:aa:bb:cc:dd:01", "mtu": 1400, "sandbox": netns}
    link = links(pod)["net1"]
    assert link["linkinfo"]["info_data"]["mode"] == "vepa"
    assert link["mtu"] == 1400 and link["address"] == "02:aa:bb:cc:dd:01"
    st = os.lstat(topo.device_dir / "c1" / "net1")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o660)
    assert run(topo, "DEL", conf, netns=netns, ifname="net1").code == 0
    topo.assert_clean()


def test_mac_precedence_runtime_config_over_cni_args_over_config(dtopo: Topology) -> None:
    netns = dtopo.new_pod()
    base = dtopo.conf(mac="02:00:00:00:00:0a")
    cases = [
        ("e1", base, "", "02:00:00:00:00:0a"),
        ("e2", base, "IgnoreUnknown=1;MAC=02:00:00:00:00:0b", "02:00:00:00:00:0b"),
        (
            "e3",
            {**base, "runtimeConfig": {"mac": "02:00:00:00:00:0c"}},
            "IgnoreUnknown=1;MAC=02:00:00:00:00:0b",
            "02:00:00:00:00:0c",
        ),
    ]
    for ifname, conf, args, want in cases:
        res = run(dtopo, "ADD", conf, netns=netns, ifname=ifname, args=args)
        assert res.code == 0, res.stdout + res.stderr
        assert res.json()["interfaces"][0]["mac"] == want
        assert links(os.path.basename(netns))[ifname]["address"] == want
    for ifname, conf, args, _ in cases:
        assert run(dtopo, "DEL", conf, netns=netns, ifname=ifname, args=args).code == 0
    dtopo.assert_clean()


def test_default_master_is_the_default_route_interface(dtopo: Topology) -> None:
    sh("ip", "-n", dtopo.host, "addr", "add", f"{dtopo.prefix}.2/24", "dev", MASTER)
    sh("ip", "-n", dtopo.host, "route", "add", "default", "via", dtopo.gateway)
    netns = dtopo.new_pod()
    conf = dtopo.conf(master=None)
    res = run(dtopo, "ADD", conf, netns=netns)
    assert res.code == 0, res.stdout + res.stderr
    master_index = links(dtopo.host)[MASTER]["ifindex"]
    assert links(os.path.basename(netns))["eth0"]["link_index"] == master_index
    assert run(dtopo, "DEL", conf, netns=netns).code == 0
    dtopo.assert_clean()


def test_without_ipam_the_result_has_no_ips(dtopo: Topology) -> None:
    netns = dtopo.new_pod()
    conf = dtopo.conf(ipam=None)
    res = run(dtopo, "ADD", conf, netns=netns)
    assert res.code == 0, res.stdout + res.stderr
    assert "ips" not in res.json() and res.json()["interfaces"][0]["name"] == "eth0"
    assert run(dtopo, "DEL", conf, netns=netns).code == 0
    dtopo.assert_clean()


@pytest.mark.parametrize(
    ("override", "field"),
    [({"mtu": 9000}, "mtu"), ({"master": "nosuchlink0"}, "master"), ({"mode": "bogus"}, "mode")],
)
def test_bad_config_fails_with_code_7_and_leaks_nothing(topo: Topology, override: dict, field: str) -> None:
    netns = topo.new_pod()
    res = run(topo, "ADD", topo.conf(**override), netns=netns)
    assert res.code == 1
    err = res.json()
    assert err["code"] == 7 and f"'{field}'" in err["msg"], err
    assert not res.stdout.startswith("Traceback") and "Traceback" not in res.stdout
    topo.assert_clean()


def test_existing_ifname_is_left_untouched(topo: Topology) -> None:
    netns = topo.new_pod()
    pod = os.path.basename(netns)
    sh("ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    before = links(pod)["eth0"]
    res = run(topo, "ADD", topo.conf(), netns=netns)
    assert res.code == 1 and res.json()["code"] == 100 and "already exists" in res.json()["msg"]
    after = links(pod)
    assert after["eth0"]["ifindex"] == before["ifindex"] and after["eth0"]["address"] == before["address"]
    assert set(after) == {"lo", "eth0", "other0"}
    assert topo.allocated_ips() == [] and tree(topo.device_dir) == []


def test_del_is_idempotent_without_netns_link_or_netns_path(topo: Topology) -> None:
    conf = topo.conf()
    # 1) the netns is gone before DEL: success, the path is not re-created, IPAM and node released.
    netns = topo.new_pod()
    assert run(topo, "ADD", conf, netns=netns, container_id="gone").code == 0
    sh("ip", "netns", "del", os.path.basename(netns))
    res = run(topo, "DEL", conf, netns=netns, container_id="gone")
    assert res.code == 0, res.stdout + res.stderr
    assert not os.path.exists(netns)
    # 2) CNI_NETNS empty.
    netns2 = topo.new_pod()
    assert run(topo, "ADD", conf, netns=netns2, container_id="empty").code == 0
    assert run(topo, "DEL", conf, netns="", container_id="empty").code == 0
    assert set(links(os.path.basename(netns2))) == {"lo"}  # found through ADD's record
    # 3) the link is already gone.
    netns3 = topo.new_pod()
    assert run(topo, "ADD", conf, netns=netns3, container_id="nolink").code == 0
    sh("ip", "-n", os.path.basename(netns3), "link", "del", "eth0")
    assert run(topo, "DEL", conf, netns=netns3, container_id="nolink").code == 0
    for cid, ns in (("gone", netns), ("empty", ""), ("nolink", netns3)):
        assert run(topo, "DEL", conf, netns=ns, container_id=cid).code == 0  # and once more
    topo.assert_clean()


def test_check_detects_every_difference(dtopo: Topology) -> None:
    netns = dtopo.new_pod()
    pod = os.path.basename(netns)
    conf = dtopo.conf("1.1.0")
    result = run(dtopo, "ADD", conf, netns=netns).json()
    ok = run(dtopo, "CHECK", with_prev(conf, result), netns=netns)
    assert ok.code == 0, ok.stdout

    def check_fails(c: dict, needle: str, code: int = 103) -> None:
        res = run(dtopo, "CHECK", c, netns=netns)
        assert res.code == 1, res.stdout
        assert res.json()["code"] == code and needle in res.json()["msg"], res.json()

    bad_mac = copy.deepcopy(result)
    bad_mac["interfaces"][0]["mac"] = "02:de:ad:be:ef:00"
    check_fails(with_prev(conf, bad_mac), "MAC")
    bad_mtu = copy.deepcopy(result)
    bad_mtu["interfaces"][0]["mtu"] = 1280
    check_fails(with_prev(conf, bad_mtu), "MTU")
    check_fails(with_prev({**conf, "mode": "private"}, result), "mode")
    check_fails(with_prev({**conf, "master": "nosuchlink0"}, result), "'master'", code=7)
    missing = copy.deepcopy(conf)
    check_fails(missing, "'prevResult'", code=7)
    # IPAM CHECK is delegated: losing host-local's reservation makes CHECK fail.
    reservation = dtopo.ipam_dir / conf["name"] / result["ips"][0]["address"].split("/")[0]
    saved = reservation.read_bytes()
    reservation.unlink()
    res = run(dtopo, "CHECK", with_prev(conf, result), netns=netns)
    assert res.code == 1 and "IPAM plugin host-local CHECK failed" in res.json()["msg"], res.stdout
    reservation.write_bytes(saved)
    # Device node gone.
    node = dtopo.device_dir / "c1" / "eth0"
    node.unlink()
    check_fails(with_prev(conf, result), "tap device node")
    # Link gone.
    sh("ip", "-n", pod, "link", "del", "eth0")
    check_fails(with_prev(conf, result), "does not exist")
    assert run(dtopo, "DEL", conf, netns=netns).code == 0
    dtopo.assert_clean()


def test_status(dtopo: Topology) -> None:
    ok = run(dtopo, "STATUS", dtopo.conf("1.1.0"), container_id="", ifname="")
    assert ok.code == 0 and ok.stdout == "", ok.stdout
    no_master = run(dtopo, "STATUS", dtopo.conf("1.1.0", master="nosuchlink0"), container_id="", ifname="")
    assert no_master.code == 1 and no_master.json()["code"] == 50 and "nosuchlink0" in no_master.json()["msg"]
    no_ipam = run(dtopo, "STATUS", dtopo.conf("1.1.0"), cni_path=str(dtopo.tmp), container_id="", ifname="")
    assert no_ipam.code == 1 and no_ipam.json()["code"] == 50 and "host-local" in no_ipam.json()["msg"]
    old = run(dtopo, "STATUS", dtopo.conf("1.0.0"), container_id="", ifname="")
    assert old.code == 1 and old.json()["code"] == 1


def test_gc_releases_attachments_that_are_not_valid(topo: Topology) -> None:
    conf = topo.conf("1.1.0")
    netns = topo.new_pod()
    kept = {}
    for cid in ("keep", "drop1", "drop2"):
        res = run(topo, "ADD", conf, netns=netns, container_id=cid, ifname=f"if-{cid}")
        assert res.code == 0, res.stdout + res.stderr
        kept[cid] = res.json()["ips"][0]["address"].split("/")[0]
    gc_conf = {**conf, "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "if-keep"}]}
    res = run(topo, "GC", gc_conf, container_id="", ifname="")
    assert res.code == 0, res.stdout + res.stderr
    assert topo.allocated_ips() == [kept["keep"]]
    assert tree(topo.device_dir) == ["keep", "keep/if-keep"]
    assert set(links(os.path.basename(netns))) == {"lo", "if-keep"}
    assert run(topo, "DEL", conf, netns=netns, container_id="keep", ifname="if-keep").code == 0
    topo.assert_clean()


def test_ipam_failure_rolls_back_the_link(topo: Topology) -> None:
    netns = topo.new_pod()
    conf = topo.conf()
    conf["ipam"]["ranges"][0][0]["rangeEnd"] = conf["ipam"]["ranges"][0][0]["rangeStart"]  # one address
    assert run(topo, "ADD", conf, netns=netns, container_id="first").code == 0
    res = run(topo, "ADD", conf, netns=netns, container_id="second", ifname="eth1")
    assert res.code == 1 and "IPAM" in res.json()["msg"], res.stdout
    assert set(links(os.path.basename(netns))) == {"lo", "eth0"}
    assert not (topo.device_dir / "second").exists()
    assert run(topo, "DEL", conf, netns=netns, container_id="first").code == 0
    # A missing IPAM plugin rolls back too.
    res = run(topo, "ADD", topo.conf(ipam={"type": "no-such-ipam"}), netns=netns)
    assert res.code == 1 and "no-such-ipam" in res.json()["msg"]
    topo.assert_clean()


def test_device_node_failure_rolls_back_link_and_ipam(topo: Topology) -> None:
    netns = topo.new_pod()
    blocker = topo.tmp / "not-a-dir"
    blocker.write_text("x")
    conf = topo.conf(deviceDir=str(blocker / "dev"))
    res = run(topo, "ADD", conf, netns=netns)
    assert res.code == 1 and res.json()["code"] == 102, res.stdout
    assert set(links(os.path.basename(netns))) == {"lo"}
    assert topo.allocated_ips() == []
    topo.assert_clean()


def test_concurrent_adds_and_dels(topo: Topology) -> None:
    conf = topo.conf()
    pods = [topo.new_pod() for _ in range(12)]

    def add(i: int):  # type: ignore[no-untyped-def]
        return run(topo, "ADD", conf, netns=pods[i], container_id=f"par{i}")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(add, range(len(pods))))
    for r in results:
        assert r.code == 0, r.stdout + r.stderr
    ips = [r.json()["ips"][0]["address"] for r in results]
    macs = [r.json()["interfaces"][0]["mac"] for r in results]
    assert len(set(ips)) == len(pods) and len(set(macs)) == len(pods)
    assert len(topo.allocated_ips()) == len(pods)
    for i, pod in enumerate(pods):
        assert links(os.path.basename(pod))["eth0"]["address"] == macs[i]
        assert (topo.device_dir / f"par{i}" / "eth0").exists()

    def delete(i: int):  # type: ignore[no-untyped-def]
        return run(topo, "DEL", conf, netns=pods[i], container_id=f"par{i}")

    with ThreadPoolExecutor(8) as pool:
        for r in pool.map(delete, range(len(pods))):
            assert r.code == 0, r.stdout + r.stderr
    topo.assert_clean()


def test_static_ipam_is_delegated_too(topo: Topology) -> None:
    netns = topo.new_pod()
    address = f"{topo.prefix}.77/24"
    conf = topo.conf(
        "1.0.0", ipam={"type": "static", "addresses": [{"address": address, "gateway": topo.gateway}]}
    )
    res = run(topo, "ADD", conf, netns=netns)
    assert res.code == 0, res.stdout + res.stderr
    assert res.json()["ips"] == [{"address": address, "gateway": topo.gateway, "interface": 0}]
    assert run(topo, "CHECK", with_prev(conf, res.json()), netns=netns).code == 0
    assert run(topo, "DEL", conf, netns=netns).code == 0
    topo.assert_clean()


def test_a_daemon_in_another_netns_hands_the_call_back(tmp_path: Path) -> None:
    """The daemon acts only on its own network namespace: a caller elsewhere runs the call in-process."""
    with topology(tmp_path) as t:
        # a daemon in the peer netns, listening on the socket the config names
        daemon = subprocess.Popen(
            ["ip", "netns", "exec", t.peer, sys.executable, "-m", "cni_macvtap", "daemon", "--socket",
             t.socket],
            cwd=REPO, stderr=subprocess.PIPE,
        )  # fmt: skip

        def listening() -> bool:
            assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
            return os.path.exists(t.socket)

        try:
            wait_for("the daemon in the peer netns to listen", listening, 60, 0.05)
            netns = t.new_pod()
            conf = t.conf()
            res = t.plugin("ADD", conf, netns=netns, daemon=True)
            assert res.code == 0, res.stdout + res.stderr
            assert links(os.path.basename(netns))["eth0"]["address"] == res.json()["interfaces"][0]["mac"]
            assert t.plugin("DEL", conf, netns=netns, daemon=True).code == 0
            t.assert_clean()
        finally:
            daemon.terminate()
            _, err = daemon.communicate(timeout=30)
        assert b"ADD c1/eth0" not in err  # the daemon never did the work


def _add_del(t: Topology, netns: str, cids: list[str], parallel: int = 1) -> None:
    """ADD then DEL of each container id (``parallel`` calls at a time); every call succeeds."""
    conf = t.conf()
    with ThreadPoolExecutor(parallel) as pool:
        for command in ("ADD", "DEL"):

            def call(cid: str, command: str = command) -> Any:
                return run(t, command, conf, netns=netns, container_id=cid, ifname=f"e-{cid}")

            results = list(pool.map(call, cids))
            assert all(r.code == 0 for r in results), [r.stdout + r.stderr for r in results if r.code]


def test_workers_start_on_demand_and_retire_when_idle(tmp_path: Path) -> None:
    """No worker while idle; a call starts one, a burst a second, and both exit after --idle-exit;
    a worker killed mid-life is not replaced until a call needs it."""
    with topology(tmp_path) as t:
        t.use_daemon = True  # type: ignore[attr-defined]
        t.start_daemon("--workers", "2", "--idle-exit", "2")
        assert t.daemon is not None
        supervisor = t.daemon.pid
        assert children(supervisor) == []  # idle: the supervisor alone
        netns = t.new_pod()
        _add_del(t, netns, ["one"])
        [first] = children(supervisor)
        _add_del(t, netns, [f"b{i}" for i in range(12)], parallel=6)
        assert len(children(supervisor)) == 2, t.daemon_log()  # the burst made the first say it is busy
        wait_for(
            "the idle workers to exit", lambda: children(supervisor) == [], 60, 0.1, explain=t.daemon_log
        )
        assert t.daemon_log().count("retired (idle)") == 2 and "exited" not in t.daemon_log()
        _add_del(t, netns, ["again"])  # a call after the idle spell starts a worker again
        [worker] = children(supervisor)
        assert worker != first
        os.kill(worker, 9)
        wait_for(
            "the supervisor to see it", lambda: "the next call starts a new one" in t.daemon_log(), 60, 0.1
        )
        assert children(supervisor) == []
        _add_del(t, netns, ["after-kill"])
        assert len(children(supervisor)) == 1
        t.assert_clean()


def test_min_workers_always_run_and_a_killed_one_is_replaced(tmp_path: Path) -> None:
    with topology(tmp_path) as t:
        t.use_daemon = True  # type: ignore[attr-defined]
        t.start_daemon("--workers", "2", "--min-workers", "2", "--idle-exit", "1")
        assert t.daemon is not None
        supervisor = t.daemon.pid
        wait_for("two workers", lambda: len(children(supervisor)) == 2, 60, 0.1, explain=t.daemon_log)
        workers = children(supervisor)
        os.kill(workers[0], 9)
        wait_for(
            "the daemon to replace the worker",
            lambda: "starting a new one" in t.daemon_log(),
            60,
            0.1,
            explain=t.daemon_log,
        )
        netns = t.new_pod()
        _add_del(t, netns, ["after1", "after2", "after3", "after4"], parallel=2)  # whichever worker accepts
        wait_for("two workers again", lambda: len(children(supervisor)) == 2, 60, 0.1, explain=t.daemon_log)
        assert workers[0] not in children(supervisor)
        time.sleep(2.5)  # longer than --idle-exit: workers that always run stay
        assert len(children(supervisor)) == 2 and "retired" not in t.daemon_log()
        t.assert_clean()


def test_the_daemon_does_not_leak_file_descriptors(dtopo: Topology) -> None:
    assert dtopo.daemon is not None
    netns = dtopo.new_pod()
    conf = dtopo.conf()

    def cycle(prefix: str, n: int) -> None:
        for i in range(n):
            assert run(dtopo, "ADD", conf, netns=netns, container_id=f"{prefix}{i}").code == 0
            assert run(dtopo, "DEL", conf, netns=netns, container_id=f"{prefix}{i}").code == 0

    def fds() -> dict[int, list[str]]:
        return {
            p: sorted(os.readlink(f"/proc/{p}/fd/{fd}") for fd in os.listdir(f"/proc/{p}/fd")) for p in procs
        }

    cycle("warm", 4)  # the worker these calls started has opened what it keeps (netlink socket, lock file)
    procs = [dtopo.daemon.pid, *children(dtopo.daemon.pid)]
    assert len(procs) == 2  # sequential calls: one worker
    before = fds()
    cycle("fd", 20)
    after = fds()
    assert children(dtopo.daemon.pid) == procs[1:]  # the same worker served them all
    assert {p: len(v) for p, v in after.items()} == {p: len(v) for p, v in before.items()}, (before, after)
    dtopo.assert_clean()


def test_dual_stack_ipam_results_in_040(topo: Topology) -> None:
    """IPv6 ranges are outside the daemon's in-process host-local subset: the binary serves them."""
    netns = topo.new_pod()
    conf = topo.conf("0.4.0")
    conf["ipam"]["ranges"].append([{"subnet": f"fd00:{topo.subnet_octet:x}::/64"}])
    res = run(topo, "ADD", conf, netns=netns)
    assert res.code == 0, res.stdout + res.stderr
    ips = res.json()["ips"]
    assert [(ip["version"], ip["interface"]) for ip in ips] == [("4", 0), ("6", 0)]
    assert ipaddress.ip_interface(ips[1]["address"]).network == ipaddress.ip_network(
        f"fd00:{topo.subnet_octet:x}::/64"
    )
    assert run(topo, "CHECK", with_prev(conf, res.json()), netns=netns).code == 0
    assert run(topo, "DEL", conf, netns=netns).code == 0
    assert [p.name for p in (topo.ipam_dir / conf["name"]).iterdir() if ":" in p.name] == []
    topo.assert_clean()
