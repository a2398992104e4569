"""kubelet -> edgevirt-cri -> containerd on the local cluster: the node reports the edgevirt runtime;
a runc pod (RuntimeClass runc) reaches Running, and logs, exec, attach and port-forward work through the
shim's passthrough; deleting it leaves no sandbox, record, netns or mount; a pod asking for a
handler this node does not serve fails with the shim's message; kill -9 of the shim with a pod
running and a restart: kubelet restarts nothing (same sandbox, same container, restartCount 0)."""

from __future__ import annotations

import json
import os
import queue
import re
import select
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from helpers.waiting import wait_for
from localcluster.components import BY_NAME

pytestmark = pytest.mark.cluster

POD = """apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: e2e-cri}}
spec:
  runtimeClassName: {rc}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox:latest
    command:
    - sh
    - -c
    - >-
      mkdir -p /www && echo page-{token} > /www/index.html && echo started-{token}
      && exec httpd -f -p 8080 -h /www
"""


def sandboxes(cluster, name: str, via_shim: bool = False) -> list[dict]:
    return cluster.cri(via_shim).json("pods", "--name", name, "-o", "json")["items"]


@pytest.fixture
def runc_pod(cluster):
    name = f"e2e-cri-{uuid.uuid4().hex[:6]}"
    token = uuid.uuid4().hex[:10]
    cluster.kubectl("apply", "-f", "-", input=POD.format(name=name, token=token, rc="runc"))
    try:
        cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=180s", timeout=200)
        yield name, token
    finally:
        cluster.kubectl("delete", "pod", name, "--wait=true", "--timeout=120s", check=False, timeout=150)


def test_the_node_runs_on_edgevirt_cri(cluster):
    node = cluster.kubectl_json("get", "node", cluster.node)
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"] == "edgevirt://0.1.0"
    # kubelet's own config names containerd; the node installer's drop-in points it at edgevirt-cri
    cfg = (cluster.paths.etc / "kubelet.yaml").read_text()
    assert f"containerRuntimeEndpoint: unix://{cluster.paths.containerd_sock}" in cfg
    assert cluster.kubelet_runtime_endpoint() == f"unix://{cluster.paths.cri_sock}"
    rcs = {i["metadata"]["name"]: i["handler"] for i in cluster.kubectl_json("get", "runtimeclass")["items"]}
    assert {k: rcs.get(k) for k in ("runc", "kata", "kvm")} == {"runc": "runc", "kata": "kata", "kvm": "kvm"}


def test_runc_pod_runs_logs_execs_port_forwards_and_leaves_nothing(cluster, runc_pod):
    name, token = runc_pod
    pod = cluster.kubectl_json("get", "pod", name)
    assert pod["status"]["phase"] == "Running"
    # Same sandbox seen through the shim and straight from containerd, recorded as containerd's.
    direct, via = sandboxes(cluster, name), sandboxes(cluster, name, via_shim=True)
    assert [s["id"] for s in direct] == [s["id"] for s in via] and len(direct) == 1
    pod_id = direct[0]["id"]
    assert direct[0]["runtimeHandler"] == "runc"
    record = cluster.paths.cri_state / "sandboxes" / pod_id
    assert record.read_text() == "containerd"
    info = json.loads(cluster.crictl("inspectp", pod_id).stdout)["info"]
    netns = next(n["path"] for n in info["runtimeSpec"]["linux"]["namespaces"] if n["type"] == "network")
    # logs, exec, port-forward (containerd's streaming server, URL passed through unchanged).
    logs = wait_for("the pod's output", lambda: cluster.kubectl("logs", name, check=False).stdout, 60)
    assert f"started-{token}" in logs
    assert cluster.kubectl("exec", name, "--", "sh", "-c", "echo exec-$((6*7))").stdout.strip() == "exec-42"
    pf = subprocess.Popen(
        [cluster.paths.tool("kubectl"), "port-forward", f"pod/{name}", ":8080"],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # its first line names the local port; bounded, so a silent port-forward fails here
        assert select.select([pf.stdout], [], [], 60)[0], "kubectl port-forward said nothing in 60 s"
        line = pf.stdout.readline()
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert m, f"kubectl port-forward said {line!r}"
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/index.html", timeout=30) as resp:
            assert resp.read().decode().strip() == f"page-{token}"
    finally:
        pf.terminate()
        pf.wait(10)
    # Delete: kubelet stops and (GC, within its one-minute period) removes the sandbox through the shim.
    cluster.kubectl("delete", "pod", name, "--wait=true", "--timeout=120s", timeout=150)
    wait_for("the sandbox to be removed", lambda: not sandboxes(cluster, name), 150, 2)
    wait_for("the shim's record to be dropped", lambda: not record.exists(), 30)
    assert not Path(netns).exists(), f"netns {netns} left behind"
    assert pod_id not in Path("/proc/self/mountinfo").read_text()


def test_a_handler_the_node_does_not_serve_fails_with_the_shims_message(cluster):
    """A RuntimeClass whose handler no backend serves: kubelet's sandbox creation fails with the
    shim's message naming the field and the handlers this node serves."""
    rc = f"e2e-nosuch-{uuid.uuid4().hex[:6]}"
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": rc}, "handler": rc}
        ),
    )
    name = f"e2e-cri-nosuch-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("apply", "-f", "-", input=POD.format(name=name, token="x", rc=rc))
    try:

        def failed_event():
            ev = cluster.kubectl_json(
                "get",
                "events",
                "--field-selector",
                f"involvedObject.name={name},reason=FailedCreatePodSandBox",
            )
            return next((e["message"] for e in ev["items"]), None)

        msg = wait_for("FailedCreatePodSandBox", failed_event, 120, 2)
        assert f'unknown runtime handler "{rc}"' in msg and "RunPodSandboxRequest.runtime_handler" in msg, msg
        assert '"runc"' in msg and '"kvm"' in msg
        assert not sandboxes(cluster, name)
    finally:
        cluster.kubectl("delete", "pod", name, "--wait=true", "--timeout=60s", check=False, timeout=90)
        cluster.kubectl("delete", "runtimeclass", rc, check=False)


