"""The macvtap supervisor loads its workers' code before forking (cni_macvtap.daemon.preload_worker_code):
forking stays safe only while that starts no thread and opens no file or socket."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import os, sys, threading, gc
fds = sorted(os.listdir('/proc/self/fd'))
from cni_macvtap.daemon import preload_worker_code
preload_worker_code()
assert threading.active_count() == 1, threading.enumerate()
assert sorted(os.listdir('/proc/self/fd')) == fds, (fds, os.listdir('/proc/self/fd'))
assert 'pyroute2.iproute' in sys.modules and 'cni_macvtap.add' in sys.modules
assert 'pyroute2.ndb.main' not in sys.modules  # IPRoute only (cni_macvtap.package_init)
assert gc.get_freeze_count() > 0
print('ok')
"""


def test_preloading_the_workers_code_starts_no_thread_and_opens_nothing() -> None:
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
