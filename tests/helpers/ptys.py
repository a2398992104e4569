"""Drive an interactive client (``kubectl exec -it``, ``crictl exec -it``) through a pseudo-terminal
of its own: it sees a terminal on stdin and stdout, as when a person types. The test writes what is
typed and waits for what the remote side answers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
from collections.abc import Iterator, Sequence


class PtyClient:
    """A client process on a pty we hold the controller side of; always ``close()`` it."""

    def __init__(
        self, argv: Sequence[str], env: dict[str, str] | None = None, rows: int = 30, cols: int = 100
    ):
        self.controller, child = pty.openpty()
        fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(
            list(argv), stdin=child, stdout=child, stderr=child, env=env, start_new_session=True
        )
        os.close(child)
        self.output = b""

    def type(self, text: str) -> None:
        os.write(self.controller, text.encode())

    def expect(self, needle: str, timeout: float = 60) -> str:
        """Read until ``needle`` shows (fails naming what came instead); all output so far."""
        deadline = time.monotonic() + timeout
        while needle.encode() not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"{needle!r} not shown within {timeout:g} s; got:\n{self.text()[-2000:]}"
                )
            if select.select([self.controller], [], [], min(left, 1.0))[0]:
                try:
                    self.output += os.read(self.controller, 65536)
                except OSError:  # the client exited and its side of the pty is gone
                    if needle.encode() not in self.output:
                        raise AssertionError(
                            f"client ended before {needle!r}; got:\n{self.text()[-2000:]}"
                        ) from None
        return self.text()

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def wait(self, timeout: float = 60) -> int:
        """The client's exit code, once it ended (its remaining output is read)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            if select.select([self.controller], [], [], 0.2)[0]:
                with contextlib.suppress(OSError):
                    self.output += os.read(self.controller, 65536)
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        """End the client (our own child, by its Popen) and release the pty."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(OSError):
            os.close(self.controller)


@contextlib.contextmanager
def console_pty() -> Iterator[tuple[int, str]]:
    """(the guest side, the path) of a pty standing in for a VM's serial console: the test holds
    the master as QEMU does; the path is what an attach opens."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    try:
        yield master, path
    finally:
        with contextlib.suppress(OSError):
            os.close(master)
