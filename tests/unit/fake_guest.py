"""A fake QEMU guest agent and a fake guest for the unit tests of exec and port-forward of VM pods
(the real ones run in tests/integration/test_vm_guest_exec_in_a_guest.py).

:class:`FakeAgent` stands behind :class:`cri_shim.vm.agent.GuestAgent`'s ``send`` seam and speaks
QGA JSON: ``guest-ping``, ``guest-exec`` and ``guest-exec-status`` (a process is forgotten once its
end was reported, as qemu-ga does). What a started program does is scripted per test
(``program(argv) -> FakeProc``). It never runs anything on the host: the kill script is recognised
and only marks its target killed.

:class:`FakeGuests` adds hot-plugged channels (a unix socket per channel, in a temporary folder)
and plays the guest side of :func:`cri_shim.vm.guest_scripts.session`: it connects to the session's
ports, writes the sync bytes, runs the scripted program on them, writes the end marker.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cri_shim.vm import guest_scripts
from cri_shim.vm.agent import GuestAgent
from cri_shim.vm.errors import AgentUnavailable


@dataclass
class FakeProc:
    """A program in the fake guest: ends after ``polls`` status calls (None: never, until killed)."""

    argv: list[str]
    polls: int | None = 0
    exit_code: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    signal: int | None = None
    killed: bool = False

    @property
    def exited(self) -> bool:
        return self.killed or self.polls == 0


@dataclass
class FakeAgent:
    """qemu-ga behind the ``send`` seam."""

    program: Callable[[list[str]], FakeProc] = lambda argv: FakeProc(argv)
    down: str | None = None  # every command fails with AgentUnavailable(down)
    calls: list[dict] = field(default_factory=list)
    procs: dict[int, FakeProc] = field(default_factory=dict)
    forgotten: set[int] = field(default_factory=set)
    kills: list[int] = field(default_factory=list)
    on_session: Callable[[int, list[str]], FakeProc] | None = None
    next_pid: int = 1000
    lock: threading.Lock = field(default_factory=threading.Lock)

    def agent(self, name: str = "vm") -> GuestAgent:
        return GuestAgent(self.send, name)

    def send(self, command: str, timeout: int) -> str:
        cmd = json.loads(command)
        with self.lock:
            self.calls.append(cmd)
        if self.down is not None:
            raise AgentUnavailable(f"the guest agent of 'vm' cannot be reached: {self.down}")
        execute, args = cmd["execute"], cmd.get("arguments", {})
        if execute == "guest-ping":
            return json.dumps({"return": {}})
        if execute == "guest-exec":
            return json.dumps({"return": {"pid": self._start(args["path"], args.get("arg", []))}})
        if execute == "guest-exec-status":
            return json.dumps(self._status(args["pid"]))
        return json.dumps({"error": {"class": "CommandNotFound", "desc": f"{execute} not found"}})

    def _start(self, path: str, arg: list[str]) -> int:
        with self.lock:
            self.next_pid += 1
            pid = self.next_pid
        script = arg[1] if path == "sh" and len(arg) > 2 and arg[0] == "-c" else None
        if script == guest_scripts.KILL_TREE:
            target = int(arg[3])
            self.kills.append(target)
            if target in self.procs:
                self.procs[target].killed = True
                self.procs[target].signal = 9
            proc = FakeProc(arg)
        elif script == guest_scripts.BOUNDED_EXEC:
            limit, argv = int(arg[3]), arg[4:]
            proc = self.program(argv)
            proc.stdout, proc.stderr = proc.stdout[:limit], proc.stderr[:limit]
        elif script == guest_scripts.SESSION and self.on_session is not None:
            proc = self.on_session(pid, arg[3:])
        else:
            proc = self.program([path, *arg])
        self.procs[pid] = proc
        return pid

    def _status(self, pid: int) -> dict:
        proc = self.procs.get(pid)
        if proc is None or pid in self.forgotten:
            return {"error": {"class": "GenericError", "desc": "Invalid parameter 'pid'"}}
        if not proc.exited:
            if proc.polls is not None:
                proc.polls -= 1
            return {"return": {"exited": False}}
        self.forgotten.add(pid)
        ret: dict = {"exited": True}
        if proc.signal is not None:
            ret["signal"] = proc.signal
        else:
            ret["exitcode"] = proc.exit_code
        if proc.stdout:
            ret["out-data"] = base64.b64encode(proc.stdout).decode()
        if proc.stderr:
            ret["err-data"] = base64.b64encode(proc.stderr).decode()
        return {"return": ret}


class GuestSide:
    """The guest end of one session's ports, as the session script holds them."""

    def __init__(self, ports: dict[str, socket.socket], marker: bytes) -> None:
        self.ports, self.marker = ports, marker
        self.captured = b""  # the stderr the agent captures (flag c: port-forward's nc)

    def read_stdin(self) -> bytes:
        """One chunk of stdin, b"" at its end."""
        return self.ports["in"].recv(65536)

    def write(self, stream: str, data: bytes) -> None:
        self.ports[stream].sendall(data)

    def resizes(self) -> list[tuple[int, int]]:
        self.ports["resize"].settimeout(1)
        got = b""
        try:
            while chunk := self.ports["resize"].recv(4096):
                got += chunk
        except TimeoutError:
            pass
        return [tuple(int(x) for x in line.split()) for line in got.decode().splitlines()]  # type: ignore[misc]


