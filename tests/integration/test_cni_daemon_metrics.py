"""The macvtap daemon's ops endpoint in a real topology: after a few ADD/DEL (and one ADD that fails)
through the daemon, /metrics shows them - summed over the forked workers - with the failure's CNI
error code, /readyz says every worker is ready, and the multiprocess directory is gone after the
daemon stops. The endpoint listens on loopback inside the topology's own host namespace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cni_env import Topology, topology
from helpers.waiting import wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]
PORT = 19642
FETCH = """
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=30)
    status, body = r.status, r.read()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
sys.stdout.write(f"{status}\\n{body.decode()}")
"""


def fetch(t: Topology, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:PORT<path> from inside the topology's host namespace."""
    r = subprocess.run(
        ["ip", "netns", "exec", t.host, sys.executable, "-c", FETCH, f"http://127.0.0.1:{PORT}{path}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    status, _, body = r.stdout.partition("\n")
    return int(status), body


def value(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_after_add_and_del(tmp_path: Path) -> None:
    with topology(tmp_path) as t:
        t.start_daemon("--ops-address", f"127.0.0.1:{PORT}", "--log-format", "json")
        workers = os.cpu_count() or 1
        # on demand: ready with no worker running (the first call starts one)
        wait_for("the daemon ready", lambda: fetch(t, "/readyz") == (200, "ok\n"), 60, 0.2)
        conf = t.conf()
        pods = [t.new_pod() for _ in range(3)]
        for i, netns in enumerate(pods):
            res = t.plugin("ADD", conf, container_id=f"m{i}", netns=netns)
            assert res.code == 0, res.stdout + res.stderr
        bad = t.plugin("ADD", t.conf(mode="sideways"), container_id="bad", netns=pods[0], ifname="eth9")
        assert bad.code == 1 and bad.json()["code"] == 7
        for i, netns in enumerate(pods):
            assert t.plugin("DEL", conf, container_id=f"m{i}", netns=netns).code == 0
        status, text = fetch(t, "/metrics")
        assert status == 200
        assert value(text, 'macvtap_cni_request_duration_seconds_count{command="ADD"}') == 4
        assert value(text, 'macvtap_cni_request_duration_seconds_count{command="DEL"}') == 3
        assert value(text, 'macvtap_cni_request_errors_total{code="7",command="ADD"}') == 1
        assert value(text, 'macvtap_cni_request_errors_total{code="7",command="DEL"}') is None
        assert value(text, 'macvtap_daemon_workers{state="configured"}') == workers
        assert value(text, 'macvtap_daemon_workers{state="minimum"}') == (1 if workers == 1 else 0)
        assert value(text, 'macvtap_daemon_workers{state="ready"}') == 1  # sequential calls: one worker
        assert fetch(t, "/healthz") == (200, "ok\n")
        assert '"message": "ADD m0/eth0 ok' in t.daemon_log()  # --log-format json
        t.assert_clean()
        t.stop_daemon()
        assert not Path(t.socket + ".metrics").exists()
