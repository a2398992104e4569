"""edgevirt-cri's idle memory: what its serving imports leave out (the streaming server and the guest
sessions, loaded on the first Exec, Attach, PortForward or ExecSync instead)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: what edgevirt-cri with a kvm backend imports before it serves (cli, server, the kvm factory)
SERVING = (
    "import cri_shim.cli, cri_shim.server, cri_shim.router, cri_shim.metrics, cri_shim.readiness, "
    "cri_shim.backends.loader, cri_shim.kvm.factory, cri_shim.runtime_status"
)
#: loaded on the first Exec, Attach, PortForward or ExecSync
NOT_AT_START = (
    "cri_shim.streaming",
    "cri_shim.spdy",
    "cri_shim.exec_session",
    "cri_shim.attach_session",
    "cri_shim.portforward_session",
    "cri_shim.console_fanout",
    "cri_shim.vm.guest_session",
    "cri_shim.vm.guest_exec",
    "cri_shim.vm.guest_scripts",
)


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_serving_imports_leave_out_streaming_and_guest_sessions() -> None:
    loaded = _loaded_after(SERVING)
    assert "cri_shim.kvm.handler" in loaded
    assert sorted(loaded & set(NOT_AT_START)) == []


def test_first_use_imports_what_was_left_out(tmp_path: Path) -> None:
    code = (
        f"{SERVING}\n"
        "from cri_shim.kvm.console import ConsoleAttach\n"
        "from cri_shim.kvm.portforward import forward_spec\n"
        "a = ConsoleAttach('127.0.0.1:0', lambda d: '/dev/null'); a.consoles; a.close()\n"
        "assert forward_spec(80).argv[-1] == '80', forward_spec(80)\n"
    )
    loaded = _loaded_after(code)
    assert {"cri_shim.streaming", "cri_shim.console_fanout", "cri_shim.vm.guest_session"} <= loaded
