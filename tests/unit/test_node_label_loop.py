"""The labeller's long-lived parent (deploy/images/label-loop.sh, run by busybox sh as in the image):
passes as children at the interval, sooner after a failure, a pass that runs over killed, usage errors
named, ended by a signal at once between passes and after the pass under way otherwise; and the image
build ships it where the labeller DaemonSet runs it."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO

pytestmark = pytest.mark.timeout(120)
SCRIPT = REPO / "deploy/images/label-loop.sh"
BUSYBOX = Path("/bin/busybox")
sys.path.insert(0, str(REPO / "deploy/images"))

import build_edgevirt_image  # noqa: E402

needs_busybox = pytest.mark.skipif(
    not BUSYBOX.exists(), reason="/bin/busybox is missing here (Debian: busybox-static; the image has it)"
)


def start(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BUSYBOX), "sh", str(SCRIPT), *args], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )


def pass_that_marks(tmp_path: Path, body: str = "exit 0") -> list[str]:
    """A pass: a sh that appends its start time (the uptime's seconds) to tmp_path/passes, then runs
    ``body``."""
    return ["sh", "-c", f'read up _ < /proc/uptime; echo "$up" >> {tmp_path / "passes"}; {body}']


def passes(tmp_path: Path) -> list[float]:
    f = tmp_path / "passes"
    return [float(x) for x in f.read_text().split()] if f.exists() else []


def wait_passes(tmp_path: Path, n: int, timeout: float = 30) -> list[float]:
    deadline = time.monotonic() + timeout
    while len(passes(tmp_path)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    got = passes(tmp_path)
    assert len(got) >= n, got
    return got


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
        return code, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@needs_busybox
def test_the_interval_after_a_pass_and_the_retry_after_a_failure(tmp_path):
    # passes fail while tmp_path/fail exists: retry 0.2 s; then succeed: interval 1.5 s
    (tmp_path / "fail").touch()
    body = f"[ ! -e {tmp_path / 'fail'} ]"
    proc = start(tmp_path, "--interval", "1.5", "--retry", "0.2", "--", *pass_that_marks(tmp_path, body))
    try:
        wait_passes(tmp_path, 3)
        (tmp_path / "fail").unlink()
        got = wait_passes(tmp_path, 6, timeout=60)
    finally:
        code, err = stop(proc)
    gaps = [b - a for a, b in itertools.pairwise(got)]
    assert all(g < 1.2 for g in gaps[:2]), gaps  # after failures: the retry
    assert all(g >= 1.4 for g in gaps[-2:]), gaps  # after successes: the interval
    assert (
        code == 0
        and "the pass failed (exit 1)" in err
        and f"stopped after {len(passes(tmp_path))} passes" in err
    )


@needs_busybox
def test_a_pass_that_runs_over_is_killed_and_one_that_cannot_run_fails(tmp_path):
    t0 = time.monotonic()
    proc = start(
        tmp_path, "--pass-timeout", "1", "--retry", "600", "--", *pass_that_marks(tmp_path, "sleep 30")
    )
    wait_passes(tmp_path, 1)
    time.sleep(2.5)  # the pass is killed after 1 s; the loop then sleeps the retry (600 s)
    code, err = stop(proc)
    assert time.monotonic() - t0 < 15  # the 30 s pass was killed, and SIGTERM ended the retry's sleep
    assert code == 0 and "the pass ran over 1s and was killed" in err and "stopped after 1 passes" in err
    proc = start(tmp_path, "--retry", "600", "--", "/nonexistent/edgevirt-node")
    time.sleep(1)
    code, err = stop(proc)
    assert code == 0 and "cannot run /nonexistent/edgevirt-node (exit 127)" in err


@needs_busybox
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--interval", "600"], "give the pass's command after --"),
        (["--retry", "0", "--", "true"], "--retry 0: must be above 0 seconds"),
        (["--interval", "ten", "--", "true"], "--interval 'ten': give a number of seconds"),
        (["--interval"], "--interval needs a number of seconds"),
        (["--pass-timeout", "1.5", "--", "true"], "--pass-timeout 1.5: whole seconds only"),
        (["--every", "5", "--", "true"], "unknown option '--every'"),
    ],
)
def test_bad_arguments_name_the_option_and_the_fix(tmp_path, args, message):
    r = subprocess.run(
        [str(BUSYBOX), "sh", str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and message in r.stderr and "usage: label-loop" in r.stderr


@needs_busybox
def test_sigterm_between_passes_ends_the_loop_at_once(tmp_path):
    proc = start(tmp_path, "--interval", "600", "--", *pass_that_marks(tmp_path))
    wait_passes(tmp_path, 1)
    time.sleep(0.3)  # in the interval's sleep now
    t0 = time.monotonic()
    code, err = stop(proc)
    assert time.monotonic() - t0 < 5 and code == 0 and "stopped after 1 passes" in err
    assert len(passes(tmp_path)) == 1


@needs_busybox
def test_sigterm_during_a_pass_waits_for_the_pass(tmp_path):
    done = tmp_path / "done"
    proc = start(tmp_path, "--interval", "600", "--", *pass_that_marks(tmp_path, f"sleep 2; touch {done}"))
    wait_passes(tmp_path, 1)
    code, err = stop(proc)  # the pass is under way: it finishes, then the loop ends
    assert code == 0 and done.exists() and "stopped after 1 passes" in err


@needs_busybox
def test_the_loop_keeps_little_memory(tmp_path):
    """What stays resident on every node between passes (the Python loop it replaced: ~11 MiB RSS)."""
    proc = start(tmp_path, "--interval", "600", "--", "true")
    try:
        time.sleep(0.5)
        rollup = Path(f"/proc/{proc.pid}/smaps_rollup").read_text().split("\n")
        rss_kib = next(int(line.split()[1]) for line in rollup if line.startswith("Rss:"))
    finally:
        stop(proc)
    assert rss_kib < 4096, rss_kib


def test_the_image_ships_the_loop_where_the_labeller_runs_it():
    assert build_edgevirt_image.LABEL_LOOP_SOURCE in build_edgevirt_image.APP_CODE  # a change rebuilds it
    assert (REPO / build_edgevirt_image.LABEL_LOOP_SOURCE).resolve() == SCRIPT
    docs = list(yaml.safe_load_all((REPO / "deploy/manifests/node-daemonset.yaml").read_text()))
    labeller = next(
        d
        for d in docs
        if d and d["kind"] == "DaemonSet" and d["metadata"]["name"] == "edgevirt-node-labeller"
    )
    [container] = labeller["spec"]["template"]["spec"]["containers"]
    assert container["command"][:3] == ["/bin/busybox", "sh", "/" + build_edgevirt_image.LABEL_LOOP_PATH]
    packages = (REPO / "deploy/images/edgevirt-image.packages").read_text().split()  # the loop runs in its sh
    assert "busybox-static" in packages
    assert os.access(SCRIPT, os.R_OK)
