"""Unit tests of the macvtap plugin's pure parts: environment, config, versions, wire, socket lookup."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from cni_macvtap import cli, config, results, versions, wire
from cni_macvtap.environment import from_environ, parse_cni_args
from cni_macvtap.errors import CNIError
from cni_macvtap.plugin import run

BASE_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc",
    "CNI_NETNS": "/run/netns/x",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/usr/lib/cni",
}
CONF = {"cniVersion": "1.0.0", "name": "n1", "type": "macvtap", "master": "eth0"}


def env(**kw: str | None) -> dict[str, str]:
    out = {**BASE_ENV, **kw}
    return {k: v for k, v in out.items() if v is not None}


def err_of(env_: dict[str, str], conf: object = CONF) -> dict:
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    out, code, _ = run(env_, stdin)
    assert code == 1
    return json.loads(out)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"CNI_COMMAND": None}, "CNI_COMMAND"),
        ({"CNI_COMMAND": "FROB"}, "unknown CNI_COMMAND"),
        ({"CNI_CONTAINERID": None}, "CNI_CONTAINERID"),
        ({"CNI_CONTAINERID": "-x"}, "CNI_CONTAINERID"),
        ({"CNI_CONTAINERID": "ab\n"}, "CNI_CONTAINERID"),
        ({"CNI_NETNS": None}, "CNI_NETNS"),
        ({"CNI_IFNAME": "a" * 16}, "longer than 15"),
        ({"CNI_IFNAME": "a:b"}, "':'"),
        ({"CNI_IFNAME": "a b"}, "' '"),
        ({"CNI_IFNAME": ".."}, "not a valid"),
        ({"CNI_PATH": None}, "CNI_PATH"),
        ({"CNI_ARGS": "novalue"}, "CNI_ARGS"),
    ],
)
def test_environment_errors_are_code_4(overrides: dict, needle: str) -> None:
    err = err_of(env(**overrides))
    assert err["code"] == 4 and needle in err["msg"], err


def test_del_needs_no_netns_and_gc_needs_no_container() -> None:
    assert from_environ(env(CNI_COMMAND="DEL", CNI_NETNS=None), b"").netns == ""
    inv = from_environ({"CNI_COMMAND": "GC", "CNI_PATH": "/x"}, b"")
    assert inv.container_id == "" and inv.path == ("/x",)


def test_cni_args_parse() -> None:
    assert parse_cni_args("IgnoreUnknown=1;MAC=02:00:00:00:00:01;K8S_POD_NAME=a=b") == {
        "IgnoreUnknown": "1",
        "MAC": "02:00:00:00:00:01",
        "K8S_POD_NAME": "a=b",
    }


def test_version_verb_and_decoding_errors() -> None:
    out, code, _ = run({"CNI_COMMAND": "VERSION"}, b"")
    assert code == 0 and json.loads(out) == {
        "cniVersion": "1.1.0",
        "supportedVersions": list(versions.SUPPORTED),
    }
    assert err_of(env(), b"{not json")["code"] == 6
    assert err_of(env(), b"[1]")["code"] == 6
    assert err_of(env(), {**CONF, "cniVersion": "0.2.0"})["code"] == 1
    assert err_of(env(), {k: v for k, v in CONF.items() if k != "cniVersion"})["code"] == 1


def test_check_before_040_and_gc_before_110_are_incompatible() -> None:
    err = err_of(env(CNI_COMMAND="CHECK"), {**CONF, "cniVersion": "0.3.1"})
    assert err["code"] == 1 and "CHECK" in err["msg"] and err["cniVersion"] == "0.3.1"
    err = err_of({"CNI_COMMAND": "GC", "CNI_PATH": "/x"}, CONF)
    assert err["code"] == 1 and "GC" in err["msg"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mode", "bridgee"),
        ("mtu", 0),
        ("mtu", "1500"),
        ("mtu", True),
        ("mac", "01:00:00:00:00:01"),
        ("mac", "00:00:00:00:00:00"),
        ("mac", "02:00:00:00:00:01\n"),
        ("ipam", {"type": "../evil"}),
        ("ipam", []),
        ("tapMode", "0o600"),
        ("tapOwner", "no-such-user-for-sure"),
        ("tapGroup", -1),
        ("deviceDir", "relative"),
        ("name", "bad name"),
        ("master", "a/b"),
    ],
)
def test_config_errors_name_the_key(key: str, value: object) -> None:
    err = err_of(env(), {**CONF, key: value})
    assert err["code"] == 7 and f"'{key}" in err["msg"], err


def test_config_defaults_and_mac_precedence() -> None:
    inv = from_environ(env(CNI_ARGS="IgnoreUnknown=1;MAC=02:00:00:00:00:02"), b"")
    conf = config.parse(inv, {**CONF, "mac": "02:00:00:00:00:01", "tapMode": "0660", "tapGroup": "root"})
    assert (conf.mode, conf.mtu, conf.mac.mac, conf.tap_mode, conf.tap_gid) == (
        "bridge",
        None,
        "02:00:00:00:00:02",
        0o660,
        0,
    )
    assert conf.device_dir == "/run/edgevirt/macvtap" and conf.state_dir == "/var/lib/cni/macvtap"
    conf = config.parse(inv, {**CONF, "runtimeConfig": {"mac": "02:00:00:00:00:03"}})
    assert conf.mac.mac == "02:00:00:00:00:03"
    with pytest.raises(CNIError) as exc:
        config.parse(from_environ(env(CNI_ARGS="MAC=zz"), b""), CONF)
    assert exc.value.code == 4


def test_result_encoding_per_version() -> None:
    result = {
        "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "mtu": 1500, "sandbox": "/n"}],
        "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0}, {"address": "fd00::5/64"}],
        "routes": [{"dst": "0.0.0.0/0"}],
    }
    v1 = results.encode(result, "1.1.0")
    assert v1["interfaces"][0]["mtu"] == 1500 and "version" not in v1["ips"][0] and v1["dns"] == {}
    v04 = results.encode(result, "0.4.0")
    assert [ip["version"] for ip in v04["ips"]] == ["4", "6"] and "mtu" not in v04["interfaces"][0]
    back = results.normalize(v04)
    assert back["ips"][0] == result["ips"][0]


def test_socket_path_from_config() -> None:
    assert cli.socket_path(b"{}") == cli.DEFAULT_SOCKET
    assert cli.socket_path(b'{"daemonSocket": "/tmp/x.sock"}') == "/tmp/x.sock"
    assert cli.socket_path(b'{"daemonSocket":"/tmp/a\\"b"}') == '/tmp/a"b'
    assert cli.socket_path(b'{"daemonSocket": "relative"}') == cli.DEFAULT_SOCKET
    assert cli.socket_path(b'{"a": {"daemonSocket": "/x"}, "daemonSocket": "/y"}') == "/y"


def test_wire_roundtrip_over_a_socketpair() -> None:
    a, b = socket.socketpair()
    with a, b:
        env_ = {"CNI_COMMAND": "ADD", "ODD": "\udcff", "EMPTY": ""}
        stdin = bytes(range(256))
        t = threading.Thread(target=wire.send_request, args=(a, 42, env_, stdin))
        t.start()
        assert wire.recv_request(b) == (42, env_, stdin)
        t.join()
        wire.send_reply(b, 1, b"out\xff", "err")
        assert wire.recv_reply(a) == (1, b"out\xff", "err")
        a.sendall(b"JUNK" + b"\0" * 16)
        with pytest.raises(wire.ProtocolError):
            wire.recv_request(b)


def test_gc_valid_attachments_absent_or_null_means_none_are_valid() -> None:
    inv = from_environ({"CNI_COMMAND": "GC", "CNI_PATH": "/x"}, b"")
    conf = config.parse(inv, {**CONF, "cniVersion": "1.1.0", "cni.dev/valid-attachments": None})
    assert conf.valid_attachments == ()
    assert config.parse(inv, {**CONF, "cniVersion": "1.1.0"}).valid_attachments == ()
    listed = [{"containerID": "a", "ifname": "eth0"}]
    conf = config.parse(inv, {**CONF, "cniVersion": "1.1.0", "cni.dev/valid-attachments": listed})
    assert conf.valid_attachments == (("a", "eth0"),)
