"""Turn a VM's serial console (raw bytes written by virtlogd) into a CRI container log.

kubelet reads a container's log file as lines of ``<RFC3339Nano> <stream> <P|F> <text>``
(``F`` = full line, ``P`` = a partial line continued by the next entry). QEMU writes the serial
console byte by byte; virtlogd owns that file (it survives libvirtd restarts and rotates it at its
``max_size``, renaming it to ``.1``). So the two files stay separate and a converter tails the raw
one:

* bytes are split at ``\\n``; a trailing ``\\r`` and terminal escape sequences (SeaBIOS clears the
  screen) are dropped, other control characters become ``\\uFFFD``-free spaces;
* a line longer than ``max_line`` bytes is cut into ``P`` entries (kubelet's own limit is 16 KiB);
* an unterminated line older than ``flush_after`` seconds is written as ``P`` (a shell prompt,
  a guest that hangs mid-line), and its rest follows later;
* rotation of the source (inode change or size shrink) restarts reading from the new file;
  :meth:`ConsoleLogConverter.reopen` reopens the destination after kubelet rotated it
  (CRI ``ReopenContainerLog``);
* the read offset is kept in ``state_file`` so a restarted CRI server neither repeats nor loses lines.

Timestamps are the time the converter read the bytes (the console has none of its own), in UTC
with nanoseconds. The stream is always ``stdout``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .private import write_private

ESCAPE_RE = re.compile(rb"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_]|[a-z])")
CONTROL_RE = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]")
DEFAULT_MAX_LINE = 16 * 1024


def rfc3339nano(t: float | None = None) -> str:
    """``2026-11-24T18:00:00.123456789Z`` for ``t`` (default now)."""
    ns = time.time_ns() if t is None else int(t * 1e9)
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


def clean(raw: bytes) -> str:
    """Console bytes of one line -> printable text."""
    raw = ESCAPE_RE.sub(b"", raw.rstrip(b"\r"))
    raw = CONTROL_RE.sub(b" ", raw.replace(b"\r", b""))
    return raw.decode("utf-8", errors="replace")


def cri_line(text: str, partial: bool = False, stream: str = "stdout", ts: str | None = None) -> str:
    """One CRI log entry (with its newline)."""
    return f"{ts or rfc3339nano()} {stream} {'P' if partial else 'F'} {text}\n"


class ConsoleLogConverter:
    """Tails ``source`` (raw console) and appends CRI entries to ``dest``."""

    def __init__(
        self,
        source: Path,
        dest: Path,
        state_file: Path | None = None,
        max_line: int = DEFAULT_MAX_LINE,
        flush_after: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = Path(source)
        self.dest = Path(dest)
        self.state_file = state_file
        self.max_line = max_line
        self.flush_after = flush_after
        self.clock = clock
        self._offset = 0
        self._inode = 0
        self._pending = b""
        self._pending_since = 0.0
        self._lock = threading.Lock()
        self._out: TextIO | None = None
        self._load_state()

    # -- state
    def _load_state(self) -> None:
        if self.state_file is None:
            return
        with contextlib.suppress(OSError, ValueError, KeyError):
            st = json.loads(self.state_file.read_text())
            self._offset, self._inode = int(st["offset"]), int(st["inode"])

    def _save_state(self) -> None:
        if self.state_file is None:
            return
        state = {"offset": self._offset - len(self._pending), "inode": self._inode}
        write_private(self.state_file, json.dumps(state))

    # -- output
    def _write(self, entries: list[str]) -> None:
        if not entries:
            return
        if self._out is None:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self._out = open(self.dest, "a", encoding="utf-8")  # noqa: SIM115 - kept open between pumps
        self._out.write("".join(entries))
        self._out.flush()

    def reopen(self) -> None:
        """Reopen the destination (after kubelet renamed it for rotation)."""
        with self._lock:
            if self._out is not None:
                self._out.close()
                self._out = None

    def close(self) -> None:
        self.reopen()

    # -- input
    def pump(self, final: bool = False) -> int:
        """Read what is new in the source and write entries; returns the number of entries.
        ``final`` writes an unterminated last line as ``F`` (the VM is gone)."""
        with self._lock:
            return self._pump(final)

    def _pump(self, final: bool) -> int:
        entries: list[str] = []
        try:
            st = os.stat(self.source)
        except FileNotFoundError:
            st = None
        if st is not None:
            if st.st_ino != self._inode or st.st_size < self._offset:
                # new or rotated file: flush what we had of the old one, start at 0
                if self._pending:
                    entries += self._emit(self._pending, partial=False)
                    self._pending = b""
                self._inode, self._offset = st.st_ino, 0
            if st.st_size > self._offset:
                with open(self.source, "rb") as f:
                    f.seek(self._offset)
                    data = f.read(st.st_size - self._offset)
                self._offset += len(data)
                if data:
                    if not self._pending:
                        self._pending_since = self.clock()
                    self._pending += data
        *lines, rest = self._pending.split(b"\n")
        for line in lines:
            entries += self._emit(line, partial=False)
        self._pending = rest
        if len(lines):
            self._pending_since = self.clock()
        while len(self._pending) > self.max_line:
            entries += self._emit(self._pending[: self.max_line], partial=True, split=False)
            self._pending = self._pending[self.max_line :]
        if self._pending and (final or self.clock() - self._pending_since >= self.flush_after):
            entries += self._emit(self._pending, partial=not final, split=False)
            self._pending = b""
        self._write(entries)
        self._save_state()
        return len(entries)

    def _emit(self, raw: bytes, partial: bool, split: bool = True) -> list[str]:
        ts = rfc3339nano(self.clock())
        if split and len(raw) > self.max_line:
            chunks = [raw[i : i + self.max_line] for i in range(0, len(raw), self.max_line)]
            return [cri_line(clean(c), partial=i < len(chunks) - 1, ts=ts) for i, c in enumerate(chunks)]
        return [cri_line(clean(raw), partial=partial, ts=ts)]

    def run(self, stop: threading.Event, interval: float = 0.2) -> None:
        """Pump until ``stop`` is set, then once more with ``final``."""
        while not stop.wait(interval):
            self.pump()
        self.pump(final=True)
        self.close()

    def start_thread(self, interval: float = 0.2) -> tuple[threading.Thread, threading.Event]:
        stop = threading.Event()
        t = threading.Thread(
            target=self.run, args=(stop, interval), daemon=True, name=f"console:{self.source}"
        )
        t.start()
        return t, stop
