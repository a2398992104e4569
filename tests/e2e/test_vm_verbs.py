"""kubectl verbs and probes on VM pods through kubelet and the cluster's edgevirt-cri, against the
same under runc (docs/verbs.md has the table):

* exec readiness and liveness probes: the same pod spec under runc (busybox) and kvm (the test disk,
  whose guest runs qemu-ga) becomes Ready; a probe made to fail (a file written with kubectl exec)
  turns it unready, then back; a failing liveness probe makes kubelet restart the container in
  both (a VM boots again).
* kubectl exec in a VM: the guest's kernel, exit codes, stdin, an interactive shell on a pty;
  kubectl cp both ways; kubectl port-forward to a server in the guest.
* a tcpSocket probe on a VM pod: kubelet's connection from the node to the VM's IP never arrives
  (a macvtap VM network): the probe times out, it is not refused; the same probe on a runc pod
  passes.

The kvm halves need an edgevirt-cri with exec support on the cluster (this checkout's code).
"""

from __future__ import annotations

import re
import select
import subprocess
import urllib.request
import uuid

import pytest
from helpers.ptys import PtyClient
from helpers.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]

PROBED = """apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: e2e-verbs}}}}
spec:
  runtimeClassName: {rc}
  terminationGracePeriodSeconds: 5
  containers:
  - name: main
    image: {image}
    command:  # a runc pod's (a VM boots its disk and ignores it)
    - sh
    - -c
    - mkdir -p /tmp/www && echo page-{rc} > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www
    resources: {{limits: {{cpu: "1", memory: 256Mi}}, requests: {{cpu: 10m, memory: 256Mi}}}}
{probes}
"""
EXEC_PROBES = """    startupProbe:  # covers a VM's boot: liveness starts once the guest answers
      exec: {command: ["true"]}
      periodSeconds: 5
      failureThreshold: 120
      timeoutSeconds: 10
    readinessProbe:
      exec: {command: [sh, -c, "test ! -e /tmp/unready"]}
      periodSeconds: 3
      timeoutSeconds: 10
    livenessProbe:
      exec: {command: [sh, -c, "test ! -e /tmp/dead"]}
      periodSeconds: 3
      failureThreshold: 2
      timeoutSeconds: 10"""
TCP_PROBE = """    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 5, timeoutSeconds: 2}"""


def image_for(rc: str, vm_image: str) -> str:
    return vm_image if rc == "kvm" else "busybox:latest"


@pytest.fixture
def pods(cluster):
    """Applies pods; deletes them at the end."""
    made: list[str] = []

    def apply(rc: str, image: str, probes: str) -> str:
        name = f"e2e-verbs-{rc}-{uuid.uuid4().hex[:6]}"
        cluster.kubectl("apply", "-f", "-", input=PROBED.format(name=name, rc=rc, image=image, probes=probes))
        made.append(name)
        return name

    yield apply
    for name in made:
        cluster.kubectl("delete", "pod", name, "--wait=true", "--timeout=180s", check=False, timeout=200)


def ready(cluster, name: str) -> bool:
    conds = cluster.kubectl_json("get", "pod", name)["status"].get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def restarts(cluster, name: str) -> int:
    st = cluster.kubectl_json("get", "pod", name)["status"].get("containerStatuses") or [{}]
    return int(st[0].get("restartCount", 0))


def kexec(cluster, name: str, *cmd: str, check: bool = True, input: str | None = None):
    return cluster.kubectl(
        "exec", *(["-i"] if input is not None else []), name, "--", *cmd, check=check, input=input
    )


@pytest.mark.parametrize("rc", ["runc", "kvm"])
def test_exec_probes_behave_the_same_under_runc_and_kvm(cluster, pods, vm_image, rc):
    name = pods(rc, image_for(rc, vm_image), EXEC_PROBES)
    cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=600s", timeout=620)
    kexec(cluster, name, "touch", "/tmp/unready")
    wait_for("the pod to turn unready", lambda: not ready(cluster, name), 60, 1)
    kexec(cluster, name, "rm", "/tmp/unready")
    wait_for("the pod to be ready again", lambda: ready(cluster, name), 60, 1)
    assert restarts(cluster, name) == 0
    kexec(cluster, name, "touch", "/tmp/dead")
    wait_for("kubelet to restart the container", lambda: restarts(cluster, name) == 1, 120, 1)
    # a new container (for kvm: the VM booted again) starts without /tmp/dead and becomes ready
    wait_for("the restarted container to be ready", lambda: ready(cluster, name), 600, 2)
    assert kexec(cluster, name, "sh", "-c", "test -e /tmp/dead || echo fresh").stdout.strip() == "fresh"
    events = cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}").stdout
    assert "Liveness probe failed" in events and "Readiness probe failed" in events, events


