"""The macvtap plugin against a hostile or careless caller, without namespaces: every bad value is
refused with the spec's error for it, before anything is touched, and no input makes the plugin hold
more than it bounds (stdin size)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cni_macvtap import config, ipam
from cni_macvtap.environment import from_environ
from cni_macvtap.errors import CNIError
from cni_macvtap.plugin import run

REPO = Path(__file__).resolve().parents[2]
BASE_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc",
    "CNI_NETNS": "/run/netns/x",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/usr/lib/cni",
}
CONF: dict[str, Any] = {"cniVersion": "1.0.0", "name": "n1", "type": "macvtap", "master": "eth0"}


def env(**kw: str) -> dict[str, str]:
    return {**BASE_ENV, **kw}


def parse_error(conf: dict[str, Any], **env_kw: str) -> CNIError:
    with pytest.raises(CNIError) as exc:
        config.parse(from_environ(env(**env_kw), b""), conf)
    return exc.value


def env_error(**env_kw: str) -> CNIError:
    with pytest.raises(CNIError) as exc:
        from_environ(env(**env_kw), b"")
    return exc.value


# --- prevResult of the wrong shape on CHECK: code 7 naming prevResult, never a traceback ---

GOOD_PREV: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "mtu": 1500, "sandbox": "/run/netns/x"}],
    "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"interfaces": 5}, "interfaces"),
        ({"interfaces": "eth0"}, "interfaces"),
        ({"interfaces": [5]}, "interfaces"),
        ({"interfaces": [{"name": 5}]}, "name"),
        ({"interfaces": [{"name": "eth0", "mtu": "abc"}]}, "mtu"),
        ({"interfaces": [{"name": "eth0", "mac": ["x"]}]}, "mac"),
        ({"interfaces": [{"name": "eth0", "sandbox": {}}]}, "sandbox"),
        ({"ips": {"address": "10.1.0.5/24"}}, "ips"),
        ({"ips": [{"address": 5}]}, "address"),
        ({"ips": [{"address": "not-an-ip"}]}, "address"),
        ({"ips": [{"address": "10.1.0.5/24", "interface": "0"}]}, "interface"),
        ({"ips": [{"address": "10.1.0.5/24", "gateway": 7}]}, "gateway"),
        ({"routes": "default"}, "routes"),
        ({"routes": [{"dst": 1}]}, "dst"),
        ({"dns": []}, "dns"),
    ],
)
def test_a_prev_result_of_the_wrong_shape_is_code_7_naming_it(change: dict[str, Any], needle: str) -> None:
    conf = {**CONF, "prevResult": {**GOOD_PREV, **change}}
    out, code, err = run(env(CNI_COMMAND="CHECK"), json.dumps(conf).encode())
    assert code == 1
    doc = json.loads(out)
    assert doc["code"] == 7, doc
    assert "prevResult" in doc["msg"] and needle in doc["msg"], doc
    assert "Traceback" not in err and "Traceback" not in out.decode()


def test_a_prev_result_that_is_not_an_object_is_code_7() -> None:
    out, code, _ = run(env(CNI_COMMAND="CHECK"), json.dumps({**CONF, "prevResult": [1]}).encode())
    assert code == 1 and json.loads(out)["code"] == 7 and "prevResult" in json.loads(out)["msg"]


def test_a_well_formed_prev_result_passes_parsing() -> None:
    conf = config.parse(from_environ(env(CNI_COMMAND="CHECK"), b""), {**CONF, "prevResult": GOOD_PREV})
    assert conf.prev_result is not None and conf.prev_result["interfaces"][0]["mtu"] == 1500


# --- a trailing newline (or other control character) is never accepted by a validating pattern ---


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mac", "02:00:00:00:00:01\n"),
        ("name", "n1\n"),
        ("master", "eth0\n"),
        ("ipam", {"type": "host-local\n"}),
        ("tapMode", "0660\n"),
        ("tapOwner", "0\n"),
        ("tapGroup", "0\n"),
        ("deviceDir", "/run/edgevirt/macvtap\n"),
        ("stateDir", "/var/lib/cni/macvtap\n"),
        ("daemonSocket", "/run/edgevirt/macvtap.sock\n"),
        ("deviceDir", "/run/edge\tvirt"),
    ],
)
def test_a_trailing_newline_is_refused_in_every_value(key: str, value: object) -> None:
    err = parse_error({**CONF, key: value})
    assert err.code == 7 and f"'{key}" in err.msg, err.msg


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CNI_CONTAINERID", "abc\n"),
        ("CNI_IFNAME", "eth0\n"),
        ("CNI_NETNS", "/run/netns/x\n"),
        ("CNI_ARGS", "IgnoreUnknown=1;MAC=02:00:00:00:00:01\n"),
    ],
)
def test_a_trailing_newline_is_refused_in_the_environment(var: str, value: str) -> None:
    with pytest.raises(CNIError) as exc:
        config.parse(from_environ(env(**{var: value}), b""), CONF)
    assert exc.value.code == 4 and var.replace("CNI_ARGS", "MAC") in exc.value.msg, exc.value.msg


# --- tapMode: permission bits only ---


@pytest.mark.parametrize("value", ["07777", "7777", "4755", "2770", "1777", "0o777", 0o4600, 0o1000, 4096])
def test_tap_mode_takes_permission_bits_only(value: object) -> None:
    err = parse_error({**CONF, "tapMode": value})
    assert err.code == 7 and "'tapMode'" in err.msg and "0777" in err.msg, err.msg


@pytest.mark.parametrize(("value", "mode"), [("0660", 0o660), ("600", 0o600), ("0000", 0), (0o640, 0o640)])
def test_tap_mode_permission_bits_are_accepted(value: object, mode: int) -> None:
    assert config.parse(from_environ(env(), b""), {**CONF, "tapMode": value}).tap_mode == mode


# --- ids: ASCII digits only, in range; names and ids that cannot be a path component are refused ---


@pytest.mark.parametrize("value", ["²", "١٢", "99999999999", "4294967295"])
def test_tap_owner_numeric_strings_are_ascii_ids_in_range(value: str) -> None:
    for key in ("tapOwner", "tapGroup"):
        err = parse_error({**CONF, key: value})
        assert err.code == 7 and repr(key) in err.msg, err.msg


def test_a_container_id_longer_than_a_path_component_is_code_4() -> None:
    err = env_error(CNI_CONTAINERID="a" * 256)
    assert err.code == 4 and "CNI_CONTAINERID" in err.msg and "255" in err.msg
    assert from_environ(env(CNI_CONTAINERID="a" * 255), b"").container_id == "a" * 255


def test_a_network_name_longer_than_a_path_component_is_code_7() -> None:
    err = parse_error({**CONF, "name": "n" * 256})
    assert err.code == 7 and "'name'" in err.msg


@pytest.mark.parametrize("value", ["/run/../etc", "/run/edgevirt/./x", "/a//b", "/run/edgevirt/.."])
def test_state_and_device_dirs_must_be_normalized(value: str) -> None:
    for key in ("deviceDir", "stateDir", "daemonSocket"):
        err = parse_error({**CONF, key: value})
        assert err.code == 7 and repr(key) in err.msg and ".." in err.msg, err.msg


@pytest.mark.parametrize("netns", ["run/netns/x", "./x", "x"])
def test_a_relative_netns_path_is_code_4(netns: str) -> None:
    err = env_error(CNI_NETNS=netns)
    assert err.code == 4 and "CNI_NETNS" in err.msg and "absolute" in err.msg


def test_relative_cni_path_entries_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative CNI_PATH would resolve against the daemon's working directory, not the caller's."""
    (tmp_path / "rel").mkdir()
    plugin = tmp_path / "rel" / "host-local"
    plugin.write_text("#!/bin/sh\n")
    plugin.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CNIError) as exc:
        ipam.find_plugin("host-local", ["rel"])
    assert exc.value.code == 101
    assert ipam.find_plugin("host-local", [str(tmp_path / "rel")]) == str(plugin)


