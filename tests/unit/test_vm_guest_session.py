"""A command in a guest on hot-plugged channels (cri_shim.vm.guest_session), with a fake guest
(fake_guest.FakeGuests: unix sockets for channels, a Python stand-in for the session script), the
end-marker reader on a socket pair, and the channel XML plug/unplug against a fake libvirt domain.
The real guest: tests/integration/test_vm_guest_exec_in_a_guest.py."""

from __future__ import annotations

import socket
import threading
import xml.etree.ElementTree as ET

import libvirt
import pytest
from fake_guest import FakeGuests, GuestSide

from cri_shim.vm import channels
from cri_shim.vm.errors import VMError
from cri_shim.vm.guest_session import GuestProcess, MarkedReader, SessionSpec

pytestmark = pytest.mark.timeout(60)
MARKER = b"\x1eedgevirt-end:0123\x1e"


def reader_over(*chunks: bytes) -> MarkedReader:
    host, guest = socket.socketpair()
    for c in chunks:
        guest.sendall(c)
    guest.close()
    return MarkedReader(host, MARKER)


def read_all(r: MarkedReader) -> list[bytes]:
    out = []
    while chunk := r.read():
        out.append(chunk)
    return out


def test_output_ends_at_the_marker_even_split_across_chunks():
    host, guest = socket.socketpair()
    r = MarkedReader(host, MARKER)
    guest.sendall(b"hello " + MARKER[:5])
    assert r.read() == b"hello "  # the marker's start is held back ...
    guest.sendall(MARKER[5:] + b"after the end")
    assert r.read() == b"" and r.complete  # ... and it was the marker
    guest.close()


def test_a_prompt_is_not_held_back_and_a_false_start_is_released():
    host, guest = socket.socketpair()
    r = MarkedReader(host, MARKER)
    guest.sendall(b"/ # ")
    assert r.read() == b"/ # "
    guest.sendall(b"x\x1e")
    assert r.read() == b"x"
    guest.sendall(b"not a marker")
    assert r.read() == b"\x1enot a marker"
    guest.close()
    assert r.read() == b"" and not r.complete  # a closed socket ends it too


def cat(side: GuestSide, argv: list[str]) -> int:
    while data := side.read_stdin():
        side.write("out", data.upper())
    side.write("err", b"done\n")
    return 7


def run(proc: GuestProcess, stdin: bytes = b"") -> tuple[bytes, bytes, int | None]:
    outs = {"out": b"", "err": b""}

    def pump(key: str, r: MarkedReader | None) -> None:
        while r is not None and (chunk := r.read()):
            outs[key] += chunk

    threads = [
        threading.Thread(target=pump, args=("out", proc.stdout)),
        threading.Thread(target=pump, args=("err", proc.stderr)),
    ]
    for t in threads:
        t.start()
    if stdin:
        proc.write(stdin)
        proc.close_stdin()
    st = proc.wait()
    for t in threads:
        t.join(10)
    proc.close()
    return outs["out"], outs["err"], st.shell_exit_code if st else None


def test_stdin_stdout_stderr_and_exit_code_then_every_channel_unplugged(tmp_path):
    g = FakeGuests(tmp_path, cat)
    proc = GuestProcess(g, "vm", SessionSpec(["cat"], stdin=True))
    proc.start()
    assert sorted(p.rsplit(".", 1)[1] for p in g.plugged) == ["err", "in", "out"]
    assert run(proc, b"hello\n") == (b"HELLO\n", b"done\n", 7)
    assert sorted(g.unplugged) == sorted(g.plugged) and not list(tmp_path.iterdir())
    assert g.agent.kills == []  # it ended by itself: nothing to kill


def test_a_tty_session_gets_a_resize_port_and_no_stderr(tmp_path):
    seen: list[tuple[int, int]] = []

    def shell(side: GuestSide, argv: list[str]) -> int:
        seen.extend(side.resizes())
        return 0

    g = FakeGuests(tmp_path, shell)
    proc = GuestProcess(g, "vm", SessionSpec(["sh"], stdin=True, tty=True, rows=24, cols=80))
    proc.start()
    assert proc.stderr is None and sorted(p.rsplit(".", 1)[1] for p in g.plugged) == ["in", "out", "resize"]
    args = next(c for c in g.agent.calls if c["execute"] == "guest-exec")["arguments"]["arg"]
    assert "stty rows 24 cols 80" in args[6]
    proc.resize(40, 120)
    proc.resize(0, 5)  # not a size: dropped
    assert run(proc) == (b"", b"", 0)
    assert seen == [(40, 120)]