def _state(cluster, name: str) -> tuple[str, str, int]:
    pod = cluster.kubectl_json("get", "pod", name)
    cs = pod["status"]["containerStatuses"][0]
    sb = sandboxes(cluster, name)
    return (",".join(sorted(s["id"] for s in sb)), cs["containerID"], cs["restartCount"])


def test_kill9_of_the_shim_restarts_nothing(cluster, runc_pod):
    name, _ = runc_pod
    before = _state(cluster, name)
    assert before[2] == 0 and before[0]
    proc = BY_NAME["edgevirt-cri"].process(cluster.paths)
    pid = proc.pid()
    assert pid, "edgevirt-cri of the local cluster is not running"
    os.kill(pid, signal.SIGKILL)
    wait_for("edgevirt-cri to die", lambda: not Path(f"/proc/{pid}").exists(), 10, 0.1)
    res = cluster.up("edgevirt-cri")
    assert res.returncode == 0, res.stdout + res.stderr
    assert proc.pid() not in (None, pid)
    # kubelet relists through the new shim; give it several sync periods (syncFrequency 10s) to act
    # on anything it believed changed, and check it did nothing.
    wait_for("kubelet to talk to the new shim", lambda: _relisted(cluster), 60, 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert _state(cluster, name) == before
        time.sleep(3)
    pod = cluster.kubectl_json("get", "pod", name)
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "True"


def _relisted(cluster) -> bool:
    """kubelet's own view after the restart: the node's runtime is reported ready again and the pod
    is listed through the shim (a ListPodSandbox with the new process serving)."""
    node = cluster.kubectl_json("get", "node", cluster.node)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}.get("Ready") == "True"
    return ready and bool(cluster.crictl("pods", "-q", via_shim=True).stdout.strip())


ATTACH_POD = """apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  runtimeClassName: runc
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox:latest
    stdin: true
    command: ["sh", "-c", "while read l; do echo got-$l; done"]
"""


def test_kubectl_attach_through_the_shim(cluster):
    name = f"e2e-cri-attach-{uuid.uuid4().hex[:6]}"
    token = uuid.uuid4().hex[:8]
    cluster.kubectl("apply", "-f", "-", input=ATTACH_POD.format(name=name))
    try:
        cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=180s", timeout=200)
        proc = subprocess.Popen(
            [cluster.paths.tool("kubectl"), "attach", "-i", name, "-c", "main"],
            env=cluster.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
        seen: list[str] = []

        def saw(needle: str) -> bool:
            while not lines.empty():
                seen.append(lines.get())
            return any(needle in x for x in seen)

        try:
            # kubectl prints its "If you don't see a command prompt" hint once the stream is up.
            wait_for("kubectl attach to connect", lambda: saw("command prompt"), 60, 0.2)
            proc.stdin.write(f"{token}\n")
            proc.stdin.flush()
            wait_for("the echo through attach", lambda: saw(f"got-{token}"), 60, 0.2)
        finally:
            proc.kill()
            proc.wait(10)
        assert f"got-{token}" in cluster.kubectl("logs", name).stdout
    finally:
        cluster.kubectl("delete", "pod", name, "--wait=true", "--timeout=120s", check=False, timeout=150)
