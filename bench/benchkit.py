"""What the benchmarks share: percentiles, a process's memory from /proc, and the floor several of them
measure against, libvirt starting a domain straight from its XML.

The benchmarks import it with ``<repo>/bench`` on sys.path; they take the tests' shared helpers
(``helpers.waiting``, ``helpers.containerd`` ...) with ``<repo>/tests`` on sys.path.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from helpers.waiting import wait_for


def pct(xs: list[float], p: float) -> float:
    """The ``p``-th percentile of ``xs`` (nearest rank)."""
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def status_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of /proc/<pid>/status in KiB (VmRSS: resident now, VmHWM: its peak); 0 if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def smaps_rollup_kib(pid: int) -> dict[str, int]:
    """The sums of /proc/<pid>/smaps_rollup in KiB by field (Rss, Pss, Anonymous, Private_Dirty ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def time_create_xml(conn: Any, xml: str) -> float:
    """Seconds from ``virDomainCreateXML`` (what ``virsh create`` does) of ``xml`` until libvirt says
    the domain is active; the domain is destroyed again."""
    t0 = time.perf_counter()
    dom = conn.createXML(xml, 0)
    wait_for("the floor domain to be active", dom.isActive, 120, 0.001)
    dt = time.perf_counter() - t0
    dom.destroy()
    return dt
