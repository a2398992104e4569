"""The kvm handler's conflist runner against small recording plugin scripts: chain order, prevResult,
capabilities only for plugins that declare them, rollback of a half-done ADD, DEL of every plugin,
error JSON mapped to a message naming the plugin."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cri_shim.kvm import cni_exec

PLUGIN = """#!/usr/bin/env python3
import json, os, sys
conf = json.load(sys.stdin)
me = conf["type"]
here = os.path.dirname(os.path.abspath(sys.argv[0]))
fail = os.path.join(here, "fail-" + me)
with open(os.path.join(here, "rec.jsonl"), "a") as f:
    f.write(json.dumps({"plugin": me, "cmd": os.environ["CNI_COMMAND"], "args": os.environ["CNI_ARGS"],
                        "netns": os.environ["CNI_NETNS"], "id": os.environ["CNI_CONTAINERID"],
                        "conf": conf}) + "\\n")
if os.path.exists(fail) and open(fail).read() == os.environ["CNI_COMMAND"]:
    print(json.dumps({"cniVersion": "1.0.0", "code": 107, "msg": me + " broke", "details": "on purpose"}))
    sys.exit(1)
if os.environ["CNI_COMMAND"] == "ADD":
    prev = conf.get("prevResult") or {"cniVersion": "1.0.0", "interfaces": [], "ips": []}
    prev["interfaces"].append({"name": me})
    if me == "first":
        prev["ips"].append({"address": "10.9.0.7/24"})
    print(json.dumps(prev))
"""


@pytest.fixture
def net(tmp_path: Path) -> cni_exec.ConfList:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("first", "second"):
        p = bindir / name
        p.write_text(PLUGIN)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    conf = {
        "cniVersion": "1.0.0",
        "name": "vmnet",
        "plugins": [{"type": "first", "capabilities": {"mac": True}}, {"type": "second"}],
    }
    (tmp_path / "n.conflist").write_text(json.dumps(conf))
    return cni_exec.ConfList(tmp_path / "n.conflist", [tmp_path / "nope", bindir])


def calls(tmp_path: Path) -> list[dict]:
    f = tmp_path / "bin" / "rec.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []


ATT = cni_exec.Attachment(
    container_id="c" * 64,
    netns="/run/netns/x",
    args=(("K8S_POD_NAMESPACE", "ns"), ("K8S_POD_NAME", "web")),
    capabilities=(("mac", "02:00:00:00:00:01"),),
)


def test_add_chains_prev_results_and_passes_capabilities_only_to_declaring_plugins(net, tmp_path):
    result = net.add(ATT)
    assert [i["name"] for i in result["interfaces"]] == ["first", "second"]
    assert cni_exec.pod_ips(result) == ["10.9.0.7"]
    first, second = calls(tmp_path)
    assert (first["plugin"], second["plugin"]) == ("first", "second")
    assert first["conf"]["runtimeConfig"] == {"mac": "02:00:00:00:00:01"}
    assert "runtimeConfig" not in second["conf"]
    assert second["conf"]["prevResult"]["interfaces"] == [{"name": "first"}]
    assert first["conf"]["name"] == "vmnet" and first["conf"]["cniVersion"] == "1.0.0"
    assert first["args"] == "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web"
    assert first["id"] == "c" * 64 and first["netns"] == "/run/netns/x"


def test_a_failed_add_deletes_what_was_added_and_names_the_plugin(net, tmp_path):
    (tmp_path / "bin" / "fail-second").write_text("ADD")
    with pytest.raises(cni_exec.CNIError, match="plugin second failed: second broke \\(on purpose\\)") as e:
        net.add(ATT)
    assert e.value.code == 107
    assert [(c["plugin"], c["cmd"]) for c in calls(tmp_path)] == [
        ("first", "ADD"),
        ("second", "ADD"),
        ("first", "DEL"),
    ]


def test_del_runs_every_plugin_in_reverse_even_when_one_fails(net, tmp_path):
    (tmp_path / "bin" / "fail-second").write_text("DEL")
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "first"}], "ips": []}
    with pytest.raises(cni_exec.CNIError, match="DEL of plugin second"):
        net.delete(ATT, prev)
    got = calls(tmp_path)
    assert [(c["plugin"], c["cmd"]) for c in got] == [("second", "DEL"), ("first", "DEL")]
    assert got[1]["conf"]["prevResult"] == prev


def test_bad_conflists_and_missing_plugins_are_named(tmp_path):
    p = tmp_path / "bad.conflist"
    p.write_text("{")
    with pytest.raises(cni_exec.CNIError, match="not JSON"):
        cni_exec.ConfList(p, [tmp_path])
    p.write_text(json.dumps({"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "../evil"}]}))
    with pytest.raises(cni_exec.CNIError, match=r"plugins\[0\].type"):
        cni_exec.ConfList(p, [tmp_path])
    p.write_text(json.dumps({"cniVersion": "1.0.0", "name": "x", "plugins": [{"type": "macvtap"}]}))
    net = cni_exec.ConfList(p, [tmp_path])
    assert net.missing_plugins() == ["macvtap"]
    with pytest.raises(cni_exec.CNIError, match="'macvtap' not found"):
        net.add(ATT)


def test_cni_args_refuse_separators():
    att = cni_exec.Attachment(container_id="c", netns="", args=(("K8S_POD_NAME", "a;b=c"),))
    with pytest.raises(cni_exec.CNIError, match="K8S_POD_NAME"):
        att.cni_args()
