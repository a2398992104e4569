"""Every manifest in examples/ works on the cluster `make demo` leaves behind: applied as written
(server-side apply; only the namespace is the test's own), its VirtualMachines started with
`kubectl vm start` reach Ready, boot (the guest's console), and get their hotpluggable volumes
mounted by node mode; deleted again, nothing is left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.waiting import wait_for

from vmcrd import api

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
VENV_BIN = Path(sys.executable).parent


def test_there_are_examples():
    assert EXAMPLES, "examples/ holds no manifests"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_an_example_applies_and_its_vms_start(cluster, edgevirt_installed, vm_image, example):
    k = cluster
    for mode in ("cluster", "node"):
        edgevirt_installed.require(mode)
    docs = [d for d in yaml.safe_load_all(example.read_text()) if d]
    vms = [d for d in docs if d["kind"] == "VirtualMachine"]
    assert vms, f"{example.name} has no VirtualMachine"
    for vm in vms:  # the image the demo pushed (vm_image) is the one the examples name
        assert vm["spec"]["image"] == vm_image, f"{example.name}: {vm['spec']['image']} is built by nothing"
    with k.namespace("examples") as ns:
        try:
            for doc in docs:
                doc["metadata"]["namespace"] = ns
            body = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
            k.kubectl("apply", "--server-side", "--field-manager=examples-test", "-f", "-", input=body)
            env = {**k.env, "PATH": f"{VENV_BIN}:{k.env['PATH']}"}
            for vm in vms:
                name = vm["metadata"]["name"]
                if api.run_strategy(vm["spec"]) in ("Halted", "Manual"):  # not started by applying it
                    _vm_cmd(env, "start", name, "-n", ns)
                k.kubectl(
                    "wait", "--for=condition=Ready", f"vm/{name}", "-n", ns, "--timeout=300s", timeout=320
                )
                wait_for(
                    f"{name}'s guest to boot",
                    lambda name=name: "EDGEVIRT-GUEST: up" in _console(k, ns, name),
                    180,
                    2,
                )
                hotplug = sorted(v["name"] for v in vm["spec"].get("volumes", []) if v.get("hotpluggable"))
                wait_for(
                    f"{name}'s hotpluggable volumes {hotplug} mounted",
                    lambda name=name, hotplug=hotplug: _mounted(k, ns, name) == hotplug,
                    180,
                    2,
                )
        finally:
            k.kubectl("delete", "vm", "--all", "-n", ns, "--wait=false", check=False)
            wait_for(
                "the example's VMs gone", lambda: not k.kubectl_json("get", "vm", "-n", ns)["items"], 180, 2
            )


def _vm_cmd(env: dict[str, str], *args: str) -> None:
    r = subprocess.run(["kubectl", "vm", *args], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _console(k, ns: str, name: str) -> str:
    return k.kubectl("logs", f"{name}-vm", "-n", ns, check=False).stdout


def _mounted(k, ns: str, name: str) -> list[str]:
    volumes = k.kubectl_json("get", "vm", name, "-n", ns).get("status", {}).get("volumes", [])
    return sorted(v["name"] for v in volumes if v.get("phase") == "Mounted")
