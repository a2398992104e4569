"""The console fan-out against a real pty standing in for a VM's serial console: every attached
tap sees all the output written while it is attached (two readers of one pty would split it), a
re-attach never competes with a stale reader, a tap that is not read is bounded, and the pty is
closed when the last tap leaves or after the guest side went away."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest
from helpers.ptys import console_pty

from cri_shim.console_fanout import ConsoleFanout
from cri_shim.streaming import open_pty


@pytest.fixture
def console():
    """(the guest side, the path): a pty whose master plays the VM (QEMU holds the master)."""
    with console_pty() as c:
        yield c


def read_until(tap, want: bytes, timeout: float = 5) -> bytes:
    got, deadline = b"", time.monotonic() + timeout
    while want not in got and time.monotonic() < deadline:
        chunk = tap.read(0.2)
        if chunk == b"":
            break
        got += chunk or b""
    return got


def guest_says(master: int, data: bytes) -> None:
    for b in data:  # one byte at a time, as a UART does
        os.write(master, bytes([b]))
        time.sleep(0.001)


def opened_fds(path: str) -> int:
    """How many of this process's descriptors are open on ``path``."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}") == path
    return n


def test_every_tap_sees_every_byte_and_input_from_any_reaches_the_guest(console):
    master, path = console
    fan = ConsoleFanout(open_pty)
    a, b = fan.tap(path), fan.tap(path)
    assert opened_fds(path) == 1  # one reader of the pty for both
    guest_says(master, b"EDGEVIRT-GUEST: echo x\n")
    assert b"EDGEVIRT-GUEST: echo x" in read_until(a, b"echo x")
    assert b"EDGEVIRT-GUEST: echo x" in read_until(b, b"echo x")
    b.write(b"typed\r", threading.Event())
    assert os.read(master, 100).startswith(b"typed")
    a.close()
    b.close()
    fan.close()


def test_a_reattach_while_the_old_tap_is_still_open_loses_nothing(console):
    """What a killed `kubectl attach` followed at once by another does: the old session has not
    noticed its client left yet when the new one attaches and the guest answers."""
    master, path = console
    fan = ConsoleFanout(open_pty)
    for _ in range(20):
        old = fan.tap(path)
        new = fan.tap(path)
        closer = threading.Thread(target=lambda old=old: (time.sleep(0.002), old.close()))
        closer.start()
        guest_says(master, b"EDGEVIRT-GUEST: echo second-attach\n")
        got = read_until(new, b"second-attach\n")
        closer.join()
        assert got.startswith(b"EDGEVIRT-GUEST: echo second-attach"), got
        new.close()
    fan.close()


def test_the_pty_closes_with_the_last_tap_and_opens_again_for_the_next(console):
    master, path = console
    fan = ConsoleFanout(open_pty)
    first = fan.tap(path)
    first.close()
    deadline = time.monotonic() + 5
    while opened_fds(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert opened_fds(path) == 0, "the pty stays open with nobody attached"
    again = fan.tap(path)
    guest_says(master, b"hello\n")
    assert b"hello" in read_until(again, b"hello")
    again.close()
    fan.close()


def test_a_tap_nobody_reads_ends_at_its_bound_and_the_others_go_on(console):
    master, path = console
    fan = ConsoleFanout(open_pty, max_behind=4096)
    idle, reader = fan.tap(path), fan.tap(path)
    for _ in range(10):
        os.write(master, b"y" * 1000)
        assert read_until(reader, b"y" * 1000)
    assert idle.read(0) == b""
    assert idle.ended and "4096 bytes behind" in idle.ended
    os.write(master, b"still\n")
    assert b"still" in read_until(reader, b"still")
    idle.close()
    reader.close()
    fan.close()


def test_the_guest_side_going_away_ends_every_tap_with_no_reason(console):
    master, path = console
    fan = ConsoleFanout(open_pty)
    a, b = fan.tap(path), fan.tap(path)
    os.close(master)  # QEMU exited
    assert read_until(a, b"never") == b""
    assert b.read(5) == b""
    assert (a.ended, b.ended) == ("", "")
    a.close()
    b.close()
    fan.close()
    assert opened_fds(path) == 0
