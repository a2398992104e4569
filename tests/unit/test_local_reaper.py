"""deploy/local/localcluster/reaper.py: what libvirtd runs under on the local cluster. A process
orphaned under it (as libvirtd's daemonized QEMUs are) becomes its child, not PID 1's, and is
reaped the moment it ends; signals reach the wrapped command, whose exit status is the reaper's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import REPO
from helpers.waiting import wait_for

REAPER = REPO / "deploy/local/localcluster/reaper.py"


def ppid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError("no PPid")


def state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_an_orphan_is_the_reapers_child_and_reaped_when_it_ends(tmp_path):
    pidfile = tmp_path / "orphan.pid"
    # the subshell starts the sleep and exits at once: the sleep is orphaned, as a daemonized QEMU is
    cmd = f"(sleep 300 & echo $! > {pidfile}); exec sleep 300"
    reaper = subprocess.Popen([sys.executable, str(REAPER), "--", "sh", "-c", cmd])
    try:
        orphan = wait_for(
            "the orphan's pid", lambda: pidfile.exists() and pidfile.read_text().strip(), 10, 0.05
        )
        orphan = int(orphan)
        wait_for("the orphan reparented", lambda: ppid(orphan) != 0 and ppid(orphan) == reaper.pid, 10, 0.05)
        os.kill(orphan, signal.SIGKILL)
        wait_for("the killed orphan reaped (gone, not a zombie)", lambda: state(orphan) is None, 10, 0.01)
        reaper.send_signal(signal.SIGTERM)  # forwarded to the wrapped command
        assert reaper.wait(10) == 128 + signal.SIGTERM
    finally:
        reaper.kill()
        reaper.wait(10)


def test_the_wrapped_commands_exit_status_is_the_reapers():
    assert (
        subprocess.run([sys.executable, str(REAPER), "--", "sh", "-c", "exit 3"], timeout=30).returncode == 3
    )
    usage = subprocess.run([sys.executable, str(REAPER)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage:" in usage.stderr
