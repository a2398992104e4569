"""helpers/libvirt_daemon.py's qemu.conf handling (pure text; the daemons are exercised by integration)."""

from __future__ import annotations

from helpers import libvirt_daemon as D

WANT = {"user": '"root"', "group": '"root"', "security_driver": '"none"', "cgroup_controllers": "[ ]"}


def test_adds_block_and_comments_conflicting_lines():
    text = '#user = "qemu"\nuser = "libvirt-qemu"\nvnc_listen = "0.0.0.0"\n'
    out = D.render_qemu_conf(text)
    assert D.effective_settings(out) == {**WANT, "vnc_listen": '"0.0.0.0"'}
    assert '# (edgevirt) user = "libvirt-qemu"' in out
    assert D.render_qemu_conf(out) == out  # idempotent


def test_leaves_a_file_alone_that_already_has_the_settings():
    text = "# edgevirt: settings (deploy/install/install)\n" + "".join(
        f"{k} = {v}\n" for k, v in WANT.items()
    )
    assert D.render_qemu_conf(text) == text


def test_replaces_an_old_managed_block():
    old = D.render_qemu_conf('user = "x"\n').replace(
        'security_driver = "none"', 'security_driver = "selinux"'
    )
    out = D.render_qemu_conf(old)
    assert out.count(D.BEGIN) == 1
    assert D.effective_settings(out) == WANT
