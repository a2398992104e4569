"""The labeller's long-lived parent (deploy/images/label-loop.sh, run by busybox sh as in the image):
passes as children at the interval, sooner after a failure, a pass that runs over killed, usage errors
named, ended by a signal at once between passes and after the pass under way otherwise; and the image
build ships it where the labeller DaemonSet runs it.

Each behaviour runs under two shells: busybox sh with busybox's timeout and sleep (the image's), and
the host's /bin/sh with coreutils' (LABEL_LOOP_BUSYBOX=/usr/bin/env, so ``"$bb" timeout`` is
coreutils' timeout): the script keeps to POSIX sh."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from helpers import REPO

pytestmark = pytest.mark.timeout(120)
SCRIPT = REPO / "deploy/images/label-loop.sh"
BUSYBOX = Path("/bin/busybox")
sys.path.insert(0, str(REPO / "deploy/images"))

import build_edgevirt_image  # noqa: E402
import image_rootfs  # noqa: E402

needs_busybox = pytest.mark.skipif(
    not BUSYBOX.exists(), reason="/bin/busybox is missing here (Debian: busybox-static; the image has it)"
)
#: (the shell's argv, the environment it needs) by test id
SHELLS = {
    "busybox-sh": ([str(BUSYBOX), "sh"], {}),
    "host-sh": (["/bin/sh"], {"LABEL_LOOP_BUSYBOX": "/usr/bin/env"}),
}
Start = Callable[..., subprocess.Popen[str]]


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


@pytest.fixture(
    params=[
        pytest.param("busybox-sh", marks=needs_busybox),
        pytest.param(
            "host-sh",
            marks=pytest.mark.skipif(
                not (Path("/usr/bin/env").exists() and Path("/usr/bin/timeout").exists()),
                reason="/usr/bin/env or coreutils' /usr/bin/timeout is missing here",
            ),
        ),
    ]
)
def shell(request: pytest.FixtureRequest) -> tuple[list[str], dict[str, str]]:
    return SHELLS[request.param]


@pytest.fixture
def start(tmp_path: Path, shell: tuple[list[str], dict[str, str]]) -> Iterator[Start]:
    """Starts the loop (in a session of its own); whatever is left at the end is killed, so a failed
    test leaves no loop behind that would run passes for good."""
    argv, env = shell
    procs: list[subprocess.Popen[str]] = []

    def run(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*argv, str(SCRIPT), *args],
            cwd=tmp_path,
            env={**os.environ, **env},
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            # SIGINT and SIGTERM at their defaults, as a container's first process gets them: a shell
            # cannot trap a signal ignored when it started, and a test run in the background (CI)
            # hands SIGINT down ignored
            preexec_fn=_default_signals,
        )
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):  # the loop and its sleep (a pass: its group or its own)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


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


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def running(pid: int) -> bool:
    """pid is a process not yet ended (neither gone nor a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_sleeping(proc: subprocess.Popen[str], timeout: float = 10) -> int:
    """The pid of the loop's sleep between passes, once it runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in children(proc.pid):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"sleep" in argv[:2]:
                return child
        time.sleep(0.02)
    raise AssertionError(f"no sleep under the loop {proc.pid} after {timeout}s")


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    """Signal the loop alone (as the kubelet signals a container's first process); (exit code, stderr)."""
    proc.send_signal(sig)
    code = proc.wait(20)
    return code, proc.stderr.read() if proc.stderr else ""


def test_the_interval_after_a_pass_and_the_retry_after_a_failure(tmp_path, start):
    # passes fail while tmp_path/fail exists: retry 0.2 s; then succeed: interval 1.5 s
    (tmp_path / "fail").touch()
    body = f"[ ! -e {tmp_path / 'fail'} ]"
    proc = start("--interval", "1.5", "--retry", "0.2", "--", *pass_that_marks(tmp_path, body))
    wait_passes(tmp_path, 3)
    (tmp_path / "fail").unlink()
    got = wait_passes(tmp_path, 6, timeout=60)
    code, err = stop(proc)
    gaps = [b - a for a, b in itertools.pairwise(got)]
    assert all(g < 1.2 for g in gaps[:2]), gaps  # after failures: the retry
    assert all(g >= 1.4 for g in gaps[-2:]), gaps  # after successes: the interval
    assert code == 0, err
    assert "the pass failed (exit 1)" in err
    assert f"stopped after {len(passes(tmp_path))} passes" in err


def test_a_pass_that_runs_over_is_killed_and_one_that_cannot_run_fails(tmp_path, start):
    t0 = time.monotonic()
    proc = start("--pass-timeout", "1", "--retry", "600", "--", *pass_that_marks(tmp_path, "sleep 30"))
    wait_passes(tmp_path, 1)
    wait_sleeping(proc)  # the pass was killed after 1 s; the loop sleeps the retry (600 s)
    code, err = stop(proc)
    assert time.monotonic() - t0 < 15  # the 30 s pass was killed, and SIGTERM ended the retry's sleep
    assert code == 0, err
    assert "the pass ran over 1s and was killed" in err and "stopped after 1 passes" in err
    proc = start("--retry", "600", "--", "/nonexistent/edgevirt-node")
    wait_sleeping(proc)
    code, err = stop(proc)
    assert code == 0 and "cannot run /nonexistent/edgevirt-node (exit 127)" in err, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--interval", "600"], "give the pass's command after --"),
        (
            [
                "--",
            ],
            "give the pass's command after --",
        ),
        (["--retry", "0", "--", "true"], "--retry 0: must be above 0 seconds"),
        (["--interval", "0.0", "--", "true"], "--interval 0.0: must be above 0 seconds"),
        (["--interval", "-5", "--", "true"], "--interval '-5': give a number of seconds"),
        (["--interval", "ten", "--", "true"], "--interval 'ten': give a number of seconds"),
        (["--retry", "", "--", "true"], "--retry '': give a number of seconds"),
        (["--interval"], "--interval needs a number of seconds"),
        (["--pass-timeout", "1.5", "--", "true"], "--pass-timeout 1.5: whole seconds only"),
        (["--every", "5", "--", "true"], "unknown option '--every'"),
    ],
)
def test_bad_arguments_name_the_option_and_the_fix(tmp_path, shell, args, message):
    argv, env = shell
    r = subprocess.run(
        [*argv, str(SCRIPT), *args],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and message in r.stderr and "usage: label-loop" in r.stderr, r.stderr
    assert not (tmp_path / "passes").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_signal_between_passes_ends_the_loop_at_once(tmp_path, start, sig):
    proc = start("--interval", "600", "--", *pass_that_marks(tmp_path))
    wait_passes(tmp_path, 1)
    sleeper = wait_sleeping(proc)  # in the interval's sleep now
    t0 = time.monotonic()
    code, err = stop(proc, sig)
    assert time.monotonic() - t0 < 5 and code == 0 and "stopped after 1 passes" in err, err
    assert len(passes(tmp_path)) == 1
    assert not running(sleeper)  # its sleep was ended too (a zombie at most, for init to reap)


def test_sigterm_during_a_pass_waits_for_the_pass(tmp_path, start):
    done = tmp_path / "done"
    proc = start("--interval", "600", "--", *pass_that_marks(tmp_path, f"sleep 2; touch {done}"))
    wait_passes(tmp_path, 1)
    code, err = stop(proc)  # the pass is under way: it finishes, then the loop ends
    assert code == 0 and done.exists() and "stopped after 1 passes" in err, err
    assert len(passes(tmp_path)) == 1


@needs_busybox
def test_the_loop_keeps_little_memory(tmp_path):
    """What stays resident on every node between passes, the busybox sh and its sleep: ~1.7 + 1.4 MiB
    RSS (the Python loop it replaced: ~11 MiB RSS / 6.7 MiB PSS)."""
    proc = subprocess.Popen(
        [str(BUSYBOX), "sh", str(SCRIPT), "--interval", "600", "--", "true"],
        cwd=tmp_path,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        sleeper = wait_sleeping(proc)
        rss_kib = 0
        for pid in (proc.pid, sleeper):
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            rss_kib += next(int(line.split()[1]) for line in rollup if line.startswith("Rss:"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert rss_kib < 6 * 1024, rss_kib


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
    command = container["command"]
    assert command[command.index("--") + 1 :][:3] == ["edgevirt-node", "label", "--once"]
    spec = image_rootfs.read_spec(REPO / "deploy/images/edgevirt-image.packages")
    assert "busybox-static" in spec.packages  # /bin/busybox: the loop runs in its sh


def test_the_edgevirt_layer_holds_the_loop(tmp_path, monkeypatch):
    """build_layers' edgevirt layer, written for real from stand-in wheel and macvtap client (no pip):
    the script is in it at the path the DaemonSet runs, with the macvtap client beside it."""
    monkeypatch.setattr(build_edgevirt_image.image_pydeps, "install_wheels", lambda wheels, root: None)
    monkeypatch.setattr(build_edgevirt_image.image_pydeps, "compile_bytecode", lambda root: None)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    makers = {}

    def cached_layer(cache, key, make):
        makers[key.split("-")[0]] = make
        layer = build_edgevirt_image.oci_layout.Layer(str(tmp_path / key), "sha256:0", "sha256:0", 0, 0, "")
        return layer, True

    monkeypatch.setattr(build_edgevirt_image.oci_layout, "cached_layer", cached_layer)
    wheel, native = tmp_path / "edgevirt-0-py3-none-any.whl", tmp_path / "macvtap"
    wheel.write_bytes(b"a stand-in wheel")
    native.write_bytes(b"a stand-in client")
    rootfs = tmp_path / "rootfs"
    build_edgevirt_image.build_layers(
        REPO, tmp_path, rootfs, image_rootfs.Spec(""), [], wheel, True, lambda _: None, native
    )
    layer = makers["edgevirt"](tmp_path / "edgevirt.tar.gz")
    assert build_edgevirt_image.LABEL_LOOP_PATH in layer.created_by
    with tarfile.open(layer.path) as tar:
        member = tar.getmember(build_edgevirt_image.LABEL_LOOP_PATH)
        content = tar.extractfile(member)
        assert content is not None and content.read() == SCRIPT.read_bytes()
        client = tar.extractfile(build_edgevirt_image.macvtap_static.IMAGE_PATH)
        assert client is not None and client.read() == b"a stand-in client"
