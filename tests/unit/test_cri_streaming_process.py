"""The streaming server (Attach) in a child process of its own, attacked from here while a good
client attaches over and over: its resident memory (VmHWM, the peak, from /proc/PID/status) stays
within a small bound of what it was before, its threads stay bounded, and the good sessions all
work, during the attacks and after. A watchdog kills the child past 512 MiB, so a regression fails
here instead of exhausting the machine (the unbounded server went past 1 GiB on each bomb)."""

from __future__ import annotations

import struct
import threading
import time

import pytest
import streaming_attacks as attacks
from cri_streaming_child import ChildServer

from cri_shim import spdy
from cri_shim.stream_limits import MAX_HANDSHAKES

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
CEILING_KB = 512 << 10
#: what the attacks may add to the child's peak resident memory
GROWTH_BOUND_KB = 32 << 10


class GoodClient:
    """Attaches again and again in a thread until stopped: (sessions that worked, that did not)."""

    def __init__(self, child: ChildServer) -> None:
        self.child, self.ok, self.failed = child, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while n == 0 or not self._stop.is_set():  # one session at least
            n += 1
            text = b"good %d\r" % n
            try:
                got = attacks.good_session(self.child.attach_url(), text)
            except (AssertionError, OSError, EOFError) as e:
                self.failed.append(repr(e))
                continue
            if text.upper() in got:
                self.ok += 1
            else:
                self.failed.append(f"echo missing: {got!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def warmed_up(child: ChildServer) -> int:
    """One good session first (imports, first threads); the peak resident memory after it."""
    assert b"WARM\r" in attacks.good_session(child.attach_url(), b"warm\r")
    return child.status_kb("VmHWM")


def test_bombs_floods_and_huge_frames_leave_the_child_small_and_attach_working():
    with ChildServer(ceiling_kb=CEILING_KB) as child:
        base = warmed_up(child)
        good = GoodClient(child)
        try:
            bomb = attacks.send_bomb(child.attach_url(), 256 * MiB)  # 260 KiB: over max_control_frame
            sent, _ = attacks.flood_early_data(child.attach_url(), 256 * MiB)
            attacks.huge_frame(child.attach_url(), length=0xFFFFFF, body=16 * MiB)
            time.sleep(1)  # the good client goes on a while after the last attack
        finally:
            good.stop()
        assert not child.killed_at_ceiling, f"the child passed {CEILING_KB} kB"
        growth = child.status_kb("VmHWM") - base
        assert growth < GROWTH_BOUND_KB, f"peak resident memory grew by {growth} kB"
        assert [k for k, _, _, _ in bomb] == [spdy.GOAWAY]
        assert sent < 256 * MiB, "the child read the whole flood"
        assert good.ok >= 1 and good.failed == []
        assert b"AFTER\r" in attacks.good_session(child.attach_url(), b"after\r")


def test_a_bomb_that_reaches_the_inflater_leaves_the_child_small():
    """Control frames allowed up to 2 MiB, so that a block inflating to 512 MiB (about 500 KiB) gets
    to the inflater: the header block limit (64 KiB) stops it there."""
    with ChildServer({"frames": {"max_control_frame": 2 * MiB}}, ceiling_kb=CEILING_KB) as child:
        base = warmed_up(child)
        good = GoodClient(child)
        try:
            frames = attacks.send_bomb(child.attach_url(), 512 * MiB)
        finally:
            good.stop()
        assert not child.killed_at_ceiling, f"the child passed {CEILING_KB} kB"
        growth = child.status_kb("VmHWM") - base
        assert growth < GROWTH_BOUND_KB, f"peak resident memory grew by {growth} kB"
        assert [(k, struct.unpack_from(">I", d, 4)[0]) for k, _, _, d in frames] == [
            (spdy.GOAWAY, spdy.GOAWAY_PROTOCOL_ERROR)
        ]
        assert good.ok >= 1 and good.failed == []


def test_idle_connections_and_a_slow_loris_leave_the_child_bounded_and_attach_working():
    with ChildServer({"handshake_timeout": 3.0}, ceiling_kb=CEILING_KB) as child:
        base = warmed_up(child)
        threads = child.threads()
        socks = attacks.open_idle(child.base_url, 300)
        try:
            # the threads of the connections pushed out end soon after: at most one per held one left
            end = time.monotonic() + 30
            while (held := child.threads()) > threads + MAX_HANDSHAKES and time.monotonic() < end:
                time.sleep(0.1)
            # a good client gets through while the newest idle connections are held
            assert b"THROUGH\r" in attacks.good_session(child.attach_url(), b"through\r")
            sent, answer = attacks.slow_loris(child.attach_url(), interval=0.5, give_up_after=60)
            assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
            assert sent < 20
            assert all(attacks.closed_by_server(s, wait=10) is not None for s in socks)
        finally:
            for s in socks:
                s.close()
        assert held <= threads + MAX_HANDSHAKES, f"{held} threads with idle connections, {threads} before"
        growth = child.status_kb("VmHWM") - base
        assert growth < GROWTH_BOUND_KB, f"peak resident memory grew by {growth} kB"