def test_a_session_the_guest_cannot_set_up_fails_with_its_reason_and_leaves_nothing(tmp_path):
    g = FakeGuests(tmp_path)
    g.setup_failure = "edgevirt: the virtio-serial port io.edgevirt.x.in did not show up in the guest"
    proc = GuestProcess(g, "vm", SessionSpec(["cat"], stdin=True))
    with pytest.raises(VMError, match="could not set up the session: edgevirt: the virtio-serial port"):
        proc.start()
    assert sorted(g.unplugged) == sorted(g.plugged) and not list(tmp_path.iterdir())


def test_closing_a_running_session_kills_its_process_tree(tmp_path):
    started = threading.Event()

    def forever(side: GuestSide, argv: list[str]) -> int:
        started.set()
        while side.read_stdin():
            pass
        return 0

    g = FakeGuests(tmp_path, forever)
    proc = GuestProcess(g, "vm", SessionSpec(["sleep", "inf"], stdin=True))
    proc.start()
    assert started.wait(10)
    stop = threading.Event()
    stop.set()
    assert proc.wait(stop) is None  # the client left: no end to report
    proc.close()
    proc.close()  # idempotent
    assert g.agent.kills == [proc.pid]
    assert sorted(g.unplugged) == sorted(g.plugged)
    with pytest.raises(BrokenPipeError):
        proc.write(b"late")


def test_captured_stderr_comes_with_the_end(tmp_path):
    def refused(side: GuestSide, argv: list[str]) -> int:
        side.captured = b"nc: can't connect to remote host (127.0.0.1): Connection refused\n"
        return 1

    g = FakeGuests(tmp_path, refused)
    proc = GuestProcess(g, "vm", SessionSpec(["nc", "127.0.0.1", "9"], stdin=True, stderr="captured"))
    proc.start()
    assert proc.stderr is None and proc.stdout is not None
    assert proc.stdout.read() == b""
    st = proc.wait()
    assert st is not None and st.shell_exit_code == 1 and b"Connection refused" in st.stderr
    proc.close()


class FakeDomain:
    """The libvirt domain calls channels.py makes: live XML with the plugged channels."""

    def __init__(self, active: bool = True, fail: bool = False) -> None:
        self.active, self.fail = active, fail
        self.devices: list[ET.Element] = []
        self.detached: list[str] = []

    def isActive(self) -> bool:
        return self.active

    def attachDeviceFlags(self, xml: str, flags: int) -> None:
        assert flags == libvirt.VIR_DOMAIN_AFFECT_LIVE  # never the persistent definition
        if self.fail:
            raise libvirt.libvirtError("No free virtio-serial ports")
        ch = ET.fromstring(xml)
        name = ch.find("target").get("name")  # type: ignore[union-attr]
        ch.find("source").set("path", f"/var/lib/libvirt/qemu/channel/target/d/{name}")  # type: ignore[union-attr]
        self.devices.append(ch)

    def detachDeviceFlags(self, xml: str, flags: int) -> None:
        name = ET.fromstring(xml).find("target").get("name")  # type: ignore[union-attr]
        self.detached.append(name)
        self.devices = [d for d in self.devices if d.find("target").get("name") != name]  # type: ignore[union-attr]

    def XMLDesc(self, flags: int) -> str:
        root = ET.Element("domain")
        devs = ET.SubElement(root, "devices")
        agent = ET.SubElement(devs, "channel", {"type": "unix"})
        ET.SubElement(agent, "target", {"type": "virtio", "name": "org.qemu.guest_agent.0"})
        devs.extend(self.devices)
        return ET.tostring(root, encoding="unicode")


def test_channels_are_plugged_live_found_by_name_and_unplugged():
    dom = FakeDomain()
    path = channels.plug("vm", dom, "io.edgevirt.ab12cd34.in")  # type: ignore[arg-type]
    assert path.endswith("/io.edgevirt.ab12cd34.in")
    assert channels.session_channels(dom.XMLDesc(0)) == ["io.edgevirt.ab12cd34.in"]  # not the agent's
    assert channels.unplug("vm", dom, "io.edgevirt.ab12cd34.in") is True  # type: ignore[arg-type]
    assert channels.unplug("vm", dom, "io.edgevirt.ab12cd34.in") is False  # type: ignore[arg-type]
    assert channels.unplug("vm", FakeDomain(active=False), "io.edgevirt.x.in") is False  # type: ignore[arg-type]
    for bad in ("org.qemu.guest_agent.0", "io.edgevirt.../x", "io.edgevirt.A B.in"):
        with pytest.raises(VMError, match="is not of the form"):
            channels.plug("vm", dom, bad)  # type: ignore[arg-type]
    with pytest.raises(VMError, match="No free virtio-serial ports"):
        channels.plug("vm", FakeDomain(fail=True), "io.edgevirt.ab.out")  # type: ignore[arg-type]