# --- bounds: stdin is read up to a limit, whatever the caller sends ---


def test_an_oversized_config_is_refused_by_run() -> None:
    stdin = json.dumps({**CONF, "pad": "x" * (2 << 20)}).encode()
    out, code, _ = run(env(), stdin)
    assert code == 1
    doc = json.loads(out)
    assert doc["code"] == 5 and "stdin" in doc["msg"] and "1048576" in doc["msg"], doc


@pytest.mark.parametrize(
    "stdin",
    [
        b"[" * 100000,
        b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}",
        b'{"a": ' + b"[" * 65 + b"]" * 65 + b"}",
    ],
)
def test_deeply_nested_json_is_a_decoding_error(stdin: bytes) -> None:
    out, code, err = run(env(), stdin)
    assert code == 1
    doc = json.loads(out)
    assert doc["code"] == 6 and "nested deeper" in doc["msg"], doc
    assert "Traceback" not in err


def test_the_executable_reads_a_bounded_stdin() -> None:
    """A 64 MiB stdin gets code 5, and the plugin stops reading at its limit (the writer sees EPIPE)."""
    e = {**env(), "MACVTAP_NO_DAEMON": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cni_macvtap"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=e, cwd=REPO,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    chunk, written = b" " * (1 << 16), 0
    try:
        while written < 64 << 20:
            proc.stdin.write(chunk)
            written += len(chunk)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the plugin stopped reading and answered
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 1
    assert json.loads(out)["code"] == 5
    assert written < 8 << 20, f"the plugin read {written} bytes of stdin"


def test_a_nested_daemon_socket_key_is_not_the_configs(tmp_path: Path) -> None:
    """Only the top-level daemonSocket names the daemon, as the config parser reads it."""
    from cni_macvtap import cli

    nested = {"ipam": {"daemonSocket": "/tmp/evil.sock"}, "name": "n"}
    assert cli.socket_path(json.dumps(nested).encode()) == "/run/edgevirt/macvtap.sock"
    inside_string = {"note": '"daemonSocket": "/tmp/evil.sock"'}
    assert cli.socket_path(json.dumps(inside_string).encode()) == "/run/edgevirt/macvtap.sock"
    both = {"runtimeConfig": {"daemonSocket": "/tmp/evil.sock"}, "daemonSocket": "/tmp/good.sock"}
    assert cli.socket_path(json.dumps(both).encode()) == "/tmp/good.sock"


def test_the_daemon_never_unlinks_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    from cni_macvtap.server import Server

    victim = tmp_path / "precious"
    victim.write_text("data")
    with pytest.raises(SystemExit) as exc:
        Server(str(victim)).bind()
    assert "not a socket" in str(exc.value)
    assert victim.read_text() == "data"
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on: a dead daemon's, replaced
    d = Server(str(stale))
    d.bind()
    d.stop()
    assert not os.path.exists(stale)
