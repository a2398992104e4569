"""libvirt state/reason -> DomainState, exit codes; the tap wrapper's argv rewriting."""

from __future__ import annotations

import os

import libvirt
import pytest

from cri_shim.vm import tapwrap
from cri_shim.vm.model import VolumeSpec
from cri_shim.vm.spec import ValidationError
from cri_shim.vm.states import map_state
from cri_shim.vm.wrapper_install import install_wrapper


@pytest.mark.parametrize(
    ("state", "reason", "expected"),
    [
        (libvirt.VIR_DOMAIN_RUNNING, 1, ("running", "booted", None)),
        (libvirt.VIR_DOMAIN_RUNNING, 5, ("running", "unpaused", None)),
        (libvirt.VIR_DOMAIN_BLOCKED, 0, ("running", "unknown", None)),
        (libvirt.VIR_DOMAIN_PAUSED, 1, ("paused", "user", None)),
        (libvirt.VIR_DOMAIN_PAUSED, 5, ("paused", "ioerror", None)),
        (libvirt.VIR_DOMAIN_SHUTDOWN, 1, ("shutting-down", "user", None)),
        (libvirt.VIR_DOMAIN_SHUTOFF, 1, ("shutoff", "shutdown", 0)),
        (libvirt.VIR_DOMAIN_SHUTOFF, 2, ("shutoff", "destroyed", 137)),
        (libvirt.VIR_DOMAIN_SHUTOFF, 3, ("shutoff", "crashed", 139)),
        (libvirt.VIR_DOMAIN_SHUTOFF, 6, ("shutoff", "failed", 1)),
        (libvirt.VIR_DOMAIN_SHUTOFF, 0, ("shutoff", "unknown", 0)),
        (libvirt.VIR_DOMAIN_SHUTOFF, 99, ("shutoff", "unknown", 0)),
        (libvirt.VIR_DOMAIN_CRASHED, 1, ("crashed", "panicked", 139)),
        (libvirt.VIR_DOMAIN_PMSUSPENDED, 0, ("pmsuspended", "unknown", None)),
        (libvirt.VIR_DOMAIN_NOSTATE, 0, ("unknown", "unknown", None)),
    ],
)
def test_state_mapping(state, reason, expected):
    st = map_state(state, reason)
    assert (st.phase, st.reason, st.exit_code) == expected
    assert st.running == (expected[0] in ("running", "paused", "shutting-down", "pmsuspended"))


def test_volume_spec_validation():
    with pytest.raises(ValidationError, match=r"^v: has 2 sources; give exactly one of"):
        VolumeSpec(name="d", empty_disk="1Mi", image="x").validate("v")
    with pytest.raises(ValidationError, match=r"^v.name: 'root' is reserved"):
        VolumeSpec(name="root", empty_disk="1Mi").validate("v")


def test_wrapper_rewrites_placeholders_with_opened_fds(tmp_path):
    dev = tmp_path / "tap"
    dev.write_bytes(b"")
    argv = ["-name", "x", "-netdev", "tap,id=evnet0,fd=@EDGEVIRT_TAP_0_FD@,vhost=off", "-S"]
    out = tapwrap.rewrite_argv(argv, {"EDGEVIRT_TAP_0": str(dev), "PATH": "/bin"})
    fd = int(out[3].split("fd=")[1].split(",")[0])
    try:
        assert out[:3] == argv[:3] and out[4] == "-S"
        assert os.get_inheritable(fd)
        assert os.path.samefile(f"/proc/self/fd/{fd}", dev)
    finally:
        os.close(fd)


def test_wrapper_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit, match=r"cannot open tap device '/nonexistent/tap' \(EDGEVIRT_TAP_0\)"):
        tapwrap.rewrite_argv(["x"], {"EDGEVIRT_TAP_0": "/nonexistent/tap"})
    with pytest.raises(SystemExit, match=r"needs EDGEVIRT_TAP_1, which is not set"):
        tapwrap.rewrite_argv(["fd=@EDGEVIRT_TAP_1_FD@"], {})
    # without variables (libvirt probing capabilities) argv passes unchanged
    assert tapwrap.rewrite_argv(["-machine", "none"], {}) == ["-machine", "none"]


def test_install_wrapper_is_idempotent(tmp_path):
    p = install_wrapper(tmp_path)
    assert os.access(p, os.X_OK)
    assert p.read_text().startswith("#!")
    mtime = p.stat().st_mtime_ns
    assert install_wrapper(tmp_path) == p
    assert p.stat().st_mtime_ns == mtime  # unchanged file: libvirt keeps its capability cache


def test_the_state_table_uses_libvirts_state_codes():
    from cri_shim.vm import states

    for name in ("NOSTATE", "RUNNING", "BLOCKED", "PAUSED", "SHUTDOWN", "SHUTOFF", "CRASHED", "PMSUSPENDED"):
        assert getattr(states, f"VIR_DOMAIN_{name}") == getattr(libvirt, f"VIR_DOMAIN_{name}"), name
