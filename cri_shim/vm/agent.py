"""The QEMU guest agent (qemu-ga) of one VM: the few QGA commands edgevirt sends, typed.

Every command goes through one function, ``send(command_json, timeout_s) -> reply_json`` (in
production :meth:`.connection.Connection.agent_command` bound to the domain, which maps libvirt's
errors to :class:`.errors.AgentUnavailable` / :class:`.errors.AgentError`), so tests can put a fake
agent behind it. Commands used:

* ``guest-ping``: is an agent there? (a short timeout: an absent agent must fail fast)
* ``guest-exec``: start a program; answers its pid at once (the agent does not wait)
* ``guest-exec-status``: has it ended, its exit code or signal, and (with ``capture-output``) what
  it wrote. The agent forgets a pid once it reported it ended.

The agent answers one command at a time and libvirt caps a reply at 10 MiB (a bigger one breaks
the agent connection until the VM restarts): whatever a guest program writes is bounded inside the
guest before it reaches the agent (:mod:`.guest_scripts`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import AgentError

#: seconds for guest-ping: an agent that does not answer this fast is not usable for exec
PING_TIMEOUT = 2
#: seconds for guest-exec and guest-exec-status (both answer at once in a healthy guest)
COMMAND_TIMEOUT = 5

#: sends one QGA command (JSON) with a timeout in seconds, returns the reply (JSON)
Send = Callable[[str, int], str]


@dataclass(frozen=True)
class ExecStatus:
    """What ``guest-exec-status`` says of one process."""

    exited: bool
    exit_code: int | None = None
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def shell_exit_code(self) -> int:
        """The exit code as a shell reports it: 128 + the signal for a killed process."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 255


class GuestAgent:
    """The guest agent of domain ``name``, reached through ``send``."""

    def __init__(self, send: Send, name: str) -> None:
        self._send = send
        self.name = name

    def command(
        self, execute: str, arguments: dict[str, Any] | None = None, timeout: int = COMMAND_TIMEOUT
    ) -> Any:
        """Run one QGA command; its ``return`` value. A reply that is not QGA JSON is an AgentError."""
        cmd: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            cmd["arguments"] = arguments
        reply = self._send(json.dumps(cmd), timeout)
        try:
            parsed = json.loads(reply)
        except ValueError:
            raise AgentError(f"the guest agent of {self.name!r} answered {execute} with no JSON") from None
        if not isinstance(parsed, dict) or "return" not in parsed:
            err = parsed.get("error", {}) if isinstance(parsed, dict) else {}
            desc = err.get("desc", "no return value") if isinstance(err, dict) else "no return value"
            raise AgentError(f"the guest agent of {self.name!r} refused {execute}: {desc}")
        return parsed["return"]

    def ping(self, timeout: int = PING_TIMEOUT) -> None:
        """Raise (AgentUnavailable) unless the agent answers within ``timeout`` seconds."""
        self.command("guest-ping", timeout=timeout)

    def exec(
        self,
        path: str,
        args: Sequence[str] = (),
        *,
        capture_output: bool = True,
        env: Sequence[str] = (),
    ) -> int:
        """Start ``path`` with ``args`` in the guest (the agent searches PATH); its pid."""
        arguments: dict[str, Any] = {"path": path, "arg": list(args), "capture-output": capture_output}
        if env:
            arguments["env"] = list(env)
        ret = self.command("guest-exec", arguments)
        pid = ret.get("pid") if isinstance(ret, dict) else None
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
            raise AgentError(f"the guest agent of {self.name!r} answered guest-exec with pid {pid!r}")
        return pid

    def exec_status(self, pid: int) -> ExecStatus:
        """The state of process ``pid`` started by :meth:`exec`."""
        ret = self.command("guest-exec-status", {"pid": pid})
        if not isinstance(ret, dict) or not isinstance(ret.get("exited"), bool):
            raise AgentError(f"the guest agent of {self.name!r} answered guest-exec-status with {ret!r}")
        return ExecStatus(
            exited=ret["exited"],
            exit_code=_int_or_none(ret.get("exitcode")),
            signal=_int_or_none(ret.get("signal")),
            stdout=self._data(ret.get("out-data")),
            stderr=self._data(ret.get("err-data")),
            stdout_truncated=bool(ret.get("out-truncated")),
            stderr_truncated=bool(ret.get("err-truncated")),
        )

    def _data(self, value: object) -> bytes:
        if value is None:
            return b""
        try:
            return base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise AgentError(f"the guest agent of {self.name!r} sent output that is not base64") from None


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
