"""Unit tests of the local cluster's building blocks: pid files, mount discovery, PKI, configs."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from localcluster import configs, leftovers, pki
from localcluster.paths import Paths
from localcluster.procs import Process, wait_for


def alive(pid: int) -> bool:
    """True if pid runs (a zombie awaiting its parent's wait() counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(state=tmp_path / "state", run=tmp_path / "run")


def test_process_start_recognise_and_stop(tmp_path: Path):
    proc = Process("sleeper", tmp_path / "p.pid", tmp_path / "p.log")
    assert not proc.running() and not proc.exited_early()
    pid = proc.start(["sh", "-c", "echo hello-log; sleep 60 & wait"])
    try:
        assert proc.pid() == pid
        wait_for("log line", lambda: "hello-log" in proc.logfile.read_text(), 5)
        # The child of the process is in its group and goes with it.
        children_file = Path(f"/proc/{pid}/task/{pid}/children")
        children = wait_for("the child", lambda: children_file.read_text().split(), 5)
        assert children
        assert proc.stop(grace=5)
        assert not alive(pid)
        for c in children:  # signalled with the group; gone as soon as the kernel reaps it
            wait_for(f"child {c} of the stopped process to end", lambda c=c: not alive(int(c)), 5)
        assert not proc.pidfile.exists()
    finally:
        proc.stop(grace=1)


def test_recycled_pid_is_not_ours(tmp_path: Path):
    """A pid file whose pid now belongs to another process (other start time) is not ours."""
    proc = Process("x", tmp_path / "x.pid", tmp_path / "x.log")
    proc.pidfile.write_text(json.dumps({"pid": os.getpid(), "start_time": 1, "argv": ["x"]}))
    assert proc.pid() is None
    assert proc.exited_early()
    assert not proc.stop()  # never signals a process that is not ours
    assert Path(f"/proc/{os.getpid()}").exists()


def test_crashed_process_is_reported_with_its_log(tmp_path: Path):
    proc = Process("crasher", tmp_path / "c.pid", tmp_path / "c.log")
    proc.start(["sh", "-c", "echo boom-reason >&2; exit 3"])
    with pytest.raises(RuntimeError, match="boom-reason"):
        wait_for("never", lambda: False, 10, proc)
    proc.stop()


def test_wait_for_times_out_with_what_it_waited_for():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="the moon"):
        wait_for("the moon", lambda: False, 0.3, interval=0.05)
    assert time.monotonic() - t0 < 5


def test_mounts_under_finds_deepest_first_and_only_below_roots():
    info = "\n".join(
        f"{i} 1 0:1 / {target} rw - tmpfs tmpfs rw"
        for i, target in enumerate(
            [
                "/",
                "/srv/state",
                "/srv/state/a/b",
                "/srv/state/a",
                "/srv/stateful",
                "/run/x/y",
                "/srv/with\\040space",
            ]
        )
    )
    got = leftovers.mounts_under(Path("/srv/state"), Path("/run/x"), mountinfo=info)
    assert got == ["/srv/state/a/b", "/srv/state/a", "/run/x/y", "/srv/state"] or set(got) == {
        "/srv/state/a/b",
        "/srv/state/a",
        "/run/x/y",
        "/srv/state",
    }
    assert got.index("/srv/state/a/b") < got.index("/srv/state/a") < got.index("/srv/state")
    assert "/srv/stateful" not in got


def test_pki_is_made_once_and_verifies(paths: Paths):
    pki.ensure(paths)
    first = (paths.pki / "admin.crt").read_bytes()
    pki.ensure(paths)
    assert (paths.pki / "admin.crt").read_bytes() == first, "certificates must be generated once"
    for name in ("apiserver", "admin", "kubelet", "kubelet-serving", "controller-manager", "scheduler"):
        res = subprocess.run(
            ["openssl", "verify", "-CAfile", str(paths.pki / "ca.crt"), str(paths.pki / f"{name}.crt")],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stdout + res.stderr
    text = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", str(paths.pki / "apiserver.crt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:kubernetes.default.svc" in text
    subj = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-in", str(paths.pki / "admin.crt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "O = system:masters" in subj
    assert oct((paths.pki / "ca.key").stat().st_mode & 0o777) == "0o600"
    out = paths.state / "kc"
    pki.kubeconfig(paths, "admin", out)
    kc = yaml.safe_load(out.read_text())
    assert kc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
    assert oct(out.stat().st_mode & 0o777) == "0o600"


def test_kubelet_config_fits_these_machines(paths: Paths):
    cfg = yaml.safe_load(configs.kubelet(paths, "node-a").read_text())
    assert cfg["cgroupDriver"] == "cgroupfs"
    assert cfg["failCgroupV1"] is False and cfg["failSwapOn"] is False
    assert cfg["address"] == "127.0.0.1" and cfg["healthzBindAddress"] == "127.0.0.1"
    assert cfg["readOnlyPort"] == 0
    assert cfg["authentication"]["anonymous"]["enabled"] is False
    assert cfg["containerRuntimeEndpoint"] == f"unix://{paths.containerd_sock}"


def test_containerd_config_mirrors_registries_to_loopback(paths: Paths):
    text = configs.containerd(paths, ["/usr/lib/cni"]).read_text()
    assert "restrict_oom_score_adj = true" in text
    assert 'stream_server_address = "127.0.0.1"' in text
    assert "containerd.runtimes.kata]" in text and "containerd.runtimes.runc]" in text
    for upstream in ("docker.io", "registry.k8s.io", "quay.io"):
        hosts = (paths.etc / "containerd/certs.d" / upstream / "hosts.toml").read_text()
        assert '[host."http://127.0.0.1:5000"]' in hosts
    conflist = json.loads(configs.pod_network(paths).read_text())
    assert conflist["plugins"][0]["ipMasq"] is False
    assert conflist["plugins"][0]["ipam"]["dataDir"].startswith(str(paths.state))


def test_created_paths_ledger_removes_only_what_was_missing(paths: Paths, tmp_path: Path, monkeypatch):
    existing, created = tmp_path / "existing", tmp_path / "created"
    existing.mkdir()
    monkeypatch.setattr(leftovers.CreatedPaths, "WATCHED", (str(existing), str(created)))
    ledger = leftovers.CreatedPaths(paths)
    ledger.record_before_up()
    created.mkdir()
    (created / "f").write_text("x")
    assert ledger.remove() == [str(created)]
    assert existing.exists() and not created.exists()
