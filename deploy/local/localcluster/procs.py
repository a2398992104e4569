"""Background processes with pid files: start detached, recognise our own (pid + start time, so a
recycled pid is never mistaken for ours), stop by pid with a grace period."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def _start_time(pid: int) -> int | None:
    """The kernel's start time of a process (clock ticks since boot), None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces, so split after its closing paren.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


@dataclass
class Process:
    """One supervised component process, described by its pid file and log file."""

    name: str
    pidfile: Path
    logfile: Path

    def read(self) -> dict | None:
        try:
            return json.loads(self.pidfile.read_text())
        except (OSError, ValueError):
            return None

    def pid(self) -> int | None:
        """The pid if the process recorded in the pid file is still that same process."""
        rec = self.read()
        if not rec:
            return None
        pid = int(rec["pid"])
        recorded = rec.get("start_time")
        return pid if recorded is not None and _start_time(pid) == recorded else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Start argv in its own session, output appended to the log file, and record its pid."""
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        with open(self.logfile, "ab", buffering=0) as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                close_fds=True,
            )
        tmp = self.pidfile.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": proc.pid, "start_time": _start_time(proc.pid), "argv": argv}))
        tmp.replace(self.pidfile)
        return proc.pid

    def exited_early(self) -> bool:
        """True when a pid file exists but its process is gone (crashed or killed)."""
        return self.pidfile.exists() and not self.running()

    def stop(self, grace: float = 10.0) -> bool:
        """SIGTERM the process group, SIGKILL after `grace` seconds; remove the pid file.
        Returns True if a live process was stopped."""
        pid = self.pid()
        stopped = False
        if pid is not None:
            stopped = True
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _start_time(pid) is not None:
                time.sleep(0.1)
            if _start_time(pid) is not None:
                _signal_group(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and _start_time(pid) is not None:
                    time.sleep(0.05)
        self.pidfile.unlink(missing_ok=True)
        return stopped

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process's group (its children too: shims, helpers), then the process itself."""
    for send in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(pid, sig)


def wait_for(what: str, check, timeout: float, proc: Process | None = None, interval: float = 0.25):
    """Poll check() until it returns truthy; fail with the component's log tail on timeout or if the
    component's process died meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception:  # a check may raise while the thing warms up
            pass
        if proc is not None and proc.exited_early():
            raise RuntimeError(f"{what}: {proc.name} exited; last lines of {proc.logfile}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            tail = f"\nlast lines of {proc.logfile}:\n{proc.tail()}" if proc else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(interval)
