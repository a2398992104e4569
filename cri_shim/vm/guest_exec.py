"""Run one command in a guest to its end through the guest agent (CRI ExecSync, exec probes).

``guest-exec`` starts the command under :func:`.guest_scripts.bounded_exec` (stdout and stderr each
cut at ``limit`` bytes inside the guest), then ``guest-exec-status`` is polled, quickly at first
(a probe's ``true`` ends within milliseconds) and less often later, until the command ended or its
timeout passed. On the timeout the command and everything it started are killed in the guest
(:func:`.guest_scripts.kill_tree`), the agent is asked once more so it forgets the process, and
:class:`.errors.ExecTimedOut` is raised: what containerd does on an ExecSync timeout (SIGKILL, then
DEADLINE_EXCEEDED, which kubelet counts as a probe timeout).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import guest_scripts
from .agent import GuestAgent
from .errors import AgentError, AgentUnavailable, ExecTimedOut, VMError

#: bytes kept of each of stdout and stderr (both base64 in one agent reply under libvirt's 10 MiB);
#: containerd keeps 16 MiB per stream of an ExecSync
OUTPUT_LIMIT = 1 << 20
#: seconds between two guest-exec-status polls: the first, the growth factor, the longest
FIRST_POLL = 0.004
POLL_GROWTH = 1.5
LONGEST_POLL = 0.1
#: seconds to wait for a killed command to be reported ended (so the agent forgets it)
REAP_TIMEOUT = 2.0


@dataclass(frozen=True)
class ExecResult:
    """How a command ended: its exit code (128 + signal when killed), what it wrote (bounded)."""

    exit_code: int
    stdout: bytes
    stderr: bytes


def run(
    agent: GuestAgent,
    argv: Sequence[str],
    timeout: float | None,
    *,
    limit: int = OUTPUT_LIMIT,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ExecResult:
    """Run ``argv`` in the guest; ``timeout`` seconds (None or 0: no limit)."""
    if not argv:
        raise VMError("no command to run")
    path, args = guest_scripts.bounded_exec(argv, limit)
    pid = agent.exec(path, args)
    deadline = clock() + timeout if timeout else None
    delay = FIRST_POLL
    while True:
        st = agent.exec_status(pid)
        if st.exited:
            return ExecResult(st.shell_exit_code, st.stdout, st.stderr)
        now = clock()
        if deadline is not None and now >= deadline:
            kill(agent, pid, clock=clock, sleep=sleep)
            raise ExecTimedOut(f"command {list(argv)!r} timed out after {timeout:g} s and was killed")
        wait = delay if deadline is None else min(delay, deadline - now)
        sleep(wait)
        delay = min(delay * POLL_GROWTH, LONGEST_POLL)


def kill(
    agent: GuestAgent,
    pid: int,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Kill process ``pid`` (started through ``agent``) and its descendants in the guest, then
    ask about it until the agent reports it ended (at most REAP_TIMEOUT), so it forgets it."""
    path, args = guest_scripts.kill_tree(pid)
    killer = agent.exec(path, args, capture_output=False)
    end = clock() + REAP_TIMEOUT
    left = {pid, killer}
    while left and clock() < end:
        for p in sorted(left):
            try:
                if agent.exec_status(p).exited:
                    left.discard(p)
            except AgentError:  # already forgotten
                left.discard(p)
            except AgentUnavailable:
                return
        if left:
            sleep(0.02)
