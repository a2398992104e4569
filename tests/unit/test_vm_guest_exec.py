"""The guest agent client and ExecSync in a guest, with a fake agent (fake_guest.FakeAgent); the
scripts that bound output and build a TTY's command line run under the host's /bin/sh and busybox
sh (harmless commands only: nothing here kills anything on the host). The real agent in a real
guest: tests/integration/test_vm_guest_exec_in_a_guest.py."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from fake_guest import FakeAgent, FakeProc

from cri_shim.vm import guest_exec, guest_scripts
from cri_shim.vm.agent import GuestAgent
from cri_shim.vm.errors import AgentError, AgentUnavailable, ExecTimedOut, VMError

pytestmark = pytest.mark.timeout(60)

SHELLS = [["/bin/sh"], *([["/bin/busybox", "sh"]] if shutil.which("busybox") else [])]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_agent_commands_are_qga_json_and_bad_answers_are_agent_errors():
    sent = []

    def send(cmd: str, timeout: int) -> str:
        sent.append((json.loads(cmd), timeout))
        return replies.pop(0)

    agent = GuestAgent(send, "vm1")
    replies = ['{"return": {}}', '{"return": {"pid": 42}}']
    agent.ping()
    assert agent.exec("ls", ["-l"], env=["A=1"]) == 42
    assert sent == [
        ({"execute": "guest-ping"}, 2),
        (
            {
                "execute": "guest-exec",
                "arguments": {"path": "ls", "arg": ["-l"], "capture-output": True, "env": ["A=1"]},
            },
            5,
        ),
    ]
    replies = ['{"return": {"exited": true, "signal": 9, "out-data": "aGk=", "err-truncated": true}}']
    st = agent.exec_status(42)
    assert (st.exited, st.exit_code, st.signal, st.stdout, st.stderr_truncated) == (
        True,
        None,
        9,
        b"hi",
        True,
    )
    assert st.shell_exit_code == 137
    for reply, problem in (
        ('{"error": {"class": "GenericError", "desc": "Invalid parameter pid"}}', "Invalid parameter pid"),
        ("not json", "no JSON"),
        ('{"return": {"exited": "yes"}}', "guest-exec-status with"),
    ):
        replies = [reply]
        with pytest.raises(AgentError, match=problem):
            agent.exec_status(7)
    for reply, problem in (('{"return": {"pid": 1}}', "pid 1"), ('{"return": {"pid": true}}', "pid True")):
        replies = [reply]
        with pytest.raises(AgentError, match=problem):
            agent.exec("x")
    replies = ['{"return": {"exited": false, "out-data": "%%%"}}']
    with pytest.raises(AgentError, match="not base64"):
        agent.exec_status(7)


def test_run_returns_exit_code_and_bounded_output_polling_faster_first():
    fake = FakeAgent(lambda argv: FakeProc(argv, polls=5, exit_code=3, stdout=b"o" * 100, stderr=b"e"))
    clock = FakeClock()
    r = guest_exec.run(fake.agent(), ["sh", "-c", "exit 3"], 10, limit=10, clock=clock, sleep=clock.sleep)
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"o" * 10, b"e")
    exec_call = fake.calls[0]["arguments"]
    assert exec_call["path"] == "sh" and exec_call["arg"][-4:] == ["10", "sh", "-c", "exit 3"]
    assert clock.sleeps == sorted(clock.sleeps) and clock.sleeps[0] == guest_exec.FIRST_POLL
    assert len(clock.sleeps) == 5 and fake.kills == []


def test_run_without_a_timeout_waits_and_longest_poll_is_bounded():
    fake = FakeAgent(lambda argv: FakeProc(argv, polls=40))
    clock = FakeClock()
    assert guest_exec.run(fake.agent(), ["true"], 0, clock=clock, sleep=clock.sleep).exit_code == 0
    assert max(clock.sleeps) == guest_exec.LONGEST_POLL


def test_a_timeout_kills_the_process_tree_in_the_guest_and_the_agent_forgets_it():
    fake = FakeAgent(lambda argv: FakeProc(argv, polls=None))
    clock = FakeClock()
    with pytest.raises(ExecTimedOut, match=r"timed out after 2 s and was killed"):
        guest_exec.run(fake.agent(), ["sleep", "100"], 2, clock=clock, sleep=clock.sleep)
    pid = min(fake.procs)  # the command; the kill script came after it
    assert fake.kills == [pid]
    kill = [c for c in fake.calls if c["execute"] == "guest-exec"][1]["arguments"]
    assert kill["arg"][1] == guest_scripts.KILL_TREE and kill["arg"][-1] == str(pid)
    assert kill["capture-output"] is False
    assert pid in fake.forgotten  # reaped: qemu-ga does not keep the dead process
    assert 2.0 <= clock.now - 100.0 < 2.0 + guest_exec.REAP_TIMEOUT


def test_the_agent_going_away_is_agent_unavailable_and_an_empty_command_is_refused():
    fake = FakeAgent(down="QEMU guest agent is not connected")
    with pytest.raises(AgentUnavailable, match="not connected"):
        guest_exec.run(fake.agent(), ["true"], 1)
    with pytest.raises(VMError, match="no command"):
        guest_exec.run(FakeAgent().agent(), [], 1)


def test_kill_tree_refuses_pids_below_two():
    for pid in (-1, 0, 1):
        with pytest.raises(ValueError, match="refusing"):
            guest_scripts.kill_tree(pid)
    assert guest_scripts.kill_tree(2)[1][-1] == "2"


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[-2] if len(s) > 1 else s[0])
def test_bounded_exec_cuts_each_stream_and_keeps_the_real_exit_code(shell):
    """The wrapper runs under the host's shell here with harmless commands (head, printf, exit)."""

    def wrapped(argv: list[str], limit: int) -> subprocess.CompletedProcess:
        _path, args = guest_scripts.bounded_exec(argv, limit)
        return subprocess.run([*shell, *args], capture_output=True, timeout=30)

    r = wrapped(["sh", "-c", "printf out; printf err >&2; exit 3"], 1000)
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out", b"err")
    # far more than the limit on both streams: cut, drained (no broken pipe), exit code kept
    r = wrapped(["sh", "-c", "head -c 300000 /dev/zero; head -c 200000 /dev/zero >&2; exit 0"], 1000)
    assert (r.returncode, len(r.stdout), len(r.stderr)) == (0, 1000, 1000)
    r = wrapped(["no-such-program-here"], 1000)
    assert r.returncode == 127 and b"not found" in r.stderr
    r = wrapped(["printf", "%s|", "a b", "c'd", "$HOME", "*"], 1000)
    assert r.stdout == b"a b|c'd|$HOME|*|"  # words reach the command unchanged


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[-2] if len(s) > 1 else s[0])
def test_a_tty_command_line_quotes_every_word(shell):
    line = guest_scripts.tty_command(["printf", "%s|", "a b", "c'd", "$(id)", ";", "*"], 0, 0, resize=False)
    r = subprocess.run([*shell, "-c", line], capture_output=True, timeout=30)
    assert r.stdout == b"a b|c'd|$(id)|;|*|"
    sized = guest_scripts.tty_command(["sh"], 24, 80, resize=True)
    assert sized.startswith("stty rows 24 cols 80") and "<&8" in sized and sized.endswith("exec sh")


def test_session_flags_say_which_ports_the_guest_opens():
    def flags(**kw) -> str:
        return guest_scripts.session("io.edgevirt.x", "M", ["cat"], **kw)[1][5]

    assert flags(stdin=True, stderr="port", tty=False) == "oie"
    assert flags(stdin=False, stderr="captured", tty=False) == "oc"
    assert flags(stdin=True, stderr="port", tty=True) == "oitr"  # a TTY's stderr is the terminal
    assert flags(stdin=False, stderr="none", tty=False) == "o"
