"""The attach client helper of the e2e tests: type a line into a VM's serial console through a real
attach client (crictl attach -i, kubectl attach -i, kubectl vm console) and collect what it shows."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time


def attach_and_type(cmd: list[str], line: str, timeout: float = 60, env: dict | None = None) -> str:
    """Run an attach client (crictl/kubectl attach -i), type ``line`` until the guest says it back
    (the first line may arrive before the bridge is up), then detach (kill the client). Its output."""
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    os.set_blocking(proc.stdout.fileno(), False)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and f"echo {line}".encode() not in out and proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(f"{line}\n".encode())
                proc.stdin.flush()
            time.sleep(2)
            out += proc.stdout.read() or b""
    finally:
        proc.kill()
        proc.wait(10)
    out += proc.stdout.read() or b""
    return out.decode(errors="replace")
