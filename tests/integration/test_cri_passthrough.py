"""edgevirt-cri in front of a real containerd (a private one: own root, socket and pod network), with
crictl as the client: a runc pod's whole life through the shim with the IDs containerd made,
exec (streaming URL) and logs; kill -9 of the shim with pods running and a restart that brings back
the same pods, IDs and states; containerd stopped: clear UNAVAILABLE errors naming containerd and
its socket while a second containerd backend keeps working, and recovery when it returns."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from helpers.containerd import PrivateContainerd
from helpers.shim import Shim
from helpers.waiting import wait_for

pytestmark = [pytest.mark.root, pytest.mark.cluster]

IMAGE = "docker.io/library/busybox:latest"


@pytest.fixture(scope="module")
def registry(cluster):
    """The local registry of the cluster (the private containerd pulls busybox from it)."""
    return cluster


@pytest.fixture
def ctd(registry):
    c = PrivateContainerd.create()
    try:
        yield c.start()
    finally:
        c.close()


@pytest.fixture
def shim(ctd):
    s = Shim.create(ctd.socket)
    try:
        yield s.start()
    finally:
        s.close()


def _pod_json(tmp: Path, name: str) -> Path:
    logdir = tmp / f"logs-{name}"
    logdir.mkdir()
    p = tmp / f"pod-{name}.json"
    p.write_text(
        json.dumps(
            {
                "metadata": {
                    "name": name,
                    "namespace": "edgevirt-cri-test",
                    "uid": uuid.uuid4().hex,
                    "attempt": 0,
                },
                "log_directory": str(logdir),
                "linux": {},
            }
        )
    )
    return p


def _ctr_json(tmp: Path, name: str, token: str) -> Path:
    p = tmp / f"ctr-{name}.json"
    p.write_text(
        json.dumps(
            {
                "metadata": {"name": name},
                "image": {"image": IMAGE},
                "command": ["sh", "-c", f"echo started-{token}; exec sleep 3600"],
                "log_path": f"{name}.log",
                "linux": {},
            }
        )
    )
    return p


def run_pod(client, tmp: Path, name: str, handler: str = "", puller=None) -> tuple[str, str, str]:
    """runp + create + start through `client` (a Shim or PrivateContainerd); returns (pod, ctr, token).
    The image is pulled through `puller` (default: `client`)."""
    token = uuid.uuid4().hex[:12]
    pod_cfg = _pod_json(tmp, name)
    args = ["runp"] + (["--runtime", handler] if handler else []) + [str(pod_cfg)]
    pod = client.crictl(*args).stdout.strip()
    (puller or client).crictl(
        "pull", IMAGE
    )  # a real pull from the local registry (containerd's docker.io mirror)
    ctr = client.crictl("create", pod, str(_ctr_json(tmp, name, token)), str(pod_cfg)).stdout.strip()
    client.crictl("start", ctr)
    return pod, ctr, token


def pods_json(client) -> dict[str, str]:
    items = json.loads(client.crictl("pods", "-o", "json").stdout)["items"]
    return {p["id"]: p["state"] for p in items}


def ctrs_json(client) -> dict[str, str]:
    items = json.loads(client.crictl("ps", "-a", "-o", "json").stdout)["containers"]
    return {c["id"]: c["state"] for c in items}


def test_runc_pod_lifecycle_through_the_shim(shim, ctd, tmp_path):
    pod, ctr, token = run_pod(shim, tmp_path, "life")
    # The IDs are containerd's own, unchanged; containerd runs them under runc.
    assert pods_json(ctd) == {pod: "SANDBOX_READY"}
    assert ctrs_json(ctd) == {ctr: "CONTAINER_RUNNING"}
    assert pods_json(shim) == pods_json(ctd) and ctrs_json(shim) == ctrs_json(ctd)
    info = json.loads(shim.crictl("inspectp", pod).stdout)["info"]
    assert info["runtimeType"] == "io.containerd.runc.v2"
    # Recorded as containerd's, on disk.
    assert (shim.state_dir / "sandboxes" / pod).read_text() == "containerd"
    assert (shim.state_dir / "containers" / ctr).read_text().split("\n") == ["containerd", pod]
    # logs (log path from ContainerStatus), exec through containerd's streaming URL, exec --sync.
    logs = wait_for(
        "the container's output", lambda: shim.crictl("logs", ctr).stdout, 30, 0.1, retry_on=(Exception,)
    )
    assert f"started-{token}" in logs
    assert shim.crictl("exec", ctr, "sh", "-c", "echo exec-$((6*7))").stdout.strip() == "exec-42"
    assert shim.crictl("exec", "--sync", ctr, "sh", "-c", "echo sync-$((6*7))").stdout.strip() == "sync-42"
    # A short ID (crictl prefix) still reaches the owner.
    assert ctr in shim.crictl("inspect", ctr[:13]).stdout
    # Stop and remove through the shim: gone in containerd, and the records are dropped.
    shim.crictl("stopp", pod)
    shim.crictl("rmp", pod)
    assert pods_json(ctd) == {} and ctrs_json(ctd) == {}
    assert not (shim.state_dir / "sandboxes" / pod).exists()
    assert not (shim.state_dir / "containers" / ctr).exists()
    # Idempotent, as CRI requires, even though containerd 1.6 answers NotFound here (crictl rmp
    # asks PodSandboxStatus first, so only stopp reaches StopPodSandbox for a removed pod).
    assert ctd.crictl("stopp", pod, check=False).returncode != 0
    shim.crictl("stopp", pod)


def test_filters_are_honoured_through_the_shim(shim, tmp_path):
    pod_a, ctr_a, _ = run_pod(shim, tmp_path, "fa")
    pod_b, _, _ = run_pod(shim, tmp_path, "fb")
    shim.crictl("stopp", pod_b)
    ready = json.loads(shim.crictl("pods", "--state", "ready", "-o", "json").stdout)["items"]
    assert [p["id"] for p in ready] == [pod_a]
    named = json.loads(shim.crictl("pods", "--name", "fb", "-o", "json").stdout)["items"]
    assert [p["id"] for p in named] == [pod_b]
    in_a = json.loads(shim.crictl("ps", "-a", "--pod", pod_a, "-o", "json").stdout)["containers"]
    assert [c["id"] for c in in_a] == [ctr_a]


def test_kill9_of_the_shim_keeps_pods_ids_and_states(shim, ctd, tmp_path):
    pod, ctr, _ = run_pod(shim, tmp_path, "k9")
    pod2, _, _ = run_pod(shim, tmp_path, "k9b")
    shim.crictl("stopp", pod2)
    before_pods, before_ctrs = pods_json(shim), ctrs_json(shim)
    shim_pids = ctd.shim_pids()
    assert shim_pids, "no containerd shim runs the pod"
    shim.kill9()
    # Nothing of the pods went away with the CRI server.
    assert pods_json(ctd) == before_pods and ctrs_json(ctd) == before_ctrs
    assert ctd.shim_pids() == shim_pids
    shim.start()  # same config, same state dir
    assert pods_json(shim) == before_pods
    assert ctrs_json(shim) == before_ctrs
    # Calls by ID still reach the owner after the restart.
    assert shim.crictl("exec", "--sync", ctr, "echo", "alive").stdout.strip() == "alive"
    shim.crictl("stopp", pod)
    shim.crictl("rmp", pod, pod2)
    assert pods_json(ctd) == {}


@pytest.fixture
def two_backends(registry):
    """Two real containerd backends behind one shim: handler "" -> containerd (A), runc -> other (B)."""
    a, b = PrivateContainerd.create(), PrivateContainerd.create()
    shim = None
    try:
        a.start()
        b.start()
        shim = Shim.create(
            a.socket,
            extra_config={
                "backends": {
                    "containerd": {"type": "containerd", "socket": str(a.socket)},
                    "other": {"type": "containerd", "socket": str(b.socket)},
                },
                "handlers": {"": "containerd", "runc": "other"},
            },
        ).start()
        yield a, b, shim
    finally:
        if shim is not None:
            shim.close()
        for c in (a, b):
            if not c.running() and c.root.exists():
                c.start()  # restore it so close() removes its pods through CRI
            c.close()


def test_containerd_stopped_fails_clearly_while_the_other_backend_works(two_backends, tmp_path):
    a, b, shim = two_backends
    pod_a, ctr_a, _ = run_pod(shim, tmp_path, "on-a")
    # The shim's ImageService goes to the default backend (A) unless ImageSpec.runtime_handler says
    # otherwise (kubelet sets it only with RuntimeClassInImageCriApi), so B's image is pulled on B.
    pod_b, ctr_b, _ = run_pod(shim, tmp_path, "on-b", handler="runc", puller=b)
    assert set(pods_json(a)) == {pod_a} and set(pods_json(b)) == {pod_b}
    listed = pods_json(shim)
    assert set(listed) == {pod_a, pod_b}
    a.stop()
    # Calls for A's pod: UNAVAILABLE, naming containerd and its socket.
    res = shim.crictl("inspectp", pod_a, check=False)
    assert res.returncode != 0
    assert "Unavailable" in res.stderr and "containerd" in res.stderr and str(a.socket) in res.stderr, (
        res.stderr
    )
    # B keeps working: exec, a new pod, and the merged list still has A's pod (its last known state).
    assert shim.crictl("exec", "--sync", ctr_b, "echo", "b-alive").stdout.strip() == "b-alive"
    pod_b2, _, _ = run_pod(shim, tmp_path, "on-b2", handler="runc", puller=b)
    assert set(pods_json(shim)) == {pod_a, pod_b, pod_b2}
    # Status names the default backend as not ready; runc (on B) is still served.
    info = json.loads(shim.crictl("info", "-o", "json").stdout)
    conds = {c["type"]: c for c in info["status"]["conditions"]}
    assert conds["RuntimeReady"]["status"] is False and "containerd" in conds["RuntimeReady"]["message"]
    assert [h.get("name", "") for h in info["runtimeHandlers"]] == ["runc"]
    # containerd returns: the shim reconnects and A's pod is there with the same ID.
    a.start()
    wait_for(
        "the shim to reach containerd again",
        lambda: shim.crictl("inspectp", pod_a, check=False).returncode == 0,
        60,
        0.1,
        retry_on=(Exception,),
    )
    assert pods_json(shim)[pod_a] == "SANDBOX_READY"
    assert shim.crictl("exec", "--sync", ctr_a, "echo", "a-back").stdout.strip() == "a-back"


def test_direct_crictl_sees_the_same_as_the_shim_for_images(shim, ctd):
    """ImageService passes through: pull through the shim, containerd has it under the same ID."""
    shim.crictl("pull", IMAGE)
    via_shim = json.loads(shim.crictl("images", "-o", "json").stdout)["images"]
    direct = json.loads(ctd.crictl("images", "-o", "json").stdout)["images"]
    assert via_shim == direct and any(IMAGE in i["repoTags"] for i in direct)
    status = json.loads(shim.crictl("inspecti", IMAGE).stdout)["status"]
    assert status["id"] in {i["id"] for i in direct}


def test_the_shim_serves_with_mode_0660(shim):
    assert oct(os.stat(shim.socket).st_mode & 0o777) == "0o660"
    v = shim.crictl("version").stdout
    assert "RuntimeName:  edgevirt" in v and "RuntimeVersion:  0.1.0" in v
