"""Processes a test started: stop one (signal, bounded wait, then SIGKILL) and find a process's children."""

from __future__ import annotations

import os
import signal
import subprocess


def stop(proc: subprocess.Popen, grace: float = 15, sig: int = signal.SIGTERM) -> int:
    """Send ``sig`` to a running ``proc``, wait up to ``grace`` s, else SIGKILL it; its exit code.
    (subprocess.TimeoutExpired if even SIGKILL does not end it within 10 s.)"""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(10)


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc; processes that end meanwhile are skipped)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return out
