"""Property-based fuzzing of the macvtap plugin's environment and config, in real namespaces.

Every malformed input must give the spec's error JSON with the right code (never a traceback), through
the daemon and standalone alike, and leave the machine exactly as it was: links in the host and pod
namespaces, the test's namespaces, device nodes, state records and IPAM reservations.
"""

from __future__ import annotations

import json
import os
import re
import socket
import string
from collections.abc import Iterator
from typing import Any

import pytest
from helpers.cni_env import Topology, links, topology, tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.root
FUZZ = settings(
    max_examples=int(os.environ.get("CNI_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
VERBS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
CID_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")  # used with fullmatch, like Go's ^...$


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    with topology(tmp_path_factory.mktemp("cnifuzz"), daemon=True) as t:
        t.pod_path = t.new_pod()  # type: ignore[attr-defined]
        yield t
        assert t.daemon is not None and t.daemon.poll() is None, "the daemon died during fuzzing"


def snapshot(t: Topology) -> dict[str, Any]:
    """Everything the plugin could touch. (The root netns is left out: the plugin runs in the test's host
    netns, and other suites on this machine add links to the root netns concurrently.)"""
    return {
        "host": sorted(links(t.host)),
        "pods": {p: sorted(links(p)) for p in t.pods},
        "dev": tree(t.device_dir),
        "state": tree(t.state_dir),
        "ipam": tree(t.ipam_dir),
        "netns": sorted(n for n in os.listdir("/run/netns") if n.startswith(t.tag)),
    }


def expect_error(t: Topology, before: dict[str, Any], res: Any, code: int) -> None:
    assert res.code != 0, res.stdout
    assert "Traceback" not in res.stdout
    err = json.loads(res.stdout)
    assert err["code"] == code, (code, err)
    assert isinstance(err["msg"], str) and err["msg"]
    assert snapshot(t) == before


def env_oracle(cmd: str, cid: str, ifname: str, netns: str, args: str) -> bool:
    """True when libcni's skel would reject this environment (code 4)."""
    if cmd not in VERBS:
        return True
    if cmd in ("ADD", "DEL", "CHECK") and (not cid or not CID_RE.fullmatch(cid)):
        return True
    if cmd in ("ADD", "CHECK") and not netns:
        return True
    bad_name = not ifname or len(ifname) > 15 or ifname in (".", "..")
    if cmd in ("ADD", "DEL", "CHECK") and (bad_name or any(c in "/:" or c.isspace() for c in ifname)):
        return True
    return any(p and ("=" not in p or p.startswith("=")) for p in args.split(";"))


text = st.text(alphabet=string.printable + "äé\u2028", max_size=20)
ifnames = st.one_of(st.sampled_from(["eth0", "", ".", "..", "a/b", "a:b", "a b", "x" * 16, "tab\t"]), text)
cids = st.one_of(st.sampled_from(["c1", "", "-bad", "a/b", "a b", ".x", "c1\n"]), text)


@FUZZ
@given(
    cmd=st.one_of(st.sampled_from(VERBS), st.sampled_from(["", "add", "DELETE", "ADD "])),
    cid=cids,
    ifname=ifnames,
    use_netns=st.booleans(),
    args=st.one_of(st.just(""), st.sampled_from(["IgnoreUnknown=1", "MAC", "=x", "a=b;;c"]), text),
    via_daemon=st.booleans(),
)
def test_malformed_environment_is_code_4(
    topo: Topology, cmd: str, cid: str, ifname: str, use_netns: bool, args: str, via_daemon: bool
) -> None:
    netns = topo.pod_path if use_netns else ""  # type: ignore[attr-defined]
    if "\0" in cid + ifname + args or not env_oracle(cmd, cid, ifname, netns, args):
        return  # a valid environment is not this property's business
    before = snapshot(topo)
    conf = topo.conf()
    env = {"CNI_COMMAND": cmd, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname, "CNI_ARGS": args}
    res = topo.plugin(cmd, conf, netns=netns, daemon=via_daemon, env=env)
    expect_error(topo, before, res, 4)


GOOD_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
NAME_RE = CID_RE
BAD_VALUES: list[tuple[str, st.SearchStrategy[Any], int]] = [
    ("cniVersion", st.sampled_from(["0.2.0", "0.1.0", "2.0.0", "", None]), 1),
    ("cniVersion", text.filter(lambda v: v not in GOOD_VERSIONS), 1),
    ("name", st.sampled_from(["", "-x", "a/b", None, 5]), 7),
    ("name", text.filter(lambda v: not NAME_RE.fullmatch(v)), 7),
    (
        "mode",
        st.one_of(text.filter(lambda v: v not in ("bridge", "vepa", "private", "passthru")), st.integers()),
        7,
    ),
    ("mtu", st.one_of(st.integers(max_value=67), st.integers(min_value=65536), st.booleans(), text), 7),
    ("mtu", st.floats(), 7),
    (
        "mac",
        st.sampled_from(["01:00:5e:00:00:01", "00:00:00:00:00:00", "02:00:00:00:00", "zz:00:00:00:00:01"]),
        7,
    ),
    ("mac", st.one_of(text, st.integers()), 7),
    ("master", st.sampled_from(["", "x" * 16, "a/b", "a b", 3, ["vm0"]]), 7),
    ("ipam", st.one_of(st.integers(min_value=1), text.filter(bool)), 7),
    ("ipam", st.sampled_from([{"type": ""}, {"type": "../x"}, {"type": 7}, {"ranges": []}]), 7),
    ("tapMode", st.sampled_from(["rw", "999", "0o660", "-1", "17777", "07777", "4755", "1777", "0660\n"]), 7),
    ("tapMode", st.one_of(st.integers(min_value=0o1000), st.integers(max_value=-1)), 7),  # setuid & co.
    (
        "tapOwner",
        st.one_of(st.sampled_from(["no-such-user-xyz", ""]), st.integers(max_value=-1), st.booleans()),
        7,
    ),
    ("tapGroup", st.one_of(st.just("no-such-group-xyz"), st.integers(min_value=2**32)), 7),
    ("deviceDir", st.sampled_from(["relative/dir", "", "dev", 5, "/run/../etc", "/run/x\n", "/a//b"]), 7),
    ("stateDir", st.sampled_from(["relative/dir", "", 5, "/var/lib/..", "/var/./lib", "/x\ty"]), 7),
    ("daemonSocket", st.sampled_from(["relative.sock", 5, "", "/run/../x.sock", "/x.sock\n"]), 7),
    ("runtimeConfig", st.one_of(st.integers(), text, st.just({"mac": "01:02:03:04:05:06"})), 7),
    ("cni.dev/valid-attachments", st.sampled_from([1, [1], [{"containerID": 1}], "x"]), 7),
]


def _mutations() -> st.SearchStrategy[tuple[str, Any, int]]:
    return st.one_of(*(st.tuples(st.just(k), values, st.just(code)) for k, values, code in BAD_VALUES))


@FUZZ
@given(
    mutation=_mutations(),
    cmd=st.sampled_from(["ADD", "DEL", "CHECK", "STATUS", "GC"]),
    via_daemon=st.booleans(),
)
def test_malformed_config_gets_the_right_code(
    topo: Topology, mutation: tuple[str, Any, int], cmd: str, via_daemon: bool
) -> None:
    key, value, code = mutation
    if key == "cni.dev/valid-attachments" and cmd != "GC":
        cmd = "GC"
    conf = topo.conf("1.1.0")
    if value is None:
        conf.pop(key)
    else:
        conf[key] = value
    before = snapshot(topo)
    res = topo.plugin(cmd, conf, netns=topo.pod_path, daemon=via_daemon)  # type: ignore[attr-defined]
    expect_error(topo, before, res, code)
    if code == 7:
        assert key.split("/")[0].split(".")[0] in res.json()["msg"] or key in res.json()["msg"], res.json()


@FUZZ
@given(
    stdin=st.one_of(
        st.binary(max_size=64),
        st.sampled_from([b"", b"[]", b"1", b'"x"', b"null", b"{", b'{"cniVersion": "1.0.0"', b"\xff\xfe{}"]),
    ),
    cmd=st.sampled_from(["ADD", "DEL", "CHECK", "STATUS", "GC"]),
    via_daemon=st.booleans(),
)
def test_undecodable_stdin_is_code_6(topo: Topology, stdin: bytes, cmd: str, via_daemon: bool) -> None:
    try:
        doc = json.loads(stdin)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict):
        return
    before = snapshot(topo)
    res = topo.plugin(cmd, stdin, netns=topo.pod_path, daemon=via_daemon)  # type: ignore[attr-defined]
    expect_error(topo, before, res, 6)


def test_daemon_survives_garbage_on_its_socket(topo: Topology) -> None:
    for junk in (b"", b"GET / HTTP/1.0\r\n\r\n", b"MVT1" + b"\xff" * 20, os.urandom(512)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(topo.socket)
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(60)
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass  # the daemon may close on garbage before reading all of it
    res = topo.plugin("VERSION", topo.conf(), daemon=True)
    assert res.code == 0 and "1.1.0" in res.json()["supportedVersions"]
    assert topo.daemon is not None and topo.daemon.poll() is None
    assert oct(os.stat(topo.socket).st_mode & 0o777) == "0o600"
