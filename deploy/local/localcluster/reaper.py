"""Run a daemon under a prompt reaper of orphaned processes: ``python -m localcluster.reaper -- ARGV``.

libvirtd starts each QEMU daemonized, so QEMU's parent is whichever ancestor reaps orphans: on a
real node that is systemd, which reaps the moment a process ends. These machines' PID 1 reaps
orphans only every second or two (measured: a killed orphan stays a zombie 1.2-1.6 s), and libvirtd
takes a VM for running until its QEMU is gone from the process table, so every VM that is killed or
crashes ended 1-2 s late in libvirt's eyes (its lifecycle event, kubelet's restart, a stop). This
wrapper makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``), runs ARGV as its child and
reaps every process that ends under it at once, as systemd would; it forwards SIGTERM, SIGINT and
SIGHUP to the child and exits with the child's status (QEMUs still running are then reparented
to PID 1, as they would be after a libvirtd restart anyway).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m localcluster.reaper -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    become_subreaper()
    child = os.fork()
    if child == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if pid == child:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
