"""edgevirt-cri caps glibc's malloc arenas (cri_shim.malloc_arenas) before its threads start: threads
that allocate at the same time then share at most two arenas instead of one each."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO

pytestmark = pytest.mark.timeout(120)

THREADS = """
import sys, threading
sys.path.insert(0, {bench!r})
from bench_memory import mappings, thread_arenas
if sys.argv[1] == "capped":
    from cri_shim import malloc_arenas
    assert malloc_arenas.cap()
barrier = threading.Barrier(12)
keep = []
def work():
    barrier.wait()
    for _ in range(200):
        keep.append(bytearray(300_000))  # above pymalloc's limit and below mmap's: malloc'ed in an arena
        keep.append([bytes(600) for _ in range(50)])
threads = [threading.Thread(target=work) for _ in range(12)]
[t.start() for t in threads]
[t.join() for t in threads]
import os
print(len(thread_arenas(mappings(os.getpid()))))
"""


def arenas(mode: str) -> int:
    code = THREADS.format(bench=str(REPO / "bench" / "node"))
    r = subprocess.run(
        [sys.executable, "-c", code, mode], cwd=REPO, capture_output=True, text=True, timeout=90,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def test_threads_share_at_most_two_arenas_once_capped():
    assert arenas("uncapped") > 2  # the test can tell: unbounded, concurrent threads get their own
    assert arenas("capped") <= 2  # the main arena plus at most one more (M_ARENA_MAX counts both)


def test_cli_caps_before_any_thread_starts():
    source = (REPO / "cri_shim" / "cli.py").read_text()
    main = source[source.index("def main(") :]
    assert main.index("malloc_arenas.cap()") < main.index("_start(")
