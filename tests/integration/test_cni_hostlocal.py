"""The daemon's in-process host-local against Debian's real host-local binary, operation by operation.

Random sequences of ADD/DEL/CHECK run once through the binary only and once alternating between the
binary and the in-process allocator on a shared dataDir; results, errors and the files on disk (names,
contents, modes) must be identical, which proves the state stays exactly compatible both ways.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni_macvtap import hostlocal, ipam
from cni_macvtap.errors import CNIError

BINARY = "/usr/lib/cni/host-local"
pytestmark = pytest.mark.skipif(
    not os.path.exists(BINARY), reason=f"{BINARY} missing: apt-get install containernetworking-plugins"
)

CONF: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "name": "hl-diff",
    "type": "macvtap",
    "ipam": {
        "type": "host-local",
        "ranges": [
            [
                {
                    "subnet": "10.61.0.0/24",
                    "rangeStart": "10.61.0.10",
                    "rangeEnd": "10.61.0.13",
                    "gateway": "10.61.0.11",
                },
                {"subnet": "10.61.1.0/29"},
            ],
            [{"subnet": "10.62.0.0/30"}],
        ],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.61.0.1"}],
    },
}


def binary(data_dir: str, verb: str, cid: str, ifname: str) -> tuple[str, Any]:
    conf = json.loads(json.dumps(CONF))
    conf["ipam"]["dataDir"] = data_dir
    env = {"CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_NETNS": "/nonexistent",
           "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=x"}  # fmt: skip
    proc = subprocess.run([BINARY], input=json.dumps(conf).encode(), env=env, capture_output=True, timeout=60)
    if proc.returncode:
        return "error", json.loads(proc.stdout)["msg"]
    if verb != "ADD":
        return "ok", None
    out = json.loads(proc.stdout)
    return "ok", {"ips": out.get("ips"), "routes": out.get("routes")}


def inproc(data_dir: str, verb: str, cid: str, ifname: str) -> tuple[str, Any]:
    conf = json.loads(json.dumps(CONF))
    conf["ipam"]["dataDir"] = data_dir
    env = {"CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME=x"}
    cfg = hostlocal.supported(conf, env)
    assert cfg is not None, "this config must be served in-process"
    try:
        if verb == "ADD":
            out = hostlocal.add(cfg, cid, ifname)
            return "ok", {"ips": out["ips"], "routes": out["routes"]}
        (hostlocal.delete if verb == "DEL" else hostlocal.check)(cfg, cid, ifname)
        return "ok", None
    except CNIError as exc:
        return "error", exc.msg.split(" failed: ", 1)[1]


def disk(data_dir: str) -> dict[str, tuple[bytes, int]]:
    root = Path(data_dir) / CONF["name"]
    if not root.exists():
        return {}
    return {
        p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in root.iterdir() if p.name != "lock"
    }


ops = st.lists(
    st.tuples(
        st.sampled_from(["ADD", "ADD", "DEL", "CHECK"]),
        st.sampled_from(["a", "b", "c"]),
        st.sampled_from(["eth0", "net1"]),
        st.booleans(),
    ),
    min_size=1,
    max_size=14,
)


@settings(
    max_examples=int(os.environ.get("CNI_FUZZ_EXAMPLES", "40")),
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
)
@given(sequence=ops)
def test_in_process_host_local_matches_the_binary(sequence: list[tuple[str, str, str, bool]]) -> None:
    with tempfile.TemporaryDirectory() as ref_dir, tempfile.TemporaryDirectory() as mixed_dir:
        for verb, cid, ifname, use_inproc in sequence:
            want = binary(ref_dir, verb, cid, ifname)
            got = (inproc if use_inproc else binary)(mixed_dir, verb, cid, ifname)
            assert got == want, (verb, cid, ifname, use_inproc)
            assert disk(mixed_dir) == disk(ref_dir)


def test_unserved_configs_fall_back_to_the_binary() -> None:
    env = {"CNI_ARGS": ""}
    base = {"name": "n", "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}}
    assert hostlocal.supported(base, env) is not None
    for ipam_extra in (
        {"resolvConf": "/etc/resolv.conf"},
        {"subnet": "fd00::/64"},
        {"subnet": "10.1.0.5/24"},
    ):
        assert hostlocal.supported({**base, "ipam": {**base["ipam"], **ipam_extra}}, env) is None
    assert hostlocal.supported(base, {"CNI_ARGS": "IP=10.1.0.9"}) is None
    assert hostlocal.supported(base, {"CNI_ARGS": "K8S_POD_NAME=x"}) is None  # the binary rejects it: let it
    assert hostlocal.supported({**base, "runtimeConfig": {"ips": ["10.1.0.9/24"]}}, env) is None
    overlapping = {"type": "host-local", "ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.1.0.0/25"}]]}
    assert hostlocal.supported({**base, "ipam": overlapping}, env) is None


def test_delegate_serves_host_local_in_process_only_when_enabled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = json.loads(json.dumps(CONF))
    conf["ipam"]["dataDir"] = str(tmp_path)
    env = {"CNI_CONTAINERID": "x", "CNI_IFNAME": "eth0", "CNI_NETNS": "/n", "CNI_PATH": "/usr/lib/cni"}
    calls: list[str] = []
    real = ipam.exec_plugin
    monkeypatch.setattr(ipam, "exec_plugin", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    monkeypatch.setattr(ipam, "IN_PROCESS", True)
    out = ipam.delegate("host-local", "ADD", env, ["/usr/lib/cni"], json.dumps(conf).encode())
    assert out is not None and out["ips"][0]["address"] == "10.61.0.10/24" and calls == []
    monkeypatch.setattr(ipam, "IN_PROCESS", False)
    ipam.delegate("host-local", "DEL", env, ["/usr/lib/cni"], json.dumps(conf).encode())
    assert calls == ["DEL"]
    assert disk(str(tmp_path)) == {
        "last_reserved_ip.0": (b"10.61.0.10", 0o644),
        "last_reserved_ip.1": (b"10.62.0.2", 0o644),
    }
