"""End to end on the real local cluster: the node is Ready; a busybox pod pulled from the local
registry runs under runc, its logs and exec work, and deleting it leaves no sandbox, netns or mount;
up is idempotent; down after a crashed component still leaves the machine clean."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import yaml
from localcluster.components import cri_enabled

pytestmark = pytest.mark.cluster

POD_YAML = """apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: e2e-busybox}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox:latest
    imagePullPolicy: Always
    command: ["sh", "-c", "echo started {token}; sleep 3600"]
"""


def wait(what: str, check, timeout: float = 120, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def test_node_is_ready(cluster):
    out = cluster.kubectl("get", "nodes", "--no-headers").stdout.split()
    assert out[0] == cluster.node and out[1] == "Ready", out
    node = cluster.kubectl_json("get", "node", cluster.node)
    # kubelet's CRI endpoint is edgevirt-cri (runtime_name "edgevirt") unless the cluster was brought
    # up with EDGEVIRT_LOCAL_CRI=containerd (straight to containerd). A reused cluster may have been
    # started under the other setting, so the kubelet config in effect decides.
    kubelet_cfg = yaml.safe_load((cluster.paths.etc / "kubelet.yaml").read_text())
    via_cri = kubelet_cfg["containerRuntimeEndpoint"] == f"unix://{cluster.paths.cri_sock}"
    if cluster.started_here:
        assert via_cri == cri_enabled(), kubelet_cfg["containerRuntimeEndpoint"]
    runtime = node["status"]["nodeInfo"]["containerRuntimeVersion"]
    assert runtime.startswith("edgevirt://" if via_cri else "containerd://"), runtime


def _netns_of(cluster, pod_id: str) -> str:
    info = json.loads(cluster.crictl("inspectp", pod_id).stdout)["info"]
    for ns in info["runtimeSpec"]["linux"]["namespaces"]:
        if ns["type"] == "network":
            return ns["path"]
    raise AssertionError("sandbox has no network namespace")


def test_busybox_pod_runs_logs_execs_and_leaves_nothing(cluster):
    name = f"e2e-busybox-{uuid.uuid4().hex[:6]}"
    token = uuid.uuid4().hex
    # A real pull: drop any cached copy so containerd must fetch from the local registry.
    cluster.crictl("rmi", "docker.io/library/busybox:latest", check=False)
    reg_log = cluster.paths.logs / "registry.log"
    reg_before = reg_log.stat().st_size
    cluster.kubectl("apply", "-f", "-", input=POD_YAML.format(name=name, token=token))
    try:
        cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=180s", timeout=200)
        pod = cluster.kubectl_json("get", "pod", name)
        assert pod["status"]["phase"] == "Running"
        # The pull went to the local registry (containerd's mirror of docker.io).
        with open(reg_log) as f:
            f.seek(reg_before)
            assert "library/busybox/manifests/latest" in f.read()
        # Runs under runc.
        pods = json.loads(cluster.crictl("pods", "--name", name, "-o", "json").stdout)["items"]
        assert len(pods) == 1
        pod_id = pods[0]["id"]
        info = json.loads(cluster.crictl("inspectp", pod_id).stdout)["info"]
        assert info["runtimeType"] == "io.containerd.runc.v2", info.get("runtimeType")
        netns = _netns_of(cluster, pod_id)
        assert Path(netns).exists()
        # logs and exec.
        logs = wait("the pod's output", lambda: cluster.kubectl("logs", name, check=False).stdout, 60)
        assert f"started {token}" in logs
        out = cluster.kubectl("exec", name, "--", "sh", "-c", "echo exec-$((6*7)); cat /proc/1/cmdline")
        assert "exec-42" in out.stdout
        assert "sleep" in out.stdout
    finally:
        cluster.kubectl("delete", "pod", name, "--wait=true", "--timeout=120s", check=False, timeout=150)
    # kubelet's garbage collector removes the dead sandbox within its one-minute period.
    wait(
        "the sandbox to be removed",
        lambda: not json.loads(cluster.crictl("pods", "--name", name, "-o", "json").stdout)["items"],
        150,
        2,
    )
    assert not Path(netns).exists(), f"netns {netns} left behind"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert pod_id not in mounts, "a mount of the deleted sandbox is left"
    assert pod["metadata"]["uid"] not in mounts, "a volume mount of the deleted pod is left"


def _pids(cluster) -> dict[str, int]:
    out = {}
    for pidfile in cluster.paths.pids.glob("*.pid"):
        out[pidfile.stem] = json.loads(pidfile.read_text())["pid"]
    return out


def test_up_is_idempotent(cluster):
    before = _pids(cluster)
    res = cluster.up()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "started (pid" not in res.stdout, res.stdout
    assert _pids(cluster) == before


def test_down_is_clean_after_a_component_was_killed_and_up_restores(cluster):
    """kill -9 a component, down must still leave nothing; up brings everything back."""
    pid = _pids(cluster)["kube-scheduler"]
    os.kill(pid, signal.SIGKILL)
    wait("the scheduler to die", lambda: not Path(f"/proc/{pid}").exists(), 10, 0.1)
    res = cluster.down()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "nothing of the cluster is left running" in res.stdout
    for name in ("kube-apiserver", "etcd", "kubelet", "containerd", "registry"):
        assert not (cluster.paths.pids / f"{name}.pid").exists(), name
    leftover = [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(cluster.paths.state) in line or str(cluster.paths.run) in line
    ]
    assert not leftover, leftover
    netns_dir = Path("/run/netns")
    pod_netns = [n for n in os.listdir(netns_dir) if n.startswith("cni-")] if netns_dir.exists() else []
    assert not pod_netns, pod_netns
    # A second down is harmless.
    res = cluster.down()
    assert res.returncode == 0, res.stdout + res.stderr
    # Bring it back for the tests that follow.
    res = cluster.up()
    assert res.returncode == 0, res.stdout + res.stderr
    out = cluster.kubectl("get", "nodes", "--no-headers").stdout.split()
    assert out[1] == "Ready"
