"""The labeller's long-lived parent (cri_shim.node.label_loop): passes as children at the interval,
sooner after a failure, bounded, ended by a signal; the parent itself imports the standard library
only (what stays resident on every node between passes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from helpers import REPO

from cri_shim.node import label_loop

pytestmark = pytest.mark.timeout(120)


def test_a_pass_is_a_child_whose_exit_code_decides():
    assert label_loop.run_pass(["true"]) is True
    assert label_loop.run_pass(["false"]) is False
    assert label_loop.run_pass(["/nonexistent/edgevirt-node"]) is False
    t0 = time.monotonic()
    assert label_loop.run_pass(["sleep", "30"], timeout=0.5) is False  # killed, counted as failed
    assert time.monotonic() - t0 < 10


def test_the_interval_after_a_pass_and_the_retry_after_a_failure():
    results = iter([True, False, True])
    waits: list[float] = []

    class Stop(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(timeout or 0.0)
            if len(waits) == 3:
                self.set()
            return self.is_set()

    assert label_loop.loop(lambda: next(results), Stop(), interval=600, retry=30) == 3
    assert waits == [600, 30, 600]


def test_bad_arguments_name_the_fix(capsys):
    with pytest.raises(SystemExit):
        label_loop.main(["--interval", "600"])
    assert "give the pass's command after --" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        label_loop.main(["--retry", "0", "--", "true"])
    assert "--interval and --retry must be positive" in capsys.readouterr().err


def test_sigterm_ends_the_loop_and_the_parent_imports_the_standard_library_only(tmp_path):
    marks = tmp_path / "passes"
    script = f"import sys; open({str(marks)!r}, 'a').write('x')"
    code = (
        "import sys, runpy; sys.argv = ['label-loop', '--interval', '600', '--', sys.executable, '-c', "
        f"{script!r}]; runpy.run_module('cri_shim.node.label_loop', run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (marks.exists() and marks.read_text() == "x") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marks.read_text() == "x"  # the first pass at once; the next one in 600 s
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "stopped after 1 passes" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    out = subprocess.run(
        [sys.executable, "-c", "import sys, cri_shim.node.label_loop; print(' '.join(sorted(sys.modules)))"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()  # fmt: skip
    heavy = [
        m for m in out if m.split(".")[0] in ("yaml", "kubernetes", "grpc", "google", "prometheus_client")
    ]
    assert heavy == []
    assert [m for m in out if m.startswith("cri_shim")] == [
        "cri_shim",
        "cri_shim.node",
        "cri_shim.node.label_loop",
    ]
