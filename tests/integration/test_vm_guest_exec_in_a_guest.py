"""Exec, streaming exec and port-forward in a real guest (libvirtd + QEMU, TCG here) through its QEMU
guest agent and hot-plugged virtio-serial channels: the VM layer (cri_shim.vm.guest_exec,
guest_session) and the kvm handler's pieces on top (cri_shim.kvm.exec, portforward) without CRI.

One guest (deploy/images/build_guest.py's, which runs qemu-ga) serves the tests of this module;
a second one, booted with ``edgevirt.agent=off``, shows what a VM without an agent answers.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import REPO
from helpers.vm_env import VMEnv, remove_domains, wait_console
from helpers.waiting import wait_for

from cri_shim.errors import BackendError
from cri_shim.kvm.exec import GuestExec
from cri_shim.kvm.portforward import GuestForward, forward_spec
from cri_shim.vm import DomainManager, KernelBoot, VMSpec, guest_exec
from cri_shim.vm.errors import AgentUnavailable, ExecTimedOut
from cri_shim.vm.guest_session import SessionSpec

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]


def boot(env: VMEnv, guest, name: str, cmdline: str, console: Path) -> str:
    env.manager.create(  # type: ignore[attr-defined]
        VMSpec(
            name=env.name(name),
            uid=f"uid-{name}",
            memory_mib=256,
            kernel_boot=KernelBoot(kernel=guest.kernel, initrd=guest.initrd, cmdline=cmdline),
            console_log=console,
            disk_scope="pod",
        )
    )
    return wait_console(console, "EDGEVIRT-GUEST: up", 180)


def agent_answers(mgr: DomainManager, domain: str) -> bool:
    try:
        mgr.guest_agent(domain).ping()
    except AgentUnavailable:
        return False
    return True


@pytest.fixture(scope="module")
def guest_vm(libvirtd, test_guest, tmp_path_factory) -> Iterator[tuple[DomainManager, str, Path]]:
    """(manager, domain, console log) of one running guest with its agent."""
    from runtimeclass.probe import DEFAULT_CACHE, probe

    state = tmp_path_factory.mktemp("vmstate")
    mgr = DomainManager(
        state,
        domain_type=probe(cache_file=DEFAULT_CACHE).domain_type,
        wrapper_dir=REPO / ".local/state/vm-tests/bin",
    )
    env = VMEnv(manager=mgr, state_dir=state, prefix=f"evtest-{secrets.token_hex(3)}-")
    console = state / "console.log"
    try:
        text = boot(env, test_guest, "agent", "console=ttyS0", console)
        assert "EDGEVIRT-GUEST: agent /dev/vport" in text, text[-2000:]
        # qemu-ga was just started: libvirt connects once it opened its port
        wait_for("the guest agent to answer", lambda: agent_answers(mgr, env.name("agent")), 60, 0.5)
        yield mgr, env.name("agent"), console
    finally:
        remove_domains(env.prefix)
        mgr.close()


def guest_run(mgr: DomainManager, domain: str, script: str) -> str:
    r = guest_exec.run(mgr.guest_agent(domain), ["sh", "-c", script], 30)
    assert r.exit_code == 0, r
    return r.stdout.decode()


def session_scripts(mgr: DomainManager, domain: str) -> str:
    """Processes in the guest that are session or exec wrappers (none should outlive a session)."""
    return guest_run(mgr, domain, "ps -o pid,args | grep edgevirt- | grep -v grep || true")


def test_exec_sync_output_exit_codes_bounds_and_timeout(guest_vm):
    mgr, domain, _console = guest_vm
    agent = mgr.guest_agent(domain)
    r = guest_exec.run(agent, ["cat", "/proc/version"], 30)
    assert r.exit_code == 0 and r.stdout.startswith(b"Linux version ")
    r = guest_exec.run(agent, ["sh", "-c", "echo out; echo err >&2; exit 3"], 30)
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    r = guest_exec.run(agent, ["no-such-command"], 30)
    assert r.exit_code == 127 and b"not found" in r.stderr
    # 5 MiB + 3 MiB: over libvirt's 4 MiB cap on an agent reply unless bounded in the guest
    r = guest_exec.run(agent, ["sh", "-c", "head -c 5000000 /dev/zero; head -c 3000000 /dev/zero >&2"], 60)
    assert (r.exit_code, len(r.stdout), len(r.stderr)) == (
        0,
        guest_exec.OUTPUT_LIMIT,
        guest_exec.OUTPUT_LIMIT,
    )
    agent.ping()  # the agent still answers after it
    with pytest.raises(ExecTimedOut):
        guest_exec.run(agent, ["sh", "-c", "sleep 301 & sleep 302"], 2)
    # the command and what it started are gone (killed as a tree), and so are the wrappers
    assert "sleep 30" not in guest_run(mgr, domain, "ps -o args")
    assert session_scripts(mgr, domain) == ""


def test_streaming_exec_stdin_tty_resize_and_exit_code_leave_no_channel(guest_vm):
    mgr, domain, _console = guest_vm
    gx = GuestExec(mgr, lambda: None)  # type: ignore[arg-type, return-value]

    def run(
        spec: SessionSpec, stdin: list[bytes], resize: tuple[int, int] | None = None
    ) -> tuple[bytes, bytes, int]:
        proc = gx.start(domain, spec)
        outs = {"out": b"", "err": b""}

        def pump(key: str) -> None:
            r = proc.stdout if key == "out" else proc.stderr
            while r is not None and (chunk := r.read()):
                outs[key] += chunk

        threads = [threading.Thread(target=pump, args=(k,)) for k in outs]
        for t in threads:
            t.start()
        if resize:
            proc.resize(*resize)
            time.sleep(0.5)  # the guest applies it in the background; then we type
        for data in stdin:
            proc.write(data)
        if spec.stdin:
            proc.close_stdin()
        st = proc.wait()
        for t in threads:
            t.join(30)
        proc.close()
        assert st is not None
        return outs["out"], outs["err"], st.shell_exit_code

    out, err, code = run(
        SessionSpec(["sh", "-c", "cat; echo err >&2; exit 4"], stdin=True), [b"one\n", b"two\n"]
    )
    assert (out, err, code) == (b"one\ntwo\n", b"err\n", 4)
    tty = SessionSpec(["sh"], stdin=True, tty=True, rows=33, cols=101)
    out, err, code = run(tty, [b"stty size; tty\r", b"exit 6\r"], resize=(40, 120))
    assert b"40 120\r\n" in out and b"/dev/pts/" in out and err == b"" and code == 6
    out, _err, code = run(SessionSpec(["sh", "-c", "stty size"], tty=True, rows=33, cols=101), [])
    assert (out, code) == (b"33 101\r\n", 0)
    assert mgr.session_channels(domain) == []
    assert session_scripts(mgr, domain) == ""


def test_port_forward_reaches_a_server_in_the_guest_and_reports_a_refusal(guest_vm):
    mgr, domain, _console = guest_vm
    guest_run(mgr, domain, "mkdir -p /tmp/www && echo hello-from-the-guest > /tmp/www/index.html")
    guest_run(mgr, domain, "httpd -p 127.0.0.1:8080 -h /tmp/www")
    gx = GuestExec(mgr, lambda: None)  # type: ignore[arg-type, return-value]
    fwd = GuestForward(gx.start(domain, forward_spec(8080)))
    fwd.write(b"GET /index.html HTTP/1.0\r\n\r\n")
    got = b""
    while chunk := fwd.read():
        got += chunk
    assert got.startswith(b"HTTP/1.") and got.endswith(b"hello-from-the-guest\n")
    assert fwd.wait(threading.Event()) == ""
    fwd.close()
    refused = GuestForward(gx.start(domain, forward_spec(8081)))
    assert refused.read() == b""
    assert "Connection refused" in (refused.wait(threading.Event()) or "")
    refused.close()
    assert mgr.session_channels(domain) == []
    guest_run(
        mgr, domain, 'for p in /proc/[0-9]*; do [ "$(cat $p/comm)" = httpd ] && kill ${p#/proc/}; done; true'
    )


def test_a_paused_vm_and_a_guest_without_agent_fail_fast_naming_the_agent(guest_vm, test_guest, tmp_path):
    mgr, domain, _console = guest_vm
    mgr.suspend(domain)
    try:
        t0 = time.monotonic()
        with pytest.raises(AgentUnavailable):
            mgr.guest_agent(domain).ping()
        assert time.monotonic() - t0 < 5  # well under the command timeout: not a hang
    finally:
        mgr.resume(domain)
    mgr.guest_agent(domain).ping()
    # a guest booted without its agent
    env = VMEnv(manager=mgr, state_dir=tmp_path, prefix=f"evtest-{secrets.token_hex(3)}-")
    try:
        text = boot(env, test_guest, "noagent", "console=ttyS0 edgevirt.agent=off", tmp_path / "console.log")
        assert "EDGEVIRT-GUEST: agent off" in text
        with pytest.raises(BackendError) as e:
            GuestExec(mgr, lambda: None).exec_sync(env.name("noagent"), ["true"], 5)  # type: ignore[arg-type, return-value]
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "guest agent" in e.value.message
    finally:
        remove_domains(env.prefix)
