"""A StreamingServer in a process of its own, for the tests that measure its memory from outside.

Run as ``python cri_streaming_child.py [LIMITS_JSON]``: prints the base URL, then serves commands
read from stdin, one a line:

* ``attach`` - a fresh pty whose guest side echoes what it reads, upper-cased; prints a one-time
  attach URL to it (stdin, stdout, TTY).
* ``threads`` - prints the number of live threads, the echo guests' aside.

LIMITS_JSON (optional) holds keyword arguments of ``StreamingLimits``. ``ChildServer`` is the test
side: it starts the child, reads its memory from /proc and kills it if it passes a ceiling (so a
regression fails the test instead of exhausting the machine).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from cri_shim import spdy, streaming
from cri_shim.console_fanout import ConsoleFanout


def echo_guest(master: int) -> None:
    """Play the VM: echo upper-cased for the life of the process (EIO: nobody has the console
    open right now)."""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError as e:
            if e.errno != errno.EIO:
                return
            time.sleep(0.05)
            continue
        os.write(master, data.upper())


class ChildServer:
    """The child process seen from the test: its URLs, its memory (kB, from /proc/PID/status)."""

    def __init__(
        self,
        limits: dict[str, object] | None = None,
        ceiling_kb: int = 1 << 20,
        pythonpath: str | None = None,
    ) -> None:
        args = [sys.executable, str(Path(__file__).resolve())]
        if limits is not None:
            args.append(json.dumps(limits))
        repo = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": pythonpath or repo}
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ceiling_kb = ceiling_kb
        self.max_rss_kb = 0
        self.killed_at_ceiling = False
        self._stop = threading.Event()
        self._command_lock = threading.Lock()
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        assert self.base_url.startswith("http://"), f"child did not start: {self.base_url!r}"
        self._watch = threading.Thread(target=self._watchdog, daemon=True)
        self._watch.start()

    def _command(self, cmd: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._command_lock:
            try:
                self.proc.stdin.write(cmd + "\n")
                self.proc.stdin.flush()
                answer = self.proc.stdout.readline().strip()
            except OSError:
                answer = ""
        assert answer, (
            f"the child is gone (killed at the {self.ceiling_kb} kB ceiling: {self.killed_at_ceiling}, "
            f"highest resident memory seen {self.max_rss_kb} kB)"
        )
        return answer

    def attach_url(self) -> str:
        return self._command("attach")

    def threads(self) -> int:
        return int(self._command("threads"))

    def status_kb(self, field: str) -> int:
        """VmRSS (resident now) or VmHWM (the peak resident so far), in kB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def _watchdog(self) -> None:
        while not self._stop.wait(0.02):
            try:
                rss = self.status_kb("VmRSS")
            except (OSError, KeyError):
                return
            self.max_rss_kb = max(self.max_rss_kb, rss)
            if rss > self.ceiling_kb:
                self.killed_at_ceiling = True
                self.proc.kill()
                return

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._watch.join(5)

    def __enter__(self) -> ChildServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    if len(sys.argv) > 1:
        options = json.loads(sys.argv[1])
        if "frames" in options:
            options["frames"] = spdy.FrameLimits(**options["frames"])
        server = streaming.StreamingServer(limits=streaming.StreamingLimits(**options))
    else:
        server = streaming.StreamingServer()  # also what an older tree's server takes
    consoles = ConsoleFanout(streaming.open_pty)
    print(server.base_url, flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "attach":
            master, slave = os.openpty()
            path = os.ttyname(slave)
            os.close(slave)
            threading.Thread(target=echo_guest, args=(master,), name="guest", daemon=True).start()
            url = server.attach_url(
                lambda p=path: consoles.tap(p), "vm", stdin=True, stdout=True, stderr=False, tty=True
            )
            print(url, flush=True)
        elif cmd == "threads":
            print(sum(t.name != "guest" for t in threading.enumerate()), flush=True)


if __name__ == "__main__":
    main()
