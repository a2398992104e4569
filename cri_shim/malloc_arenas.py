"""Bounds glibc's malloc arenas in edgevirt-cri (``mallopt(M_ARENA_MAX)``, what ``MALLOC_ARENA_MAX``
sets from the environment, but applied however the process was started: the node installer's unit,
the local cluster, a test).

glibc gives threads their own arenas, up to 8 per CPU, and an arena keeps what it once held. The gRPC
pool grows to 32 threads when many pods start at once; with 15 arenas edgevirt-cri held ~2.7 MiB RSS
more after 10 VMs started at once than with the cap (bench/RESULTS.md "Long run", runs 3 and 4). The
calls are short and mostly wait on containerd and libvirt, so two arenas are enough; Python's own
small objects live in pymalloc's pools, not in these arenas. Importing ctypes costs ~0.4 MiB.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's malloc.h
ARENAS = 2


def cap(arenas: int = ARENAS) -> bool:
    """Cap this process's malloc arenas before its threads start; False where it cannot (not glibc)."""
    try:
        ok = bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # no libc to load, or one without mallopt (musl)
        ok = False
    if not ok:
        log.debug("malloc arenas not capped: mallopt(M_ARENA_MAX) is glibc's")
    return ok