#: what the fake guest runs for a session: gets the ports, returns the exit code
GuestProgram = Callable[[GuestSide, list[str]], int]


class FakeGuests:
    """The libvirt layer's guest access (cri_shim.vm.guest_session.Guests) with a fake guest."""

    def __init__(self, tmp: Path, program: GuestProgram | None = None) -> None:
        self.tmp = tmp
        self.agent = FakeAgent(on_session=self._session)
        self.program = program or (lambda side, argv: 0)
        self.listeners: dict[str, socket.socket] = {}
        self.plugged: list[str] = []
        self.unplugged: list[str] = []
        self.setup_failure: str | None = None  # the session script fails with this (exit 125)
        self.threads: list[threading.Thread] = []
        self.leftover: list[str] = []  # channels an earlier process left (session_channels)

    # the Guests protocol
    def guest_agent(self, name: str) -> GuestAgent:
        return self.agent.agent(name)

    def plug_channel(self, name: str, port_name: str) -> str:
        path = self.tmp / port_name
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(1)
        self.listeners[port_name] = s
        self.plugged.append(port_name)
        return str(path)

    def unplug_channel(self, name: str, port_name: str) -> bool:
        s = self.listeners.pop(port_name, None)
        if port_name in self.leftover:
            self.leftover.remove(port_name)
            self.unplugged.append(port_name)
            return True
        if s is None:
            return False
        s.close()
        (self.tmp / port_name).unlink(missing_ok=True)
        self.unplugged.append(port_name)
        return True

    def session_channels(self, name: str) -> list[str]:
        return list(self.leftover) + list(self.listeners)

    # the guest side of a session
    def _session(self, pid: int, args: list[str]) -> FakeProc:
        prefix, marker, flags, _ttycmd, *argv = args
        proc = FakeProc(argv, polls=None)
        if self.setup_failure is not None:
            proc.polls, proc.exit_code, proc.stderr = (
                0,
                guest_scripts.SETUP_FAILED,
                self.setup_failure.encode(),
            )
            return proc
        t = threading.Thread(target=self._run, args=(proc, prefix, marker, flags, argv), daemon=True)
        self.threads.append(t)
        t.start()
        return proc

    def _run(self, proc: FakeProc, prefix: str, marker: str, flags: str, argv: list[str]) -> None:
        wanted = {"o": "out", "i": "in", "e": "err", "r": "resize"}
        ports: dict[str, socket.socket] = {}
        for flag, stream in wanted.items():
            if flag in flags:
                conn, _ = self.listeners[f"{prefix}.{stream}"].accept()
                ports[stream] = conn
        for stream in ("in", "resize"):
            if stream in ports:
                ports[stream].sendall(b".")  # the sync byte
        side = GuestSide(ports, marker.encode())
        code = self.program(side, argv)
        for stream in ("out", "err"):
            if stream in ports:
                with contextlib.suppress(OSError):  # the host closed the session already
                    ports[stream].sendall(marker.encode())
        proc.exit_code, proc.stderr, proc.polls = code, side.captured, 0
