"""ExecSync and Exec of VM pods: commands in the guest, through its QEMU guest agent.

* ExecSync (``crictl exec --sync``, kubelet's exec probes): :func:`cri_shim.vm.guest_exec.run`
  (``guest-exec`` of the command with its stdout and stderr bounded in the guest, then
  ``guest-exec-status`` until it ends). On the CRI timeout the command is killed in the guest and
  the answer is DEADLINE_EXCEEDED, as containerd answers (kubelet counts it as a probe timeout).
* Exec (``kubectl exec [-i] [-t]``): a URL of the shim's streaming server whose session runs the
  command on hot-plugged virtio-serial channels (:class:`cri_shim.vm.guest_session.GuestProcess`,
  adapted here to :class:`cri_shim.exec_session.ExecProcess`).
* Before either, ``guest-ping`` with a short timeout: a VM without a running agent answers
  FAILED_PRECONDITION naming the guest agent, within PING_TIMEOUT.

Channels a killed shim left plugged are unplugged before this process first opens a session on a
domain (:meth:`GuestExec.sweep`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from ..errors import BackendError, invalid
from ..vm.errors import AgentError, AgentUnavailable, ExecTimedOut, VMError
from .public_errors import vm_error

if TYPE_CHECKING:  # the streaming server and the guest sessions are imported on the first exec
    from ..exec_session import ExecProcess
    from ..streaming import StreamingServer
    from ..vm.agent import GuestAgent
    from ..vm.guest_exec import ExecResult
    from ..vm.guest_session import GuestProcess, Guests, SessionSpec

log = logging.getLogger("edgevirt-cri.kvm")

AGENT_NEEDED = (
    "the QEMU guest agent of this VM cannot be reached ({why}): exec, exec probes and port-forward "
    "of VM pods run through it. A paused VM must be resumed first; a guest without the agent needs "
    "it installed and running (Debian/Ubuntu: qemu-guest-agent; it talks on the virtio-serial port "
    "org.qemu.guest_agent.0, which every edgevirt VM has); `kubectl attach -it` reaches the serial "
    "console without it"
)


def agent_unavailable(e: AgentUnavailable) -> BackendError:
    """FAILED_PRECONDITION naming the guest agent and how to get one."""
    why = str(e).split(": ", 1)[-1]
    return BackendError(grpc.StatusCode.FAILED_PRECONDITION, AGENT_NEEDED.format(why=why))


class GuestExec:
    """Exec and ExecSync in the guests of ``guests`` (the libvirt layer); sessions on the
    streaming server ``server()`` returns."""

    def __init__(self, guests: Guests | None, server: Callable[[], StreamingServer]) -> None:
        self.guests = guests
        self.server = server
        self._swept: set[str] = set()
        self._sweep_lock = threading.Lock()

    def agent(self, domain: str) -> GuestAgent:
        """The domain's guest agent, after it answered a ping."""
        if self.guests is None:
            raise BackendError(
                grpc.StatusCode.FAILED_PRECONDITION, "this kvm handler has no access to guest agents"
            )
        agent = self.guests.guest_agent(domain)
        try:
            agent.ping()
        except AgentUnavailable as e:
            raise agent_unavailable(e) from None
        except VMError as e:
            raise BackendError(grpc.StatusCode.UNKNOWN, f"guest agent of {domain}: {e}") from None
        return agent

    def exec_sync_reply(self, api: Any, domain: str, req: Any) -> Any:
        """The ExecSyncResponse of CRI request ``req`` on the VM ``domain``."""
        try:
            r = self.exec_sync(domain, list(req.cmd), float(req.timeout))
        except VMError as e:
            raise vm_error(e) from None
        return api.ExecSyncResponse(stdout=r.stdout, stderr=r.stderr, exit_code=r.exit_code)

    def exec_reply(self, api: Any, domain: str, req: Any) -> Any:
        """The ExecResponse (a URL) of CRI request ``req`` on the VM ``domain``."""
        if not (req.stdin or req.stdout or req.stderr):
            raise invalid("ExecRequest", "none of stdin, stdout, stderr is set", "set at least one")
        try:
            url = self.exec_url(
                domain, list(req.cmd), stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, tty=req.tty
            )
        except VMError as e:
            raise vm_error(e) from None
        return api.ExecResponse(url=url)

    def exec_sync(self, domain: str, cmd: Sequence[str], timeout: float) -> ExecResult:
        """Run ``cmd`` in the guest to its end (``timeout`` seconds; 0: none)."""
        if not cmd:
            raise BackendError(grpc.StatusCode.INVALID_ARGUMENT, "cmd: empty; name the command to run")
        from ..vm import guest_exec

        agent = self.agent(domain)
        try:
            return guest_exec.run(agent, list(cmd), timeout or None)
        except ExecTimedOut as e:
            raise BackendError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"timeout {timeout:g}s exceeded: {e}"
            ) from None
        except AgentUnavailable as e:
            raise agent_unavailable(e) from None
        except AgentError as e:
            raise BackendError(grpc.StatusCode.UNKNOWN, f"exec in the guest failed: {e}") from None

    def exec_url(
        self, domain: str, cmd: Sequence[str], *, stdin: bool, stdout: bool, stderr: bool, tty: bool
    ) -> str:
        """A one-time URL whose session runs ``cmd`` in the guest with the client's streams."""
        if not cmd:
            raise BackendError(grpc.StatusCode.INVALID_ARGUMENT, "cmd: empty; name the command to run")
        self.agent(domain)
        argv = list(cmd)

        def launch(rows: int, cols: int) -> ExecProcess:
            from ..vm.guest_session import SessionSpec

            spec = SessionSpec(
                argv, stdin=stdin, stderr="port" if stderr else "none", tty=tty, rows=rows, cols=cols
            )
            return GuestExecProcess(self.start(domain, spec))

        return self.server().exec_url(launch, domain, stdin=stdin, stdout=stdout, stderr=stderr, tty=tty)

    def start(self, domain: str, spec: SessionSpec) -> GuestProcess:
        """A started :class:`GuestProcess` (raises VMError naming what failed)."""
        from ..vm.guest_session import GuestProcess

        assert self.guests is not None
        self.sweep(domain)
        proc = GuestProcess(self.guests, domain, spec)
        proc.start()
        return proc

    def sweep(self, domain: str) -> None:
        """Once per domain and process: unplug session channels an earlier process left."""
        with self._sweep_lock:
            if domain in self._swept or self.guests is None:
                return
            try:
                for name in self.guests.session_channels(domain):
                    log.info("unplugging channel %s of %s, left by an earlier edgevirt-cri", name, domain)
                    self.guests.unplug_channel(domain, name)
            except VMError as e:
                log.warning("sweeping the session channels of %s: %s", domain, e)
            self._swept.add(domain)


class GuestExecProcess:
    """A :class:`GuestProcess` as an exec session drives it (:class:`ExecProcess`)."""

    def __init__(self, proc: GuestProcess) -> None:
        self.proc = proc

    def reader(self, stream: str) -> Callable[[], bytes] | None:
        r = self.proc.stdout if stream == "stdout" else self.proc.stderr
        return r.read if r is not None else None

    def write(self, data: bytes) -> None:
        self.proc.write(data)

    def close_stdin(self) -> None:
        self.proc.close_stdin()

    def resize(self, rows: int, cols: int) -> None:
        self.proc.resize(rows, cols)

    def wait(self, stop: threading.Event) -> int | str | None:
        from ..vm.guest_scripts import SETUP_FAILED

        try:
            st = self.proc.wait(stop)
        except VMError as e:
            return f"the guest agent lost track of the command: {e}"
        if st is None:
            return None
        marked = self.proc.stdout is not None and self.proc.stdout.complete
        if st.shell_exit_code == SETUP_FAILED and not marked and st.stderr:
            return st.stderr.decode(errors="replace").strip()  # the session script's own failure
        return st.shell_exit_code

    def close(self) -> None:
        self.proc.close()
