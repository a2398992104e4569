"""Exec, ExecSync and PortForward of VM pods with crictl against a private edgevirt-cri of this checkout
(the cluster's kvm backend options: libvirtd, the VM network, the registry holding the test disk,
whose guest runs qemu-ga):

* ``crictl exec --sync``: the guest's kernel, exit codes, stderr; ``--timeout`` kills a command that
  runs too long (DEADLINE_EXCEEDED) and nothing of it stays in the guest.
* ``crictl exec -i``: stdin through, binary-clean (a tar stream unpacked in the guest, as kubectl cp);
  ``crictl exec -it``: an interactive shell on a pty, its window size, its exit code.
* ``crictl port-forward``: busybox httpd in the guest answers through it; a closed port is reported.
* a guest booted without its agent: exec answers FAILED_PRECONDITION naming the guest agent, at once.
* afterwards no session channel stays plugged into the domain.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import select
import subprocess
import tarfile
import time
import urllib.request
import uuid
import xml.etree.ElementTree as ET

import pytest
from helpers.ptys import PtyClient
from helpers.vm_env import connection
from helpers.waiting import wait_for
from test_cri_kvm import PrivateKvmShim, container_json

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def cri(cluster):
    p = PrivateKvmShim(cluster)
    try:
        yield p.start()
    finally:
        for sid in p("pods", "-q", check=False).stdout.split():
            p("rmp", "-f", sid, check=False)
        print(p.shim.log.read_text()[-4000:])
        p.shim.close()
        p.containerd.close()


def boot_vm(cri, tmp_path, vm_image: str, annotations: dict | None = None) -> tuple[str, str]:
    """(sandbox id, container id) of a running VM pod whose guest is up."""
    name = f"e2e-exec-{uuid.uuid4().hex[:6]}"
    pod = {
        "metadata": {"name": name, "namespace": "e2e", "uid": str(uuid.uuid4()), "attempt": 0},
        "log_directory": str(tmp_path / "pods" / name),
        "annotations": annotations or {},
        "linux": {},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(pod))
    sid = cri("runp", "--runtime", "kvm", str(tmp_path / f"{name}.json")).stdout.strip()
    cid = cri(
        "create", sid, str(container_json(tmp_path, vm_image)), str(tmp_path / f"{name}.json")
    ).stdout.strip()
    cri("start", cid)
    wait_for("the guest to come up", lambda: "EDGEVIRT-GUEST: up" in cri("logs", cid).stdout, 300, 2)
    return sid, cid


@pytest.fixture(scope="module")
def vm(cri, vm_image, tmp_path_factory):
    sid, cid = boot_vm(cri, tmp_path_factory.mktemp("vm"), vm_image)
    # the agent starts with the guest; libvirt connects once it opened its port
    wait_for(
        "the guest agent", lambda: cri("exec", "--sync", cid, "true", check=False).returncode == 0, 120, 1
    )
    try:
        yield sid, cid
    finally:
        cri("rmp", "-f", sid, check=False)


def session_channels(cid: str) -> list[str]:
    with connection() as conn:
        xml = conn.lookupByName(f"edgevirt-{cid[:20]}").XMLDesc(0)
    return [
        t.get("name", "")
        for t in ET.fromstring(xml).iterfind("devices/channel/target")
        if "edgevirt" in t.get("name", "")
    ]


def crictl_argv(cri) -> list[str]:
    return [cri.crictl.binary, "--config", "/dev/null", "-r", cri.shim.endpoint, "-i", cri.shim.endpoint]


def test_exec_sync_prints_the_guests_kernel_and_keeps_exit_codes(cri, vm):
    _sid, cid = vm
    r = cri("exec", "--sync", cid, "cat", "/proc/version")
    assert r.stdout.startswith("Linux version ")
    assert "console=ttyS0" in cri("exec", "--sync", cid, "cat", "/proc/cmdline").stdout  # the guest's
    # crictl (1.34) exits 1 and names the command's exit code: "... exited with 3: <stderr>"
    r = cri("exec", "--sync", cid, "sh", "-c", "echo to-stderr >&2; exit 3", check=False)
    assert r.returncode != 0 and "exited with 3" in r.stderr and "to-stderr" in r.stderr + r.stdout, r
    r = cri("exec", "--sync", cid, "no-such-command", check=False)
    assert r.returncode != 0 and "exited with 127" in r.stderr and "not found" in r.stderr + r.stdout, r


def test_exec_sync_timeout_kills_a_command_that_runs_too_long(cri, vm):
    _sid, cid = vm
    t0 = time.monotonic()
    r = cri(
        "exec", "--sync", "--timeout", "3", cid, "sh", "-c", "sleep 600 & sleep 601; echo never", check=False
    )
    took = time.monotonic() - t0
    assert r.returncode != 0 and "DeadlineExceeded" in r.stderr and "never" not in r.stdout, r
    assert took < 60, f"the timeout of 3 s took {took:.0f} s"
    ps = cri("exec", "--sync", cid, "ps", "-o", "args").stdout
    others = [line for line in ps.splitlines() if "ps -o args" not in line]  # not this ps's own wrapper
    assert not [line for line in others if "sleep 60" in line or "edgevirt-exec" in line], ps


def test_exec_i_carries_stdin_binary_clean(cri, vm):
    _sid, cid = vm
    r = subprocess.run(
        [*crictl_argv(cri), "exec", "-i", cid, "cat"],
        input=b"through the guest\n",
        capture_output=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout == b"through the guest\n", r
    # kubectl cp's way: a tar stream on stdin, unpacked in the guest
    payload = bytes(range(256)) * 4096  # 1 MiB of every byte value
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("blob.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    r = subprocess.run(
        [*crictl_argv(cri), "exec", "-i", cid, "tar", "xf", "-", "-C", "/tmp"],
        input=buf.getvalue(),
        capture_output=True,
        timeout=300,
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    digest = cri("exec", "--sync", cid, "sha256sum", "/tmp/blob.bin").stdout.split()[0]
    assert digest == hashlib.sha256(payload).hexdigest()
    r = subprocess.run(
        [*crictl_argv(cri), "exec", "-i", cid, "sh", "-c", "cat >/dev/null; exit 9"],
        input=b"x",
        capture_output=True,
        timeout=120,
    )
    # crictl (1.34) exits 1 and names the remote exit code
    assert r.returncode != 0 and b"command terminated with exit code 9" in r.stderr, r


def test_exec_it_drives_an_interactive_shell(cri, vm):
    _sid, cid = vm
    client = PtyClient([*crictl_argv(cri), "exec", "-it", cid, "sh"], rows=33, cols=101)
    try:
        client.expect("# ")
        client.type("stty size; echo sum=$((40+2))\r")
        client.expect("sum=42")
        assert "33 101" in client.text()
        client.type("exit 4\r")
        assert client.wait(60) != 0  # crictl (1.34) exits 1 and names the remote exit code
        assert "exit code 4" in client.text(), client.text()[-500:]
    finally:
        client.close()


def test_port_forward_reaches_a_server_in_the_guest(cri, vm):
    sid, cid = vm
    cri("exec", "--sync", cid, "sh", "-c", "mkdir -p /tmp/www && echo page-from-guest > /tmp/www/index.html")
    cri("exec", "--sync", cid, "httpd", "-p", "8080", "-h", "/tmp/www")
    pf = subprocess.Popen(
        [*crictl_argv(cri), "port-forward", sid, ":8080"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert select.select([pf.stdout], [], [], 60)[0], "crictl port-forward said nothing in 60 s"
        line = pf.stdout.readline()
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert m, f"crictl port-forward said {line!r}"
        for _ in range(2):  # two connections over the same session
            with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/index.html", timeout=60) as resp:
                assert resp.read() == b"page-from-guest\n"
    finally:
        pf.terminate()
        pf.wait(10)
    pf = subprocess.Popen(
        [*crictl_argv(cri), "port-forward", sid, ":8099"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert select.select([pf.stdout], [], [], 60)[0], "crictl port-forward said nothing in 60 s"
        port = re.search(r"127\.0\.0\.1:(\d+)", pf.stdout.readline()).group(1)  # type: ignore[union-attr]
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60).read()
    finally:
        pf.terminate()
        _, err = pf.communicate(timeout=10)
    assert "Connection refused" in err, err
    cri("exec", "--sync", cid, "sh", "-c", "kill $(pidof httpd)")
    wait_for("the sessions' channels to be unplugged", lambda: session_channels(cid) == [], 30, 1)
    assert "edgevirt-session" not in cri("exec", "--sync", cid, "ps", "-o", "args").stdout


def test_a_guest_without_agent_fails_fast_naming_it(cri, vm_image, tmp_path):
    sid, cid = boot_vm(
        cri, tmp_path, vm_image, {"edgevirt.io/cloud-init-user-data": "# edgevirt.agent: off\n"}
    )
    try:
        logs = cri("logs", cid).stdout
        assert "EDGEVIRT-GUEST: agent off" in logs, logs
        t0 = time.monotonic()
        r = cri("exec", "--sync", cid, "true", check=False)
        assert time.monotonic() - t0 < 20
        assert r.returncode != 0 and "FailedPrecondition" in r.stderr and "QEMU guest agent" in r.stderr, r
        r = cri("exec", "-i", cid, "sh", check=False)
        assert r.returncode != 0 and "QEMU guest agent" in r.stderr, r
    finally:
        cri("rmp", "-f", sid, check=False)
