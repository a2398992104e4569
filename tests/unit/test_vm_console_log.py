"""Console -> CRI log conversion: format, partial lines, escapes, rotation, restart without repeats."""

from __future__ import annotations

import re

from cri_shim.vm.console_log import ConsoleLogConverter, clean, cri_line, rfc3339nano

LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) stdout ([PF]) (.*)$")


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def entries(path):
    return [LINE.match(x).groups()[1:] for x in path.read_text().splitlines()]


def test_timestamp_format():
    assert rfc3339nano(0) == "1970-01-01T00:00:00.000000000Z"
    assert rfc3339nano(1.5) == "1970-01-01T00:00:01.500000000Z"
    assert LINE.match(cri_line("x").rstrip("\n"))


def test_clean_strips_escapes_and_cr():
    assert clean(b"\x1bc\x1b[?7l\x1b[2JEDGEVIRT-GUEST: up\r") == "EDGEVIRT-GUEST: up"
    assert clean(b"a\x00b\tc") == "a b\tc"  # tabs stay, other controls become spaces
    assert clean(b"\xff ok") == "\ufffd ok"


def test_full_and_partial_lines(tmp_path):
    src, dst, clock = tmp_path / "console.log", tmp_path / "cri.log", Clock()
    conv = ConsoleLogConverter(src, dst, flush_after=2.0, clock=clock)
    assert conv.pump() == 0  # no source yet
    src.write_bytes(b"SeaBIOS\r\nline two\nprom")
    assert conv.pump() == 2
    assert entries(dst) == [("F", "SeaBIOS"), ("F", "line two")]
    clock.t += 3  # unterminated line older than flush_after -> P
    assert conv.pump() == 1
    with open(src, "ab") as f:
        f.write(b"pt$ done\n")
    conv.pump()
    assert entries(dst)[2:] == [("P", "prom"), ("F", "pt$ done")]


def test_long_line_split(tmp_path):
    src, dst = tmp_path / "c", tmp_path / "d"
    src.write_bytes(b"a" * 25 + b"\n")
    ConsoleLogConverter(src, dst, max_line=10).pump()
    assert entries(dst) == [("P", "a" * 10), ("P", "a" * 10), ("F", "a" * 5)]


def test_rotation_and_restart_resume(tmp_path):
    src, dst, state = tmp_path / "c", tmp_path / "d", tmp_path / "state"
    src.write_bytes(b"one\ntwo\nthr")
    c1 = ConsoleLogConverter(src, dst, state_file=state, flush_after=1e9)
    c1.pump()
    c1.close()
    # a restarted converter continues where the first stopped (the partial line is re-read)
    with open(src, "ab") as f:
        f.write(b"ee\n")
    c2 = ConsoleLogConverter(src, dst, state_file=state, flush_after=1e9)
    c2.pump()
    assert [e[1] for e in entries(dst)] == ["one", "two", "three"]
    # virtlogd rotation: file renamed, a new one started
    src.rename(tmp_path / "c.1")
    src.write_bytes(b"four\n")
    c2.pump()
    assert [e[1] for e in entries(dst)] == ["one", "two", "three", "four"]
    # kubelet rotated the CRI log: reopen writes to the new file
    dst.rename(tmp_path / "d.1")
    c2.reopen()
    with open(src, "ab") as f:
        f.write(b"five\nlast")
    c2.pump(final=True)
    assert entries(dst) == [("F", "five"), ("F", "last")]


def test_thread_runner(tmp_path):
    src, dst = tmp_path / "c", tmp_path / "d"
    src.write_bytes(b"x\ny")
    t, stop = ConsoleLogConverter(src, dst).start_thread(interval=0.01)
    stop.set()
    t.join(5)
    assert not t.is_alive()
    assert entries(dst) == [("F", "x"), ("F", "y")]