@pytest.fixture(scope="module")
def vm_pod(cluster, vm_image):
    name = f"e2e-verbs-vm-{uuid.uuid4().hex[:6]}"
    cluster.kubectl(
        "apply", "-f", "-", input=PROBED.format(name=name, rc="kvm", image=vm_image, probes=EXEC_PROBES)
    )
    try:
        cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=600s", timeout=620)
        yield name
    finally:
        cluster.kubectl("delete", "pod", name, "--wait=true", "--timeout=180s", check=False, timeout=200)


def test_kubectl_exec_in_a_vm_runs_in_the_guest_with_exit_codes_stdin_and_a_tty(cluster, vm_pod):
    assert kexec(cluster, vm_pod, "cat", "/proc/version").stdout.startswith("Linux version ")
    assert "console=ttyS0" in kexec(cluster, vm_pod, "cat", "/proc/cmdline").stdout  # the guest's
    r = kexec(cluster, vm_pod, "sh", "-c", "echo oops >&2; exit 7", check=False)
    assert r.returncode == 7 and "oops" in r.stderr, r
    assert kexec(cluster, vm_pod, "cat", input="via stdin\n").stdout == "via stdin\n"
    client = PtyClient(
        [cluster.paths.tool("kubectl"), "exec", "-it", vm_pod, "--", "sh"], env=cluster.env, rows=31, cols=97
    )
    try:
        client.expect("# ")
        client.type("stty size; echo sum=$((40+2))\r")
        client.expect("sum=42")
        assert "31 97" in client.text()
        client.type("exit 3\r")
        assert client.wait(60) == 3
    finally:
        client.close()


def test_kubectl_cp_to_and_from_a_vm(cluster, vm_pod, tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(bytes(range(256)) * 1024)
    cluster.kubectl("cp", str(src), f"{vm_pod}:/tmp/in.bin", timeout=300)
    cluster.kubectl("cp", f"{vm_pod}:/tmp/in.bin", str(tmp_path / "back.bin"), timeout=300)
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_kubectl_port_forward_reaches_a_server_in_the_guest(cluster, vm_pod):
    kexec(cluster, vm_pod, "sh", "-c", "mkdir -p /tmp/pf && echo served-by-the-guest > /tmp/pf/index.html")
    kexec(cluster, vm_pod, "httpd", "-p", "8081", "-h", "/tmp/pf")
    pf = subprocess.Popen(
        [cluster.paths.tool("kubectl"), "port-forward", f"pod/{vm_pod}", ":8081"],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert select.select([pf.stdout], [], [], 60)[0], "kubectl port-forward said nothing in 60 s"
        line = pf.stdout.readline()
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert m, f"kubectl port-forward said {line!r}"
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/index.html", timeout=60) as resp:
            assert resp.read() == b"served-by-the-guest\n"
    finally:
        pf.terminate()
        pf.wait(10)


@pytest.mark.parametrize("rc", ["runc", "kvm"])
def test_a_tcp_socket_probe_cannot_reach_a_vm_from_the_node(cluster, pods, vm_image, rc):
    """What a tcpSocket probe does to a VM pod: kubelet dials the VM's IP from the node, and over a
    macvtap VM network the connection never arrives (an i/o timeout, not a refusal: nothing answers
    at all, listening or not). The runc pod, with a server on the port, passes."""
    name = pods(rc, image_for(rc, vm_image), TCP_PROBE)
    if rc == "runc":
        cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=180s", timeout=200)
        return

    ip = wait_for(
        "the VM's IP", lambda: cluster.kubectl_json("get", "pod", name)["status"].get("podIP"), 300, 2
    )
    route = subprocess.run(["ip", "route", "get", ip], capture_output=True, text=True, timeout=30).stdout
    if " via " in route.split("\n")[0]:
        pytest.skip(
            f"this node routes the VM network through a gateway ({route.split(chr(10))[0].strip()}): "
            "what answers kubelet's connection is that network, not the VM, so the outcome says nothing "
            "about edgevirt here"
        )

    def probe_failures() -> str:
        out = cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}").stdout
        return out if "Readiness probe failed" in out else ""

    events = wait_for("a failed tcpSocket probe", probe_failures, 600, 5)
    assert re.search(rf"dial tcp {re.escape(ip)}:8080: (i/o timeout|connect: no route to host)", events), (
        events
    )
    assert "connection refused" not in events
    assert not ready(cluster, name)
